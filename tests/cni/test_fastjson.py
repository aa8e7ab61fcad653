"""vswitch.fastjson gives what json gives: the same objects, the same text, the same errors.

The plugin (and the control protocol, vswitch.rpc) read and write JSON through it instead of
the json package, to start without importing ``re``; these cases pin it to json's behaviour
on everything the plugin meets: configurations, results, errors, odd whitespace and bytes.
"""
import json
import subprocess
import sys

import pytest

from vswitch import fastjson

VALUES = [
    {}, [], 0, -1, 2 ** 70, 1.5, 1e100, -0.0, float("inf"), float("-inf"), True, False, None,
    "", "é", "\u2028", "a\"b\\c\n\t\x01", "\ud800",
    {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"}],
     "ips": [{"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 1}],
     "routes": [{"dst": "0.0.0.0/0"}], "dns": {}},
    {"z": 1, "a": [1, [2, [3, {}]], {"b": []}], "m": {"k": {"k": {}}}},
    {1: "int key", 2.5: "float key", True: "bool key", None: "null key"},
    [[[[[]]]]], [{}], ({"t": (1, 2)},),
]
OPTIONS = [{}, {"separators": (",", ":")}, {"indent": 4}, {"indent": 1, "sort_keys": True},
           {"indent": 2, "separators": (",", ": ")}, {"sort_keys": True}]


def _outcome(fn, *args, **kw):
    try:
        return ("ok", fn(*args, **kw))
    except Exception as exc:        # the exception's type and text are part of the contract
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_dumps_is_json_dumps(opts):
    for value in VALUES:
        assert _outcome(fastjson.dumps, value, **opts) == _outcome(json.dumps, value, **opts), (value, opts)


def test_dumps_errors_are_json_errors():
    class Thing:
        pass
    loop = []
    loop.append(loop)
    for bad in (Thing(), {"a": Thing()}, {(1, 2): 1}, loop, {"x": loop}):
        for opts in ({}, {"indent": 4}):
            assert _outcome(fastjson.dumps, bad, **opts) == _outcome(json.dumps, bad, **opts), (bad, opts)


TEXTS = [
    "", " ", "\n", "{", "}", "[1,]", "[1, 2", '{"a" 1}', '{"a":1} x', '{"a":1}  \n', "\t [1] \r\n", "nul",
    "\ufeff{}", '{"a": NaN}', '"\\ud800"', "1 2", "01", "-Infinity", "[-Infinity, Infinity]", '{"a":"\x01"}',
    '{"a": 1, "a": 2}', '"\\u00e9"', "1e999", "-0", "[" * 50 + "]" * 50, '{"k": [true, false, null]}',
    json.dumps(VALUES[18]), "\x0b1",
]


@pytest.mark.parametrize("as_bytes", (False, True), ids=("str", "bytes"))
def test_loads_is_json_loads(as_bytes):
    for text in TEXTS:
        arg = text.encode("utf-8", "surrogatepass") if as_bytes else text
        got, want = _outcome(fastjson.loads, arg), _outcome(json.loads, arg)
        assert repr(got) == repr(want), (text, got, want)       # repr: nan == nan


def test_loads_bytes_like_json():
    for data in (b"\xef\xbb\xbf{\"a\": 1}", b"\xff", b"{\"a\": \"\xc3\xa9\"}", b" {} ",
                 '{"u16": 1}'.encode("utf-16-le"), '[1]'.encode("utf-32-be"), bytearray(b"[2]")):
        assert repr(_outcome(fastjson.loads, data)) == repr(_outcome(json.loads, data)), data
    assert _outcome(fastjson.loads, 5)[0] == _outcome(json.loads, 5)[0] == "TypeError"


def test_importing_it_loads_neither_json_nor_re():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from vswitch import fastjson;"
            "v = fastjson.loads(fastjson.dumps({'a': [1, 'x']}, indent=4)); assert v == {'a': [1, 'x']};"
            "print(' '.join(sorted(m for m in ('json', 're', 'enum') if m in sys.modules)))")
    from pathlib import Path
    root = str(Path(fastjson.__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-IS", "-c", code, root], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""


def test_malformed_documents_in_a_process_without_json():
    """_json raises through json.decoder without importing it: the plugin's own process
    (which never loads json) must still get json's ValueError, not a SystemError (found
    when the plugin answered code 115 instead of 6 to a malformed configuration)."""
    bad = ["{not json", "[1,", '{"a": 1} x', "", "\ufeff{}", '{"a": tru}']
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from vswitch import fastjson\n"
            "for t in sys.argv[2:]:\n"
            "    try:\n"
            "        fastjson.loads(t)\n"
            "    except ValueError as exc:\n"
            "        print(type(exc).__name__, exc)\n")
    from pathlib import Path
    root = str(Path(fastjson.__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-IS", "-c", code, root, *bad], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [" ".join(map(str, _outcome(json.loads, t))) for t in bad]
