"""Every daemon config shipped in deploy/ (and the config snippets in the docs) is valid and safe:
verdicts and metrics bind loopback, or the verdict socket has CURVE on; no config fails open."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from inspectd.daemon.config import config_from_dict, config_warnings, endpoint_host, is_loopback

from tests.deploy.deployfiles import DEPLOY, REPO

DAEMON_CONFIGS = sorted(p for p in DEPLOY.rglob("*.y*ml")
                        if isinstance(yaml.safe_load(p.read_text()), dict) and "lines" in yaml.safe_load(p.read_text()))
DOCS = sorted([REPO / "README.md", DEPLOY / "README.md", *(REPO / "docs").glob("*.md")])


def test_the_examples_are_found() -> None:
    assert {p.name for p in DAEMON_CONFIGS} >= {"lines.example.yaml", "lines.replay.yaml"}


@pytest.mark.parametrize("path", DAEMON_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shipped_config_binds_loopback_or_uses_curve(path: Path) -> None:
    config = config_from_dict(yaml.safe_load(path.read_text()), source=str(path), base_dir=path.parent)
    host = endpoint_host(config.zmq.endpoint)
    assert host is None or is_loopback(host) or config.zmq.curve is not None, \
        f"{path}: zmq.endpoint {config.zmq.endpoint} is public without CURVE"
    assert is_loopback(config.metrics.host), f"{path}: metrics.host {config.metrics.host} is not loopback"
    assert config_warnings(config, str(path)) == []  # nothing fails open, nothing exposed
    for line in config.lines:
        assert line.on_deadline_miss == "NG"


def test_public_example_without_curve_would_be_caught(tmp_path: Path) -> None:
    text = (DEPLOY / "lines.example.yaml").read_text().replace('endpoint: "tcp://127.0.0.1:5555"',
                                                               'endpoint: "tcp://0.0.0.0:5555"')
    config = config_from_dict(yaml.safe_load(text), source="x.yaml")
    assert not is_loopback(endpoint_host(config.zmq.endpoint)) and config.zmq.curve is None
    assert any("zmq.endpoint" in w for w in config_warnings(config, "x.yaml"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_never_show_a_public_endpoint_without_curve(doc: Path) -> None:
    lines = doc.read_text().splitlines()
    for i, text in enumerate(lines):
        for host in re.findall(r"endpoint:\s*\"?tcp://([^:\s\"]+):", text):
            if not is_loopback(host):
                near = "\n".join(lines[i:i + 4])
                assert "curve:" in near, f"{doc}:{i + 1}: tcp://{host} shown without CURVE"
        assert "host: 0.0.0.0" not in text or "void" in text, f"{doc}:{i + 1}: suggests binding 0.0.0.0"
