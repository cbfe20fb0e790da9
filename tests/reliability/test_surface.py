"""Attack surface: the metrics endpoint and the verdict socket bind to 127.0.0.1 unless the config
says otherwise (checked on the real listening sockets in /proc/net/tcp), and the package contains
no pickle, eval/exec, shell=True or unsafe YAML/torch/numpy loading (allow-list justified below)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path


import inspectd
from inspectd.daemon.config import config_from_dict
from inspectd.daemon.metrics import Metrics
from inspectd.daemon.publish import Publisher

PACKAGE = Path(inspectd.__file__).parent


def _listening(port: int) -> set[str]:
    """Local addresses (IPv4 hex / IPv6 hex) of LISTEN sockets on `port`, from /proc/net/tcp{,6}."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                out.add(addr)
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}


def test_config_defaults_are_loopback() -> None:
    cfg = config_from_dict({"lines": [{"id": "L", "bundle": "/b", "threshold": 3.0,
                                       "source": {"type": "replay", "path": "/x"}}]})
    assert cfg.metrics.host == "127.0.0.1"
    assert cfg.zmq.endpoint.startswith("tcp://127.0.0.1:")
    assert cfg.zmq.curve is None


def test_default_metrics_endpoint_listens_on_loopback_only() -> None:
    server = Metrics().serve(port=0)  # the default host
    try:
        assert server.host == "127.0.0.1"
        assert _listening(server.port) and _listening(server.port) <= LOOPBACK, _listening(server.port)
    finally:
        server.shutdown()


def test_default_verdict_endpoint_listens_on_loopback_only() -> None:
    default = config_from_dict({"lines": [{"id": "L", "bundle": "/b", "threshold": 3.0,
                                           "source": {"type": "replay", "path": "/x"}}]}).zmq.endpoint
    endpoint = default.rsplit(":", 1)[0] + ":*"  # same host as the default, any free port
    pub = Publisher(endpoint, heartbeat_interval_s=1.0)
    pub.start()
    try:
        port = int(pub.bound_endpoint.rsplit(":", 1)[1])
        assert _listening(port) and _listening(port) <= LOOPBACK, _listening(port)
    finally:
        pub.stop()


# pattern -> what it catches; every match in the package fails the test unless allow-listed.
FORBIDDEN = {
    r"\bimport\s+(c?pickle|marshal|shelve|dill)\b|\bfrom\s+(c?pickle|marshal|shelve|dill)\b": "pickle-like loaders",
    r"(?<![\w.])eval\s*\(": "eval(",
    r"(?<![\w.])exec\s*\(": "exec(",
    r"shell\s*=\s*True": "shell=True",
    r"\bos\.(system|popen)\s*\(": "os.system / os.popen",
    r"allow_pickle\s*=\s*True": "numpy pickle loading",
    r"\byaml\.(load|load_all|unsafe_load|full_load)\s*\(": "YAML loading with a non-safe loader",
    r"\btorch\.load\s*\(": "torch.load (pickle unless weights_only=True)",
}
# (file relative to the package, pattern description) -> why it is safe.
ALLOWED = {
    ("daemon/config.py", "YAML loading with a non-safe loader"): "Loader=_UniqueKeyLoader, a yaml.SafeLoader subclass",
    ("engines/backbone.py", "torch.load (pickle unless weights_only=True)"): "weights_only=True: tensors only",
}


def _code_only(text: str) -> str:
    """The source with comments and strings blanked (docstrings mention pickle to say there is none)."""
    lines = [list(line) for line in text.splitlines(keepends=True)]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = lines[r - 1]
            lo = c0 if r == r0 else 0
            hi = c1 if r == r1 else len(row)
            for c in range(lo, min(hi, len(row))):
                if row[c] != "\n":
                    row[c] = " "
    return "".join("".join(row) for row in lines)


def test_no_pickle_eval_or_shell_in_the_package() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        code = _code_only(path.read_text(encoding="utf-8"))
        for pattern, what in FORBIDDEN.items():
            if re.search(pattern, code) and (rel, what) not in ALLOWED:
                found.append(f"{rel}: {what}")
    assert not found, found
    # The allow-listed uses really are the safe form.
    assert "Loader=_UniqueKeyLoader" in (PACKAGE / "daemon/config.py").read_text()
    assert "class _UniqueKeyLoader(yaml.SafeLoader)" in (PACKAGE / "daemon/config.py").read_text()
    backbone = (PACKAGE / "engines/backbone.py").read_text()
    assert all("weights_only=True" in line for line in backbone.splitlines() if "torch.load(" in line)


def test_the_scanner_catches_what_it_should() -> None:
    bad = "import pickle\nx = eval('1')\nsubprocess.run('ls', shell=True)\ntorch.load(p)\nyaml.load(t)\n"
    code = _code_only(bad)
    hits = {what for pattern, what in FORBIDDEN.items() if re.search(pattern, code)}
    assert {"pickle-like loaders", "eval(", "shell=True", "YAML loading with a non-safe loader",
            "torch.load (pickle unless weights_only=True)"} <= hits
    assert not any(re.search(p, _code_only('"""no pickle, no eval(x)"""\nm.eval()\n')) for p in FORBIDDEN)
