"""eval, check-engine and bench work on every method's bundle with no method-specific code: they
only see model.onnx and the manifest (and the torch backend rebuilds any method from weights.npz)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inspectd.cli import main
from inspectd.engines.bundle import load_bundle


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["cutpaste-ae", "inpaint", "vae", "classifier"])
def test_eval_check_engine_and_bench_on_every_method(method: str, tmp_path: Path, tiny_method_bundles: Any,
                                                      synthetic_parts: Any, capsys: pytest.CaptureFixture) -> None:
    path = tiny_method_bundles(method)
    bundle = load_bundle(path)
    assert bundle.manifest.method.name == method and bundle.manifest.flow is None

    assert main(["eval", "--bundle", str(path), "--good", str(synthetic_parts.test_good), "--bad",
                 str(synthetic_parts.test_bad), "--masks", str(synthetic_parts.masks), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    # Tiny engines (seconds of training on 40 parts): inpaint measured 0.729, cutpaste-ae 0.875, vae 0.715
    # (pixel 0.991).
    assert report["image_auroc"] >= 0.7 and report["pixel_auroc"] >= 0.6, report
    capsys.readouterr()

    # The torch backend rebuilds the method from the manifest + weights.npz and passes the parity gate.
    assert main(["check-engine", "--bundle", str(path), "--backend", "torch", "--option", "device=cpu", "--json"]) == 0
    gate = json.loads(capsys.readouterr().out)
    assert gate["passed"] and gate["max_score_diff"] <= 0.05

    assert main(["bench", "--bundle", str(path), "--backend", "onnxruntime", "--iterations", "5", "--warmup", "1",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    engine = [r for r in rows if r["name"].startswith("onnxruntime")]
    assert engine and all(r["p50_ms"] > 0 for r in engine)
