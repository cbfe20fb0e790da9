"""ONNX Runtime intra-op threads follow the CPUs the process may use (os.sched_getaffinity), are
shared between the daemon's lines, and can be set per line (backend_options.onnxruntime.intra_op_threads).
Real ONNX Runtime on the toy bundle; the affinity is really restricted, in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.daemon.config import config_from_dict
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime.onnxruntime_backend import (OnnxRuntimeBackend, default_intra_op_threads,
                                                          thread_budget)
from tests.engines.test_runtime_toybundle import make_toy_bundle

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API")


@needs_affinity
def test_default_threads_follow_the_affinity_mask_not_the_machine(tmp_path: Path) -> None:
    bundle = make_toy_bundle(tmp_path / "toy")
    cpu = sorted(os.sched_getaffinity(0))[0]
    code = (
        "import os, sys\n"
        f"os.sched_setaffinity(0, {{{cpu}}})\n"  # like taskset / systemd CPUAffinity=
        "from inspectd.engines.bundle import load_bundle\n"
        "from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend\n"
        f"b = OnnxRuntimeBackend(load_bundle({str(bundle)!r}))\n"
        "print(b.describe()['intra_op_threads'], os.cpu_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    threads, cpu_count = map(int, out.stdout.split())
    assert threads == 1, (threads, cpu_count)  # one usable CPU, whatever the machine has


def test_lines_share_the_usable_cpus_and_a_line_may_set_its_own(tmp_path: Path) -> None:
    from inspectd.daemon.run import line_settings

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    line = {"source": {"type": "replay", "path": str(tmp_path)}, "bundle": str(tmp_path), "threshold": 3.0,
            "backends": ["onnxruntime"]}
    cfg = config_from_dict({"lines": [dict(line, id="a"), dict(line, id="b"),
                                      dict(line, id="c", backend_options={"onnxruntime": {"intra_op_threads": 3}})]})
    share = [line_settings(c, ort_lines=3).backend_options["onnxruntime"]["intra_op_threads"] for c in cfg.lines]
    assert share[:2] == [thread_budget(usable, 3)] * 2 == [default_intra_op_threads(3)] * 2
    assert share[2] == 3  # set in the config: kept
    one = line_settings(cfg.lines[0], ort_lines=1).backend_options["onnxruntime"]["intra_op_threads"]
    assert one == thread_budget(usable)
    # And the backend uses what it is given.
    with OnnxRuntimeBackend(load_bundle(make_toy_bundle(tmp_path / "toy")), intra_op_threads=1) as backend:
        assert backend.describe()["intra_op_threads"] == 1


def test_thread_budget_leaves_a_core_to_the_daemon_from_three_cores() -> None:
    assert [thread_budget(n) for n in (1, 2, 3, 4, 8, 16)] == [1, 2, 2, 3, 7, 15]
    assert thread_budget(8, lines_sharing=2) == 3 and thread_budget(2, lines_sharing=4) == 1
    assert thread_budget(0) == 1  # never zero threads


@needs_affinity
@pytest.mark.parametrize("n_cpus", [1, 3])
def test_thread_budget_honours_a_restricted_affinity_in_the_daemon_settings(tmp_path: Path, n_cpus: int) -> None:
    """In a child process restricted to n CPUs (like taskset / CPUAffinity=): the line's default
    engine threads follow the budget for n, not for the machine; a line's own setting is kept."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n_cpus:
        pytest.skip(f"needs {n_cpus} usable CPUs, this process has {len(cpus)}")
    code = (
        "import os, json\n"
        f"os.sched_setaffinity(0, {set(cpus[:n_cpus])!r})\n"
        "from inspectd.daemon.config import config_from_dict\n"
        "from inspectd.daemon.run import line_settings\n"
        f"line = {{'source': {{'type': 'replay', 'path': {str(tmp_path)!r}}}, 'bundle': {str(tmp_path)!r},\n"
        "        'threshold': 3.0, 'backends': ['onnxruntime']}\n"
        "cfg = config_from_dict({'lines': [dict(line, id='a'),\n"
        "    dict(line, id='b', backend_options={'onnxruntime': {'intra_op_threads': 5}})]})\n"
        "print(json.dumps([line_settings(c).backend_options['onnxruntime']['intra_op_threads'] for c in cfg.lines]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout) == [thread_budget(n_cpus), 5]


def _matmul_chain() -> bytes:
    """A graph of 40 MatMul + Relu pairs on 64 x 256 tensors: enough operators for ONNX Runtime's
    pool threads to work in every call, small enough to build and run in milliseconds."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, prev = [], [], "x"
    for i in range(40):
        weights.append(numpy_helper.from_array((rng.standard_normal((256, 256)) * 0.05).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [64, 256])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _idle_cpu_ms_after_calls(options: object) -> float:
    """Median CPU time (ms, all threads of this process) used in the 200 ms after a call returns."""
    import statistics
    import time

    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(_matmul_chain(), sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    idle = []
    for _ in range(5):
        session.run(None, {"x": x})
        cpu = time.process_time()
        time.sleep(0.2)
        idle.append((time.process_time() - cpu) * 1000)
    return statistics.median(idle)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs 2 usable CPUs for a pool thread")
def test_engine_threads_hold_no_core_between_parts() -> None:
    """The product's sessions, also a line's that asks to spin between the operators of a call, do
    not spin after it: a line's acquisition and publisher threads get the cores back as soon as the
    engine answers. Control: ONNX Runtime's own default (spinning goes on after the call) is seen by
    the same measure."""
    import onnxruntime as ort

    from inspectd.engines.runtime.onnxruntime_backend import session_options

    for spin in (False, True):
        product = _idle_cpu_ms_after_calls(session_options(ort, 2, spin))
        assert product < 5.0, f"spin {spin}: {product:.1f} ms of CPU in the 200 ms after a call"
    own_default = ort.SessionOptions()
    own_default.intra_op_num_threads = 2
    spinning = _idle_cpu_ms_after_calls(own_default)
    assert spinning > 10.0, f"the control did not spin after the call ({spinning:.1f} ms)"


def test_engines_sleep_between_operators_unless_a_line_asks_to_spin(tmp_path: Path) -> None:
    """Spinning engine threads that lose a CPU to any other process wait for each other: the camera
    line gave most parts the fail-safe verdict beside one busy process (tests/daemon/test_run.py,
    RESULTS.md §23). So no engine spins unless its line says so, whatever the CPUs."""
    from inspectd.daemon.run import line_settings, ort_lines
    from inspectd.errors import ConfigError

    bundle = load_bundle(make_toy_bundle(tmp_path / "toy"))
    line = {"source": {"type": "replay", "path": str(tmp_path)}, "bundle": str(tmp_path), "threshold": 3.0,
            "backends": ["onnxruntime"]}

    def backend_kwargs(lines: list[dict]) -> list[dict]:
        cfg = config_from_dict({"lines": lines})
        return [line_settings(c, ort_lines(cfg.lines)).backend_options["onnxruntime"] for c in cfg.lines]

    def spinning(**kwargs: object) -> bool:
        with OnnxRuntimeBackend(bundle, **kwargs) as backend:
            opts = backend._session.get_session_options()
            assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
            spin = opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
            assert backend.describe()["spin"] is spin
            return spin

    # One line alone on the box, on its default threads: its engine sleeps.
    (alone,) = backend_kwargs([dict(line, id="a")])
    assert "spin" not in alone and not spinning(**alone)
    assert not spinning()  # the CLIs' sessions (eval, calibrate, bench) alike
    # A line may ask; what it sets reaches its engine, either way.
    asked = backend_kwargs([dict(line, id="a", backend_options={"onnxruntime": {"spin": True}}),
                            dict(line, id="b", backend_options={"onnxruntime": {"spin": False}})])
    assert [spinning(**kw) for kw in asked] == [True, False]
    with pytest.raises(ConfigError, match="spin"):
        config_from_dict({"lines": [dict(line, id="c", backend_options={"onnxruntime": {"spin": "sometimes"}})]})
    with pytest.raises(ConfigError, match="spin must be true or false"):
        OnnxRuntimeBackend(bundle, spin="yes")
