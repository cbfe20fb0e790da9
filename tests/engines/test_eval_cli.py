"""`inspectd eval` through ONNX Runtime: the report files and their numbers."""

from __future__ import annotations

import csv
import json

from inspectd.cli import main


def test_eval_writes_report_csv_plots_and_overlays(capsys, tmp_path, tiny_bundle, synthetic_parts):
    out = tmp_path / "report"
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(synthetic_parts.test_good),
                 "--bad", str(synthetic_parts.test_bad), "--masks", str(synthetic_parts.masks), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["n_good"] == 12 and report["n_bad"] == 12 and report["skipped"] == 0
    assert report["image_auroc"] >= 0.9 and 0.5 < report["pixel_auroc"] <= 1.0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 24 and {r["label"] for r in rows} == {"good", "bad"}
    assert (out / "roc.png").stat().st_size > 0 and (out / "histogram.png").stat().st_size > 0
    assert len(list((out / "overlays").glob("worst-good-*.png"))) == 5
    assert len(list((out / "overlays").glob("best-bad-*.png"))) == 5


def test_eval_refuses_an_empty_folder(capsys, tmp_path, tiny_bundle, synthetic_parts):
    (tmp_path / "empty").mkdir()
    code = main(["eval", "--bundle", str(tiny_bundle), "--good", str(tmp_path / "empty"),
                 "--bad", str(synthetic_parts.test_bad), "--out", str(tmp_path / "r")])
    assert code == 1 and "at least one image in each of --good and --bad" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
