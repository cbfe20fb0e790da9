"""The method interface: every method behind one registry, recorded in the manifest, options
validated with one-line errors, older bundles still load as flow bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inspectd.cli import main
from inspectd.engines import methods
from inspectd.engines.bundle import MANIFEST, load_bundle
from inspectd.engines.model import build_from_bundle

FAST = ["--image-size", "64", "--epochs", "1", "--views", "1", "--taps", "4"]


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_every_listed_method_implements_the_interface() -> None:
    assert methods.NAMES[0] == "flow" and set(methods.NAMES) == {"flow", "cutpaste-ae", "inpaint", "classifier",
                                                                    "vae"}
    for name in methods.NAMES:
        m = methods.get(name)
        assert m.name == name and m.default_epochs > 0 and m.summary
        for attr in ("parse_options", "options_dict", "fit", "build", "export"):
            assert callable(getattr(m, attr)), (name, attr)
        # Defaults parse, and round-trip through their JSON form (what the manifest records).
        opts = m.parse_options({})
        assert m.options_dict(m.parse_options(m.options_dict(opts))) == m.options_dict(opts)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get("nope")


def test_flow_bundle_records_its_method(tiny_bundle: Path) -> None:
    m = load_bundle(tiny_bundle).manifest
    assert m.method.name == "flow" and m.method.details["steps"] == 4
    assert m.flow is not None and m.flow.steps == 4 and m.backbone is not None
    assert m.training.config["method"] == "flow"


def test_a_bundle_from_before_methods_loads_as_flow(tmp_path: Path, tiny_bundle: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    raw = json.loads((old / MANIFEST).read_text())
    del raw["method"]
    raw["training"]["config"].pop("method")
    raw["training"]["config"].pop("options")
    (old / MANIFEST).write_text(json.dumps(raw))
    bundle = load_bundle(old)
    assert bundle.manifest.method.name == "flow"
    assert build_from_bundle(bundle).config.steps == 4  # the torch backend still rebuilds it


def test_unknown_method_is_a_usage_error(capsys, tmp_path, synthetic_parts) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"), "--method", "svm"])
    assert exc.value.code == 2 and "invalid choice: 'svm'" in capsys.readouterr().err


@pytest.mark.parametrize("method, option, message", [
    ("flow", "steps=3", "option 'steps' is not an option of method flow"),
    ("cutpaste-ae", "bogus=1", "option 'bogus' is not an option of method cutpaste-ae"),
    ("inpaint", "epochs=many", "option epochs='many': expected int for method inpaint"),
    ("inpaint", "novalue", "--option 'novalue': expected KEY=VALUE"),
    ("vae", "training=both", "option training='both': choose from decoupled, joint for method vae"),
])
def test_bad_method_options_are_one_line_usage_errors(capsys, tmp_path, synthetic_parts, method, option,
                                                       message) -> None:
    code, err = _run(capsys, "--good", str(synthetic_parts.train_good), "--out", str(tmp_path / "b"),
                     "--method", method, "--option", option, *FAST)
    assert code == 2 and message in err, err
    assert not (tmp_path / "b").exists()
