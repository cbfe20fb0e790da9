"""Every benchmark script still imports: the names it takes from inspectd (and from its sibling
scripts) exist. A product change that renames or removes one must mend the benchmark too, or the
figures in benchmarks/RESULTS.md can no longer be reproduced with their commands. (Importing only:
each script's work sits behind `if __name__ == "__main__"`.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LIBRARIES = {"datasets.py", "baselines.py"}  # imported by the scripts, no command of their own


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their siblings by name
    name = f"_benchmark_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    if script not in LIBRARIES:
        assert callable(getattr(module, "main", None)), f"{script}: no main() to run"
