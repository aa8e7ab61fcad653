"""JSON for the processes that must start fast, without importing the ``json`` package.

Theory of operation
-------------------
``import json`` costs ~7 ms on this machine kind, most of it ``re`` (json.decoder and
json.encoder compile regular expressions at import), and the CNI plugin starts for every
pod. The package's real work is done by its C accelerator ``_json`` anyway: ``json.loads``
runs ``_json.make_scanner`` and ``json.dumps`` (without ``indent``) runs
``_json.make_encoder``. This module calls them directly, with the arguments
``json.JSONDecoder`` and ``json.JSONEncoder`` pass by default, so the results are the same
objects and the same text, byte for byte:

- ``loads(text)``: ``str`` or UTF-8 ``bytes`` (a UTF-8 BOM is dropped, as ``json.loads``
  does for bytes); surrounding JSON whitespace is skipped; an error raises
  ``json.JSONDecodeError`` (a ValueError) with ``json.loads``'s message: the C scanner
  imports json.decoder for it, so only a failing parse pays for ``re``.
- ``dumps(obj, separators=None, sort_keys=False, indent=None)``: ``indent`` (an int) gives
  ``json.dumps(obj, indent=...)``'s layout, done here in Python around the C encoder of
  the scalars (the C encoder of Python < 3.13 ignores ``indent``).

Without ``_json`` (another Python implementation) both fall back to ``json``.
tests/cni/test_fastjson.py compares both functions with ``json`` on the same inputs.
"""
from __future__ import annotations

try:
    from _json import make_encoder as _c_make_encoder, make_scanner as _c_make_scanner
    from _json import encode_basestring_ascii as _c_encode_str
except ImportError:         # pragma: no cover - CPython always has _json
    _c_make_scanner = _c_make_encoder = _c_encode_str = None

__all__ = ["loads", "dumps"]

_WS = " \t\n\r"             # JSON's whitespace (json.decoder.WHITESPACE)
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """The attributes ``_json.make_scanner`` reads: json.JSONDecoder()'s defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _c_make_scanner(_Context) if _c_make_scanner is not None else None


def _error(msg: str, doc: str, pos: int) -> Exception:
    from json import JSONDecodeError       # the error path alone pays for the json package
    return JSONDecodeError(msg, doc, pos)


def loads(text):
    """``json.loads(text)`` for ``str`` and UTF-8 ``bytes``."""
    if _c_make_scanner is None:  # pragma: no cover
        import json
        return json.loads(text)
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text)
        if text.startswith(b"\xef\xbb\xbf"):
            text = text[3:]
        if len(text) >= 2 and (not text[0] or not text[1]):
            import json             # UTF-16/32 (a NUL in the first two bytes): json detects it
            return json.loads(text)
        text = text.decode("utf-8", "surrogatepass")
    elif not isinstance(text, str):
        raise TypeError(f"the JSON object must be str, bytes or bytearray, not {type(text).__name__}")
    elif text.startswith("\ufeff"):
        raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    start = len(text) - len(text.lstrip(_WS))
    try:
        obj, end = _scan(text, start)
    except StopIteration as err:
        raise _error("Expecting value", text, err.value) from None
    except SystemError:
        # _json raises its JSONDecodeError through json.decoder taken from sys.modules,
        # never imported by it: without the json package loaded, a malformed document
        # inside a container ends in "returned NULL without setting an exception". Load
        # it (the error path alone pays) and scan again for the real error.
        import json.decoder  # noqa: F401
        obj, end = _scan(text, start)
    rest = len(text.rstrip(_WS))
    if end < rest:
        raise _error("Extra data", text, end + (len(text[end:]) - len(text[end:].lstrip(_WS))))
    return obj


def _default(o):
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def _encoder(separators, sort_keys):
    item_sep, key_sep = separators
    return _c_make_encoder({}, _default, _c_encode_str, None, key_sep, item_sep, sort_keys, False, True)


def dumps(obj, separators=None, sort_keys: bool = False, indent: int | None = None) -> str:
    """``json.dumps(obj, separators=..., sort_keys=..., indent=...)`` (ASCII output)."""
    if _c_make_encoder is None:  # pragma: no cover
        import json
        return json.dumps(obj, separators=separators, sort_keys=sort_keys, indent=indent)
    if indent is None:
        return "".join(_encoder(separators or (", ", ": "), sort_keys)(obj, 0))
    enc = _encoder(separators or (",", ": "), sort_keys)
    item_sep, key_sep = separators or (",", ": ")
    out: list = []
    _pretty(obj, enc, " " * indent if isinstance(indent, int) else str(indent), item_sep, key_sep,
            sort_keys, "\n", out, set())
    return "".join(out)


def _pretty(o, enc, step, item_sep, key_sep, sort_keys, nl, out, seen):
    """json.encoder's indented layout: containers here, everything else by the C encoder."""
    if isinstance(o, dict) and o:
        if id(o) in seen:
            raise ValueError("Circular reference detected")
        seen.add(id(o))
        inner = nl + step
        items = sorted(o.items()) if sort_keys else o.items()
        out.append("{")
        first = True
        for k, v in items:
            if isinstance(k, str):
                key = k
            elif isinstance(k, (int, float, bool)) or k is None:
                key = "".join(enc({k: 0}, 0))[2:].split('"', 1)[0]    # json's key text for it
            else:
                raise TypeError(f"keys must be str, int, float, bool or None, not {k.__class__.__name__}")
            out.append(inner if first else item_sep + inner)
            first = False
            out.append(_c_encode_str(key) + key_sep)
            _pretty(v, enc, step, item_sep, key_sep, sort_keys, inner, out, seen)
        out.append(nl + "}")
        seen.discard(id(o))
    elif isinstance(o, (list, tuple)) and o:
        if id(o) in seen:
            raise ValueError("Circular reference detected")
        seen.add(id(o))
        inner = nl + step
        out.append("[")
        for i, v in enumerate(o):
            out.append(inner if i == 0 else item_sep + inner)
            _pretty(v, enc, step, item_sep, key_sep, sort_keys, inner, out, seen)
        out.append(nl + "]")
        seen.discard(id(o))
    else:
        out.append("".join(enc(o, 0)))
