"""The C CNI client (cni/client.c, built by setup.py as vswitch_cni/vswitch-client).

Every test runs the real binary. VERSION is compared byte for byte with the Python plugin's.
With no daemon, each invocation must end exactly as the Python plugin alone ends it (exit
status and stdout; stdin, argv and environ handed on unchanged, stdin beyond 16 MiB too).
The scanner that finds the top-level "socket" and "cniVersion" is driven through the
binary's test mode (``vswitch --scan``: prints ``socket PATH`` / ``cniVersion V`` lines or
``fallback REASON``) on hand-written edge cases, a generated corpus (fixed seed) whose
answers Python's json gives, and mutations of it (the client may refuse, never differ); and
once through a real connection, to listeners started here. A fake daemon written here speaks
the frame protocol (vswitch/daemon/cniexec.py): 'R' runs real executables (host-local, a script
killed by a signal, a missing name, 1 MiB and over-16-MiB outputs, the child's fds and
signal state), 'O'/'E'/'X', and the failures: a daemon gone after 'I', a refusal, a
truncated frame, a frame announced longer than 16 MiB, an unknown type.
"""
import hashlib
import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import thinclient as tc  # noqa: E402
from vswitch.rpc import DEFAULT_SOCKET  # noqa: E402
from vswitch_cni import build  # noqa: E402
from vswitch_cni.results import dumps, version_info  # noqa: E402

HOST_LOCAL = "/usr/lib/cni/host-local"
HELLO = b'{"op":"cni_exec","v":1}\n'
HELLO_OK = b'{"ok":true,"v":1}\n'
MAX_PAYLOAD = 16 << 20
MAX_OUTPUT = MAX_PAYLOAD - 8
PYTHON = os.path.realpath(sys.executable)

# the Python plugin stand-in for tests of the fallback's mechanics: records argv, the exact
# initial environ (/proc/self/environ, before the interpreter touches it) and stdin
RECORDER = f"""#!{PYTHON} -IS
import json, hashlib, sys
data = sys.stdin.buffer.read()
env = open("/proc/self/environ", "rb").read().split(b"\\0")[:-1]
with open(sys.argv[0] + ".record", "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": [e.decode("utf-8", "replace") for e in env],
               "stdin_len": len(data), "stdin_sha": hashlib.sha256(data).hexdigest()}}, f)
sys.stdout.write('{{"recorder": true}}\\n')
sys.exit(7)
"""


@pytest.fixture(scope="module")
def client():
    path = build.client_path()
    if path is None:
        pytest.fail("the C client is not built: run python setup.py build_ext --inplace")
    return path


@pytest.fixture(scope="module")
def real_bin(client, tmp_path_factory):
    """A bin dir as install-cni writes it: the client and the real Python plugin (pinned to
    this interpreter, as tests/cni/cnitest.py installs it)."""
    d = tmp_path_factory.mktemp("realbin")
    shutil.copy2(client, d / "vswitch")
    (d / build.FALLBACK_NAME).write_bytes(build.build_bytes(python=PYTHON))
    (d / build.FALLBACK_NAME).chmod(0o755)
    return d


@pytest.fixture
def rec_bin(client, tmp_path):
    """A bin dir whose vswitch-py is the RECORDER."""
    d = tmp_path / "recbin"
    d.mkdir()
    shutil.copy2(client, d / "vswitch")
    (d / build.FALLBACK_NAME).write_text(RECORDER)
    (d / build.FALLBACK_NAME).chmod(0o755)
    return d


def record_of(bin_dir):
    path = bin_dir / (build.FALLBACK_NAME + ".record")
    return json.loads(path.read_text()) if path.exists() else None


def run(exe, env, stdin=b"", args=(), timeout=60, **kw):
    return subprocess.run([str(exe), *args], env=env, input=stdin, capture_output=True,
                          timeout=timeout, **kw)


# ---------------------------------------------------------------- VERSION

def test_version_is_byte_identical_to_the_python_plugin(real_bin):
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}
    c = run(real_bin / "vswitch", env)
    py = run(real_bin / build.FALLBACK_NAME, env)
    assert c.returncode == py.returncode == 0
    assert c.stdout == py.stdout == (dumps(version_info()) + "\n").encode()
    assert c.stderr == b""


def test_version_reads_no_stdin_and_needs_no_daemon(real_bin):
    # stdin a pipe nobody closes: the client must not wait for it
    r, w = os.pipe()
    try:
        p = subprocess.run([str(real_bin / "vswitch")], env={"CNI_COMMAND": "VERSION"}, stdin=r,
                           capture_output=True, timeout=10)
    finally:
        os.close(r)
        os.close(w)
    assert p.returncode == 0 and json.loads(p.stdout)["cniVersion"] == "1.1.0"


# ---------------------------------------------------------------- fallback (no daemon)

def conf(tmp_path, **extra):
    return {"cniVersion": "1.0.0", "name": "fb", "type": "vswitch",
            "socket": str(tmp_path / "no-daemon.sock"),
            "ipam": {"type": "host-local", "dataDir": str(tmp_path / "hl"),
                     "ranges": [[{"subnet": "10.231.7.0/24"}]]}, **extra}


def same_as_python(bin_dir, env, stdin, args=()):
    """Run the client and the Python plugin alone; both end the same (status, stdout)."""
    c = run(bin_dir / "vswitch", env, stdin, args)
    py = run(bin_dir / build.FALLBACK_NAME, env, stdin, args)
    assert (c.returncode, c.stdout) == (py.returncode, py.stdout), (c, py)
    return c


def base_env(command, **extra):
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": "cafe01",
           "CNI_NETNS": "/proc/1/ns/net", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def reserved(tmp_path):
    d = tmp_path / "hl" / "fb"
    return sorted(n for n in os.listdir(d) if n[0].isdigit()) if d.exists() else []


def test_del_with_the_daemon_down_releases_through_the_python_plugin(real_bin, tmp_path):
    if not os.access(HOST_LOCAL, os.X_OK):
        pytest.fail("needs host-local in /usr/lib/cni (apt-get install -y containernetworking-plugins)")
    c = conf(tmp_path)
    stdin = json.dumps(c).encode()
    outcomes = []
    for exe in ("vswitch", build.FALLBACK_NAME):
        hl = run(HOST_LOCAL, base_env("ADD"), stdin)           # an address to release
        assert hl.returncode == 0, hl
        assert len(reserved(tmp_path)) == 1
        p = run(real_bin / exe, base_env("DEL"), stdin)
        outcomes.append((p.returncode, p.stdout))
        assert reserved(tmp_path) == [], p
        assert b"vswitchd is down" in p.stderr
    assert outcomes[0] == outcomes[1] == (0, b"")


@pytest.mark.parametrize("case", [
    "add-without-netns", "bad-json", "not-an-object", "empty-command", "no-command",
    "version-argument", "unsupported-version", "socket-escaped", "socket-not-string",
    "socket-relative", "check-without-prevresult", "gc", "status",
])
def test_every_command_falls_back_to_the_same_result(real_bin, tmp_path, case):
    c = conf(tmp_path)
    env, stdin, args = base_env("ADD"), json.dumps(c).encode(), ()
    if case == "add-without-netns":
        env = base_env("ADD", CNI_NETNS=None)
    elif case == "bad-json":
        stdin = b'{"cniVersion": "1.0.0", "name": '
    elif case == "not-an-object":
        stdin = b"[1, 2]"
    elif case == "empty-command":
        env = base_env("")
    elif case == "no-command":
        env = base_env("X", CNI_COMMAND=None)
    elif case == "version-argument":
        env, args = base_env("VERSION"), ("--version",)        # argv beyond argv[0]: fallback
    elif case == "unsupported-version":
        stdin = json.dumps(dict(c, cniVersion="9.9.9")).encode()
    elif case == "socket-escaped":
        stdin = json.dumps(c).replace('"socket": "/', '"socket": "\\u002f').encode()
    elif case == "socket-not-string":
        stdin = json.dumps(dict(c, socket=17)).encode()
    elif case == "socket-relative":
        stdin = json.dumps(dict(c, socket="relative.sock")).encode()
    elif case == "check-without-prevresult":
        env = base_env("CHECK")
    elif case == "gc":
        env = base_env("GC", CNI_CONTAINERID=None, CNI_IFNAME=None, CNI_NETNS=None)
    elif case == "status":
        env = base_env("STATUS", CNI_CONTAINERID=None, CNI_IFNAME=None, CNI_NETNS=None)
    p = same_as_python(real_bin, env, stdin, args)
    if case == "version-argument":
        assert p.stdout.startswith(b"vswitch-cni ")
    elif case not in ("gc",):
        assert p.returncode != 0


def test_stdin_over_16_mib_is_replayed_whole(real_bin, rec_bin, tmp_path):
    """The client keeps 16 MiB; the Python plugin still gets every byte (the tail decides)."""
    big = json.dumps(dict(conf(tmp_path), pad="x" * (MAX_PAYLOAD + 1000), cniVersion="9.8.7")).encode()
    assert len(big) > MAX_PAYLOAD
    p = same_as_python(real_bin, base_env("ADD"), big)
    assert b"9.8.7" in p.stdout                              # read from the end of stdin
    r = run(rec_bin / "vswitch", base_env("ADD"), big)
    assert r.returncode == 7
    rec = record_of(rec_bin)
    assert rec["stdin_len"] == len(big) and rec["stdin_sha"] == hashlib.sha256(big).hexdigest()


def test_fallback_hands_on_argv_environ_and_stdin_unchanged(rec_bin, tmp_path):
    stdin = json.dumps(conf(tmp_path)).encode() + b"\n  "
    env = base_env("ADD", WEIRD="a=b\tc\u00e9", EMPTY="")
    p = run(rec_bin / "vswitch", env, stdin)
    assert (p.returncode, p.stdout) == (7, b'{"recorder": true}\n')
    rec = record_of(rec_bin)
    assert rec["argv"] == [] and sorted(rec["env"]) == sorted(f"{k}={v}" for k, v in env.items())
    assert rec["stdin_sha"] == hashlib.sha256(stdin).hexdigest()
    (rec_bin / (build.FALLBACK_NAME + ".record")).unlink()
    p = run(rec_bin / "vswitch", env, stdin, args=("a", "--b"))    # at once, stdin not read
    assert p.returncode == 7 and record_of(rec_bin)["argv"] == ["a", "--b"]
    assert record_of(rec_bin)["stdin_sha"] == hashlib.sha256(stdin).hexdigest()


def test_fallback_restores_sigpipe_and_keeps_no_fd(rec_bin, tmp_path):
    """The client ignores SIGPIPE for itself; the Python plugin gets the runtime's
    disposition back (here: default), and no fd of the client (socket, memfd) leaks into
    it. /bin/sh inspects (Python would ignore SIGPIPE itself)."""
    exe(rec_bin / build.FALLBACK_NAME,
        "#!/bin/sh\ngrep ^SigIgn: /proc/self/status\nexec ls /proc/self/fd\n")
    p = run(rec_bin / "vswitch", base_env("ADD"), json.dumps(conf(tmp_path)).encode())
    lines = p.stdout.decode().split()
    assert int(lines[1], 16) & (1 << 12) == 0, lines         # bit 12: SIGPIPE (13)
    assert sorted(map(int, lines[2:])) == [0, 1, 2, 3]       # 3: ls's own directory fd


def test_no_python_plugin_beside_the_client_is_a_cni_error(client, tmp_path):
    d = tmp_path / "alone"
    d.mkdir()
    shutil.copy2(client, d / "vswitch")
    p = run(d / "vswitch", base_env("ADD"), json.dumps(dict(conf(tmp_path), cniVersion="0.4.0")).encode())
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out == {"cniVersion": "0.4.0", "code": 11,
                   "msg": f"vswitch CNI client: cannot start the Python plugin {d}/vswitch-py: "
                          f"No such file or directory"}


# ---------------------------------------------------------------- the scanner

def scan(client, doc):
    """The client's reading of ``doc``: ("socket", path, version or None) or ("fallback", why)."""
    p = subprocess.run([client, "--scan"], input=doc, capture_output=True, timeout=10)
    assert p.returncode == 0, p
    lines = p.stdout.decode().splitlines()
    if lines[0].startswith("fallback "):
        return ("fallback", lines[0][9:])
    assert lines[0].startswith("socket ") and len(lines) <= 2, lines
    version = lines[1][len("cniVersion "):] if len(lines) == 2 else None
    return ("socket", lines[0][7:], version)


def python_reading(doc):
    """What the client must answer for ``doc`` when it does not fall back (None: it must)."""
    try:
        obj = json.loads(doc)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    sock, ver = obj.get("socket", DEFAULT_SOCKET), obj.get("cniVersion")
    if not isinstance(sock, str) or (ver is not None and not isinstance(ver, str)):
        return None
    return ("socket", sock, ver)


EDGE_CASES = [
    # (document, expected: a reading, or "fallback")
    (b'{}', ("socket", DEFAULT_SOCKET, None)),
    (b' \r\n\t{ } \n', ("socket", DEFAULT_SOCKET, None)),
    (b'{"socket":"/a/b.sock","cniVersion":"1.0.0"}', ("socket", "/a/b.sock", "1.0.0")),
    (b'{"socket" : "\\/a\\/b" , "cniVersion" :"0.4.0"}', ("socket", "/a/b", "0.4.0")),
    (b'{"ipam":{"socket":"/nested"},"prevResult":{"socket":"/p","cniVersion":"9"}}',
     ("socket", DEFAULT_SOCKET, None)),
    (b'{"ipam":{"socket":"/nested"},"socket":"/top"}', ("socket", "/top", None)),
    (b'{"a":["socket",{"socket":"/x"}],"b":"\\"socket\\": \\"/y\\"","socket":"/z"}',
     ("socket", "/z", None)),
    (b'{"a":"\\\\","socket":"/after-backslash"}', ("socket", "/after-backslash", None)),
    (b'{"a":"\\u00e9\\ud83d\\ude00\\ud800","socket":"/s"}', ("socket", "/s", None)),
    (b'{"x":-0.5e+10,"y":[true,false,null,[],{}],"socket":"/n"}', ("socket", "/n", None)),
    ('{"socket":"/r\u00e9seau/\u6f22.sock"}'.encode(), ("socket", "/r\u00e9seau/\u6f22.sock", None)),
    (b'{"socket":"/' + b"s" * 106 + b'"}', ("socket", "/" + "s" * 106, None)),
    (b'{"socket":"/' + b"s" * 107 + b'"}', "fallback"),        # no room in sun_path
    (b'{"socket":"/a","socket":"/b"}', "fallback"),             # Python takes the last: never guess
    (b'{"cniVersion":"1.0.0","cniVersion":"0.4.0"}', "fallback"),
    (b'{"sock\\u0065t":"/escaped-key"}', "fallback"),
    (b'{"s\\/":"/x","socket":"/y"}', "fallback"),                # any escape in a top-level key
    (b'{"socket":"/a\\u0062"}', "fallback"),
    (b'{"socket":"/a\\nb"}', "fallback"),
    (b'{"socket":"/a\\u0000b"}', "fallback"),
    (b'{"socket":17}', "fallback"),
    (b'{"socket":null}', "fallback"),
    (b'{"socket":["/a"]}', "fallback"),
    (b'{"cniVersion":1.0}', "fallback"),
    (b'{"socket":"/a"} x', "fallback"),
    (b'{"socket":"/a"}{}', "fallback"),
    (b'{"socket":"/a",}', "fallback"),
    (b'{"a":NaN,"socket":"/a"}', "fallback"),                  # Python's json accepts NaN
    (b'{"a":01}', "fallback"),
    (b'{"a":1.}', "fallback"),
    (b'{"a":"\x01"}', "fallback"),
    (b'{"a":"\\x"}', "fallback"),
    (b'{"a":"\\u12g4"}', "fallback"),
    (b'{"a":"\xff"}', "fallback"),
    (b'{"a":"\xed\xa0\x80"}', "fallback"),                      # a UTF-8 surrogate
    (b'{"a":"\xc0\xaf"}', "fallback"),                          # overlong
    (b'\xef\xbb\xbf{"socket":"/bom"}', "fallback"),
    (b'["socket","/a"]', "fallback"),
    (b'"socket"', "fallback"),
    (b'', "fallback"),
    (b'{"a":' + b"[" * 600 + b"]" * 600 + b',"socket":"/deep"}', "fallback"),
    (b'{"a":' + b"[" * 400 + b"]" * 400 + b',"socket":"/deep"}', ("socket", "/deep", None)),
    (b'{"a":tru}', "fallback"),
    (b'{"a" "b"}', "fallback"),
    (b'{"a":"b"', "fallback"),
]


@pytest.mark.parametrize("doc, expected", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_scanner_edge_cases(client, doc, expected):
    got = scan(client, doc)
    if expected == "fallback":
        assert got[0] == "fallback", got
    else:
        assert got == expected
        assert python_reading(doc) == expected          # the expectation is Python's too


WS = ["", "", " ", "\n", "\t", "\r\n  ", "   "]
NESTED_KEYS = ["socket", "cniVersion", "ipam", "prevResult", "type", "a\"b", "s\\ocket",
               "\u00e9t\u00e9", "k\U0001f600", "", "socke", "sockets"]


def _ws(rng):
    return rng.choice(WS)


def _literal(rng, text, escapes):
    """``text`` as a JSON string literal; ``escapes``: also \\u-escape and \\/ at random."""
    out = ['"']
    for ch in text:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20:
            out.append(rng.choice(["\\u%04x" % o] + (["\\n"] if ch == "\n" else [])))
        elif ch == "/" and rng.random() < 0.4:
            out.append("\\/")
        elif escapes and rng.random() < 0.15:
            if o < 0x10000:
                out.append("\\u%04X" % o if rng.random() < 0.5 else "\\u%04x" % o)
            else:
                v = o - 0x10000
                out.append("\\u%04x\\u%04x" % (0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff)))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _text(rng):
    alphabet = "abc/._- \"\\\n\t\u00e9\u6f22\U0001f600\u2028"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _value(rng, depth):
    kind = rng.choice(["obj", "arr", "str", "str", "num", "lit"] if depth < 6 else ["str", "num", "lit"])
    if kind == "obj":
        members = []
        for _ in range(rng.randrange(0, 5)):
            key = rng.choice(NESTED_KEYS) if rng.random() < 0.7 else _text(rng)
            members.append(_ws(rng) + _literal(rng, key, True) + _ws(rng) + ":" + _ws(rng)
                           + _value(rng, depth + 1) + _ws(rng))
        return "{" + (",".join(members) if members else _ws(rng)) + "}"
    if kind == "arr":
        items = [_ws(rng) + _value(rng, depth + 1) + _ws(rng) for _ in range(rng.randrange(0, 4))]
        return "[" + (",".join(items) if items else _ws(rng)) + "]"
    if kind == "str":
        return _literal(rng, rng.choice(NESTED_KEYS + ["/nested.sock"]) if rng.random() < 0.3 else _text(rng), True)
    if kind == "num":
        return rng.choice(["0", "-0", "17", "-3.25", "1e5", "2.5E-3", "6.02e+23", "123456789012345678901234567890"])
    return rng.choice(["true", "false", "null"])


def generated_doc(rng):
    """A document whose top-level socket/cniVersion (if any) the client must find."""
    members = []
    names = set()
    for _ in range(rng.randrange(0, 6)):
        name = rng.choice(["ipam", "prevResult", "name", "type", "runtimeConfig", "args", "x/y",
                           "Socket", "socket ", "\u00e9"])
        if name not in names:
            names.add(name)
            members.append((name, _value(rng, 1)))
    if rng.random() < 0.7:
        path = "/" + "/".join(rng.choice(["run", "vswitch", "t\u00e9st", "a.sock", "x_y-z", "\u6f22"])
                              for _ in range(rng.randrange(1, 5)))
        members.append(("socket", _literal(rng, path, False)))
    if rng.random() < 0.6:
        members.append(("cniVersion", _literal(rng, rng.choice(["0.3.1", "0.4.0", "1.0.0", "1.1.0", "x/y", ""]), False)))
    rng.shuffle(members)
    body = ",".join(_ws(rng) + '"' + name + '"' + _ws(rng) + ":" + _ws(rng) + value + _ws(rng)
                    for name, value in members)
    return (_ws(rng) + "{" + (body or _ws(rng)) + "}" + _ws(rng)).encode()


def test_scanner_agrees_with_python_json_on_a_generated_corpus(client):
    rng = random.Random(20240917)
    nested_socket = 0
    for i in range(600):
        doc = generated_doc(rng)
        expected = python_reading(doc)
        assert expected is not None, doc            # the generator writes valid documents
        nested_socket += any(has_key(v, "socket") for v in json.loads(doc).values())
        assert scan(client, doc) == expected, (i, doc)
    assert nested_socket > 30                        # the corpus does hide nested "socket" keys


def has_key(value, key):
    if isinstance(value, dict):
        return key in value or any(has_key(v, key) for v in value.values())
    return isinstance(value, list) and any(has_key(v, key) for v in value)


def test_scanner_refuses_or_agrees_on_mutated_documents(client):
    """Cut, doubled or replaced bytes: the client falls back, or reads what Python reads;
    a document Python cannot read always falls back."""
    rng = random.Random(7)
    fell_back = agreed = 0
    for _ in range(800):
        doc = bytearray(generated_doc(rng))
        for _ in range(rng.randrange(1, 3)):
            at = rng.randrange(0, len(doc) + 1)
            op = rng.randrange(4)
            if op == 0:
                del doc[at:at + rng.randrange(1, 4)]
            elif op == 1:
                doc[at:at] = bytes([rng.choice(b'{}[]",:\\ /0e-nt\x00\xc3\xff')])
            elif op == 2 and at < len(doc):
                doc[at] = rng.randrange(256)
            else:
                doc = doc[:at]
        doc = bytes(doc)
        got = scan(client, doc)
        if got[0] == "fallback":
            fell_back += 1
        else:
            assert got == python_reading(doc), doc
            agreed += 1
    assert fell_back > 100 and agreed > 50


class Listener:
    """A unix socket that records whether anyone connected, and hangs up."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def test_the_connection_goes_to_the_top_level_socket_only(rec_bin, tmp_path):
    top, nested = Listener(tmp_path / "top.sock"), Listener(tmp_path / "nested.sock")
    try:
        doc = ('{"ipam": {"socket": "%s", "type": "host-local"}, "prevResult": {"socket": "%s"},'
               ' "socket" : "%s", "cniVersion": "1.0.0"}' % (nested.path, nested.path,
                                                             top.path.replace("/", "\\/")))
        p = run(rec_bin / "vswitch", base_env("ADD"), doc.encode())
        assert p.returncode == 7                  # hung up before the ok line: fallback
        assert (top.connections, nested.connections) == (1, 0)
        p = run(rec_bin / "vswitch", base_env("ADD"), doc.replace('"socket" :', '"sock\\u0065t":').encode())
        assert p.returncode == 7 and (top.connections, nested.connections) == (1, 0)
    finally:
        top.close()
        nested.close()


# ---------------------------------------------------------------- the frame protocol

# the frames as the reference client (thinclient.py) builds and reads them
recv_exact, read_frame, frame, entries = tc.recv_exact, tc.recv_frame, tc.frame, tc.env_block


class FakeDaemon:
    """vswitchd's side of cni_exec on ``path``, for one connection: checks the hello line,
    answers ``answer``; after a good answer reads 'I' (``env`` and ``stdin`` keep what it
    held) and runs ``script(self, conn)``. Errors raised in the thread are kept in
    ``error`` and raised again by :meth:`join`."""

    def __init__(self, path, script=None, answer=HELLO_OK):
        self.path, self.script, self.answer = str(path), script, answer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.sock.settimeout(30)
        self.hello = self.env = self.stdin = self.error = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(60)
                line = b""
                while not line.endswith(b"\n"):
                    line += recv_exact(conn, 1)
                self.hello = line
                conn.sendall(self.answer)
                if self.answer != HELLO_OK:
                    return
                kind, payload = read_frame(conn)
                assert kind == b"I", kind
                env_part, _, self.stdin = payload.partition(b"\0\0")
                self.env = [e.decode() for e in env_part.split(b"\0")]
                if self.script:
                    self.script(self, conn)
        except BaseException as exc:       # noqa: B902 (kept for the test thread)
            self.error = exc
        finally:
            self.sock.close()

    def join(self):
        self.thread.join(60)
        if self.error:
            raise self.error

    @staticmethod
    def run(conn, name, dirs, env, stdin=b""):
        """'R' then its 'D': (status, stdout, stderr)."""
        conn.sendall(frame(b"R", name.encode() + b"\0" + dirs.encode() + b"\0" + entries(env) + stdin))
        kind, payload = read_frame(conn)
        assert kind == b"D", kind
        status, out_len = struct.unpack(">iI", payload[:8])
        return status, payload[8:8 + out_len], payload[8 + out_len:]


def client_run(bin_dir, daemon_path, command="ADD", version="0.4.0", env_extra=None, preexec_fn=None,
               pass_fds=()):
    stdin = json.dumps({"cniVersion": version, "name": "n", "type": "vswitch",
                        "socket": str(daemon_path), "ipam": {"type": "host-local"}}).encode()
    env = base_env(command, **(env_extra or {}))
    p = subprocess.run([str(bin_dir / "vswitch")], env=env, input=stdin, capture_output=True,
                       timeout=120, preexec_fn=preexec_fn, pass_fds=pass_fds)
    return p, stdin, env


def exe(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_I_then_R_runs_host_local_and_O_E_X_finish(rec_bin, tmp_path):
    results = {}

    def script(d, conn):
        results["version"] = d.run(conn, "host-local", f"{tmp_path}/none::/usr/lib/cni",
                                   {"CNI_COMMAND": "VERSION"})
        results["missing"] = d.run(conn, "no-such-plugin", "/usr/lib/cni:/bin", {})
        results["slash"] = d.run(conn, "../bin/sh", "/usr/lib/cni", {})
        for kind, data in ((b"O", b"first "), (b"E", b"warn 1\n"), (b"O", b"second\n"),
                           (b"E", b""), (b"O", results["version"][1])):
            conn.sendall(frame(kind, data))
        conn.sendall(frame(b"X", struct.pack(">i", 3)))

    d = FakeDaemon(tmp_path / "d.sock", script)
    p, stdin, env = client_run(rec_bin, d.path)
    d.join()
    assert d.hello == HELLO
    assert sorted(d.env) == sorted(f"{k}={v}" for k, v in env.items()) and d.stdin == stdin
    status, out, err = results["version"]
    assert status == 0 and json.loads(out)["supportedVersions"] and err == b""
    assert results["missing"] == (-1002, b"", b"")
    assert results["slash"][0] == -1000 - 22
    assert p.returncode == 3
    assert p.stdout == b"first second\n" + out and p.stderr == b"warn 1\n"
    assert record_of(rec_bin) is None                  # no fallback


def test_R_statuses_stdin_and_big_outputs(rec_bin, tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    exe(tools / "killed", "#!/bin/sh\ncat\necho on-stderr >&2\nkill -TERM $$\n")
    exe(tools / "exit5", "#!/bin/sh\nexit 5\n")
    exe(tools / "mib", "#!/bin/sh\nhead -c 1048576 /dev/zero\nhead -c 70000 /dev/zero >&2\n")
    exe(tools / "flood", "#!/bin/sh\nexec cat /dev/zero\n")
    exe(tools / "noexec", "#!/bin/sh\n").chmod(0o644)
    exe(tools / "badinterp", "#!/nonexistent/interp\n")
    exe(tools / "sleeper-stdin", "#!/bin/sh\nexit 0\n")       # never reads its stdin
    results = {}

    def script(d, conn):
        r = lambda name, stdin=b"": d.run(conn, name, str(tools), {"PATH": "/usr/bin:/bin"}, stdin)  # noqa: E731
        results["killed"] = r("killed", b"in\x00put" * 1000)
        results["exit5"] = r("exit5")
        results["mib"] = r("mib")
        results["flood"] = r("flood")
        results["noexec"] = r("noexec")
        results["badinterp"] = r("badinterp")
        results["unread"] = r("sleeper-stdin", b"x" * (4 << 20))
        conn.sendall(frame(b"X", struct.pack(">i", 0)))

    d = FakeDaemon(tmp_path / "d.sock", script)
    p, _, _ = client_run(rec_bin, d.path)
    d.join()
    assert p.returncode == 0, p
    assert results["killed"] == (-15, b"in\x00put" * 1000, b"on-stderr\n")
    assert results["exit5"] == (5, b"", b"")
    status, out, err = results["mib"]
    assert (status, len(out), len(err)) == (0, 1 << 20, 70000) and set(out) == {0}
    status, out, err = results["flood"]
    assert (status, len(out)) == (-9, MAX_OUTPUT)       # killed at the cap, the frame still fits
    assert results["noexec"][0] == -1002                 # not executable: not a candidate
    assert results["badinterp"][0] == -1000 - 2          # found, exec failed: ENOENT
    assert results["unread"] == (0, b"", b"")            # EPIPE on its stdin is not an error


def test_R_child_has_only_its_pipes_default_signals_and_an_empty_mask(rec_bin, tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    # fds and the exec's environ (/proc/self/environ: Python adds LC_CTYPE) seen by Python; signal state by grep exec'd from /bin/sh (Python
    # would ignore SIGPIPE and SIGXFSZ itself)
    exe(tools / "inspect", f"#!{PYTHON} -IS\nimport os\n"
        "fds = [fd for fd in range(0, 1024) if fd > 2 and os.path.exists(f'/proc/self/fd/{fd}')]\n"
        "env = open('/proc/self/environ', 'rb').read().split(b'\\0')[:-1]\n"
        "print(fds, sorted(e.decode() for e in env))\n")
    exe(tools / "signals", "#!/bin/sh\nexec grep -E '^Sig(Blk|Ign):' /proc/self/status\n")
    results = {}

    def script(d, conn):
        results["inspect"] = d.run(conn, "inspect", str(tools), {"ONLY": "this", "A": "b=c"})
        results["signals"] = d.run(conn, "signals", str(tools), {})
        conn.sendall(frame(b"X", struct.pack(">i", 0)))

    leak_r, leak_w = os.pipe()            # an fd the client inherits: the child must not
    try:
        d = FakeDaemon(tmp_path / "d.sock", script)

        def block_and_ignore():
            import signal
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # the client must still reap
        p, _, _ = client_run(rec_bin, d.path, preexec_fn=block_and_ignore, pass_fds=(leak_w,))
        d.join()
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert p.returncode == 0, p
    status, out, err = results["inspect"]
    assert status == 0, err
    fds, environ = out.decode().split(" ", 1)
    assert fds == "[]" and eval(environ) == ["A=b=c", "ONLY=this"]
    status, out, err = results["signals"]
    assert status == 0 and out.decode().split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16], out


def lost_error(p, version, command, reason_part):
    assert p.returncode == 1, p
    out = json.loads(p.stdout)
    assert out["cniVersion"] == version and out["code"] == 11
    prefix = f"vswitch CNI client: lost vswitchd during {command}: "
    assert out["msg"].startswith(prefix) and reason_part in out["msg"], out
    return out


def test_a_daemon_gone_after_I_is_a_cni_error_not_a_fallback(rec_bin, tmp_path):
    d = FakeDaemon(tmp_path / "d.sock", lambda d, conn: None)     # closes after 'I'
    p, _, _ = client_run(rec_bin, d.path, command="DEL", version="0.4.0")
    d.join()
    lost_error(p, "0.4.0", "DEL", "connection closed by vswitchd")
    assert record_of(rec_bin) is None


def test_after_a_run_the_request_version_is_used_default_1_0_0(rec_bin, tmp_path):
    def script(d, conn):
        conn.sendall(frame(b"O", b"partial"))
    d = FakeDaemon(tmp_path / "d.sock", script)
    stdin = json.dumps({"socket": d.path}).encode()          # no cniVersion
    p = subprocess.run([str(rec_bin / "vswitch")], env=base_env("ADD"), input=stdin,
                       capture_output=True, timeout=60)
    d.join()
    assert p.stdout.startswith(b"partial")                   # what came before stays
    p2 = subprocess.CompletedProcess(p.args, p.returncode, p.stdout[len(b"partial"):], p.stderr)
    lost_error(p2, "1.0.0", "ADD", "connection closed")


@pytest.mark.parametrize("answer", [
    b'{"ok":false,"code":11,"msg":"too many cni_exec sessions"}\n',
    b'{"ok": false, "code": 4, "msg": "unknown op cni_exec"}\n',
    b'{"ok":true,"v":2}\n',
    b'{"ok": true, "v": 1}\n',                    # not byte for byte: never guessed
    b'{"ok":true,"v":1}',                         # no newline before the hang-up
    b"",
])
def test_a_refusing_or_odd_daemon_means_fallback(rec_bin, tmp_path, answer):
    d = FakeDaemon(tmp_path / "d.sock", answer=answer)
    p, stdin, _ = client_run(rec_bin, d.path)
    d.join()
    assert d.hello == HELLO
    assert (p.returncode, p.stdout) == (7, b'{"recorder": true}\n')
    assert record_of(rec_bin)["stdin_sha"] == hashlib.sha256(stdin).hexdigest()


@pytest.mark.parametrize("bad, reason", [
    (frame(b"O", b"x" * 100)[:50], "in the middle of frame 'O' of 100 bytes"),
    (b"O\x00\x00", "connection closed"),
    (b"O" + struct.pack(">I", MAX_PAYLOAD + 1), f"frame 'O' of {MAX_PAYLOAD + 1} bytes announced"),
    (b"R" + struct.pack(">I", 0xffffffff), "frame 'R' of 4294967295 bytes announced"),
    (frame(b"Z", b""), "unknown frame type 0x5a"),
    (frame(b"X", b"\x00\x00\x00"), "X frame of 3 bytes"),
    (frame(b"R", b"host-local\0/usr/lib/cni"), "R frame without the directories' NUL"),
    (frame(b"R", b"host-local\0/usr/lib/cni\0A=b\0"), "without the empty entry"),
])
def test_protocol_errors_after_I(rec_bin, tmp_path, bad, reason):
    def script(d, conn):
        conn.sendall(bad)
    d = FakeDaemon(tmp_path / "d.sock", script)
    # 64 MiB of address space: a 4 GiB frame announced must not be allocated, only refused
    limit = (64 << 20, 64 << 20)
    p, _, _ = client_run(rec_bin, d.path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, limit))
    d.join()
    lost_error(p, "0.4.0", "ADD", reason)
    assert record_of(rec_bin) is None
