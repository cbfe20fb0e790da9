"""ONNX Runtime INT8 engines (ort_int8.py): built by real ONNX Runtime static quantisation into the
bundle's engine cache, keyed by ONNX sha256 / precision / ONNX Runtime version / CPU features,
refused when corrupt, parity-gated before a line uses them; the CLI around them.

The bundle is a toy (test_runtime_toybundle) whose graph has a real convolution named like a
backbone's (`/backbone/_blocks.9/...`), so quantisation runs in about a second."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from inspectd.cli import main
from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.engines.preprocess import sha256_file
from inspectd.engines.runtime import open_backend, ort_int8
from inspectd.engines.runtime.engine_cache import StaleEngine
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.engines.runtime.parity import make_gate
from inspectd.errors import BackendUnavailable
from tests.engines.test_runtime_toybundle import TOY_POOL, TOY_SIZE, make_toy_bundle

pytest.importorskip("onnxruntime.quantization")


def conv_toy_onnx(loop: bool = False) -> bytes:
    """uint8 NHWC -> Conv `/backbone/_blocks.9/...` (1x1: grey/255 - 0.5) -> Clip -> AveragePool -> square
    = map, score = map max. With `loop`, the convolution runs inside an ONNX Loop (one trip), named
    without the backbone prefix, like the inpaint generator."""
    w = numpy_helper.from_array(np.full((1, 1, 1, 1), 1 / 255, np.float32), "w")
    b = numpy_helper.from_array(np.array([-0.5], np.float32), "b")
    pre = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
           helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2])]
    post = [helper.make_node("AveragePool", ["dev"], ["pooled"], kernel_shape=[TOY_POOL, TOY_POOL],
                             strides=[TOY_POOL, TOY_POOL], name="/head/pool"),
            helper.make_node("ReduceMean", ["pooled"], ["gray"], axes=[1], keepdims=0),
            helper.make_node("Mul", ["gray", "gray"], ["anomaly_map"], name="/head/square"),
            helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0)]
    clip_lo = numpy_helper.from_array(np.array(-1.0, np.float32), "lo")
    clip_hi = numpy_helper.from_array(np.array(1.0, np.float32), "hi")
    if not loop:
        mid = [helper.make_node("Conv", ["nchw", "w", "b"], ["c"], name="/backbone/_blocks.9/_project_conv/Conv"),
               helper.make_node("Clip", ["c", "lo", "hi"], ["dev"], name="/backbone/_blocks.9/act/Clip")]
        inits = [w, b, clip_lo, clip_hi]
    else:
        body = helper.make_graph(
            [helper.make_node("Conv", ["nchw", "w", "b"], ["c"], name="/gen/conv"),
             helper.make_node("Identity", ["cond_in"], ["cond_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
        trip = numpy_helper.from_array(np.array(1, np.int64), "trip")
        cond = numpy_helper.from_array(np.array(True), "cond")
        mid = [helper.make_node("Loop", ["trip", "cond"], ["cs"], body=body, name="/dyn/loop"),
               helper.make_node("Squeeze", ["cs", "ax0"], ["c"]),
               helper.make_node("Clip", ["c", "lo", "hi"], ["dev"], name="/dyn/act")]
        inits = [w, b, clip_lo, clip_hi, trip, cond, numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    graph = helper.make_graph(
        pre + mid + post, "conv-toy",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", TOY_SIZE, TOY_SIZE, 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT,
                                       ["N", TOY_SIZE // TOY_POOL, TOY_SIZE // TOY_POOL])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def conv_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("int8") / "toy", onnx_bytes=conv_toy_onnx())


@pytest.fixture()
def bundle(conv_toy: Path, tmp_path: Path) -> Bundle:
    path = tmp_path / "toy"
    shutil.copytree(conv_toy, path)
    return load_bundle(path)


def _store_as_int8(bundle: Bundle, data: bytes) -> Path:
    """Put `data` in the cache under this machine's INT8 key (verifiable, as build-engine would)."""
    return ort_int8.engine_cache(bundle).store(ort_int8.engine_key(bundle), data)


def test_build_caches_under_the_key_and_never_touches_model_onnx(bundle: Bundle) -> None:
    model_sha = sha256_file(bundle.model_path)
    path, why = ort_int8.build_int8(bundle)
    assert why is not None and path.parent == bundle.path / "engines" and path.suffix == ".onnx"
    assert sha256_file(bundle.model_path) == model_sha == bundle.manifest.model.sha256
    meta = json.loads(ort_int8.engine_cache(bundle).sidecar_path(ort_int8.engine_key(bundle)).read_text())
    key = meta["key"]
    import onnxruntime

    assert key["onnx_sha256"] == model_sha and key["precision"] == "int8"
    assert key["onnxruntime_version"] == onnxruntime.__version__ and key["cpu_features"] == ort_int8.cpu_features()
    assert meta["extra"]["quantized_nodes"] == 2 and meta["extra"]["op_types"] == ["Clip", "Conv"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised (QDQ)
    assert ort_int8.build_int8(bundle) == (path, None)  # verified and kept
    with OnnxRuntimeBackend(bundle, precision="int8") as backend:
        assert backend.describe()["precision"] == "int8" and backend.describe()["model"] == path.name
        assert not backend.is_reference
        scores, maps = backend.infer(np.full((1, TOY_SIZE, TOY_SIZE, 1), 128, np.uint8))
        assert scores.shape == (1,) and maps.shape == (1, TOY_SIZE // TOY_POOL, TOY_SIZE // TOY_POOL)
    with OnnxRuntimeBackend(bundle) as fp32:
        assert fp32.is_reference


def test_changed_ort_version_or_onnx_is_another_key_and_rebuilds(bundle: Bundle,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = ort_int8.build_int8(bundle)
    monkeypatch.setattr(ort_int8, "ort_version", lambda: "99.0.0")
    with pytest.raises(StaleEngine, match="no cached engine for ONNX Runtime 99.0.0"):
        OnnxRuntimeBackend(bundle, precision="int8")
    second, why = ort_int8.build_int8(bundle)
    assert second != first and "no cached engine" in why and "99.0.0" in second.name
    key = ort_int8.engine_key(bundle)
    from dataclasses import replace

    other = replace(key, onnx_sha256="cd" * 32)
    assert ort_int8.engine_cache(bundle).engine_path(other) != ort_int8.engine_cache(bundle).engine_path(key)
    # Another CPU (whatever this one has: CI machines differ): another key.
    other_cpu = "avx2" if key.cpu_features != "avx2" else "avx2,avx512f,avx512_vnni"
    assert replace(key, cpu_features=other_cpu).digest() != key.digest()
    # A model.onnx that no longer matches its manifest: refused before any cache lookup.
    bundle.model_path.write_bytes(bundle.model_path.read_bytes() + b"\0")
    with pytest.raises(BackendUnavailable, match="model.onnx changed"):
        ort_int8.cached_int8(bundle)


def test_corrupt_cached_model_is_refused_by_the_backend_and_rebuilt_by_build(bundle: Bundle) -> None:
    path, _ = ort_int8.build_int8(bundle)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StaleEngine, match="corrupt"):
        OnnxRuntimeBackend(bundle, precision="int8")
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(StaleEngine, match="truncated"):
        OnnxRuntimeBackend(bundle, precision="int8")
    rebuilt, why = ort_int8.build_int8(bundle)
    assert rebuilt == path and "truncated" in why
    with OnnxRuntimeBackend(bundle, precision="int8") as backend:
        assert backend.describe()["precision"] == "int8"


def _damaged(path: Path) -> bytes:
    """The quantised model with its weight scales multiplied by 8: loads and runs, scores wrong."""
    model = onnx.load(str(path))
    weights = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(i.name == n.input[0] and i.data_type == TensorProto.INT8 for i in model.graph.initializer)}
    assert weights
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 8, init.name))
    return model.SerializeToString()


def test_parity_gate_refuses_a_disagreeing_int8_model_and_the_line_falls_back(bundle: Bundle) -> None:
    path, _ = ort_int8.build_int8(bundle, calibration=bundle.path / "golden")
    _store_as_int8(bundle, _damaged(path))
    fallbacks: list[tuple[str, str]] = []
    # Only INT8 on the list: the line does not start, with the gate's reason.
    with pytest.raises(BackendUnavailable, match=r"no backend could serve.*max score diff"):
        open_backend(bundle, ["onnxruntime"], {"onnxruntime": {"precision": "int8"}},
                     gate=make_gate(bundle, threshold=5.0), on_fallback=lambda n, why: fallbacks.append((n, why)))
    assert fallbacks and fallbacks[0][0] == "onnxruntime" and "tolerance 0.05" in fallbacks[0][1]
    # TEST DOUBLE for a faithful INT8 model: the FP32 graph stored under the INT8 key passes the gate
    # and serves, reported as int8.
    _store_as_int8(bundle, bundle.model_path.read_bytes())
    reports = []
    backend, info = open_backend(bundle, ["onnxruntime"], {"onnxruntime": {"precision": "int8"}},
                                 gate=make_gate(bundle, threshold=5.0, on_report=reports.append))
    with backend:
        assert info.details["precision"] == "int8" and len(reports) == 1 and reports[0].passed


def test_a_graph_whose_network_is_inside_a_loop_is_refused_in_one_line(tmp_path: Path) -> None:
    bundle = load_bundle(make_toy_bundle(tmp_path / "loop", onnx_bytes=conv_toy_onnx(loop=True)))
    with pytest.raises(ort_int8.Int8Unavailable) as err:
        ort_int8.build_int8(bundle)
    msg = str(err.value)
    assert "\n" not in msg and "no backbone convolutions outside a Loop" in msg and "ONNX Loop" in msg
    assert not list((bundle.path / "engines").glob("*.onnx")) if (bundle.path / "engines").exists() else True
    assert main(["build-engine", "--bundle", str(bundle.path), "--backend", "onnxruntime",
                 "--precision", "int8"]) != 0


def test_a_full_disk_is_one_line_naming_where_and_the_bundle_is_left_as_it_was(
        conv_toy: Path, tiny_tmpfs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bundle on a real tmpfs that is full before the build: one line naming the engine cache,
    and not a file in the bundle's folder added or changed (ONNX Runtime's quantiser writes a
    shape-inferred copy beside the model it reads: it must read a copy elsewhere)."""
    from tests.helpers import fill_filesystem

    path = tiny_tmpfs / "toy"
    shutil.copytree(conv_toy, path)
    before = {p.relative_to(path): sha256_file(p) for p in path.rglob("*") if p.is_file()}
    fill_filesystem(tiny_tmpfs)
    rc = main(["build-engine", "--bundle", str(path), "--backend", "onnxruntime", "--precision", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("inspectd build-engine: error: ") and str(path) in err[-1], err
    assert "No space left on device" in err[-1]
    assert {p.relative_to(path): sha256_file(p) for p in path.rglob("*") if p.is_file()} == before


def test_cli_build_check_and_bench_with_int8(bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["build-engine", "--bundle", str(bundle.path), "--backend", "onnxruntime", "--precision", "int8",
               "--calibration", str(bundle.path / "golden")])
    out = capsys.readouterr().out
    assert "engine: " in out and "parity gate" in out and rc in (0, 1)
    # The gate by hand, on a model that agrees (stand-in, see above) and on one that does not.
    _store_as_int8(bundle, bundle.model_path.read_bytes())
    assert main(["check-engine", "--bundle", str(bundle.path), "--backend", "onnxruntime",
                 "--option", "precision=int8"]) == 0
    assert "PASS" in capsys.readouterr().out
    _store_as_int8(bundle, _damaged_from_build(bundle))
    assert main(["check-engine", "--bundle", str(bundle.path), "--backend", "onnxruntime",
                 "--precision", "int8"]) != 0
    assert "FAIL" in capsys.readouterr().out
    _store_as_int8(bundle, bundle.model_path.read_bytes())
    assert main(["bench", "--bundle", str(bundle.path), "--backend", "onnxruntime", "--iterations", "5",
                 "--warmup", "1", "--batch", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["name"], r["batch"]) for r in result["rows"]}
    assert {("onnxruntime", 1), ("onnxruntime int8", 1), ("onnxruntime", 2), ("onnxruntime int8", 2)} <= rows
    assert result["engines"]["onnxruntime int8"]["precision"] == "int8"


def _damaged_from_build(bundle: Bundle) -> bytes:
    path, _ = ort_int8.build_int8(bundle, calibration=bundle.path / "golden", force=True)
    return _damaged(path)


def test_daemon_config_takes_the_int8_option() -> None:
    from inspectd.daemon.config import config_from_dict

    line = {"id": "a", "source": {"type": "replay", "path": "/tmp"}, "bundle": "/tmp", "threshold": 3.0,
            "backends": ["onnxruntime"], "backend_options": {"onnxruntime": {"precision": "int8"}}}
    cfg = config_from_dict({"lines": [line]})
    assert cfg.lines[0].backend_options["onnxruntime"] == {"precision": "int8"}
    with pytest.raises(Exception, match="precision"):
        config_from_dict({"lines": [dict(line, backend_options={"onnxruntime": {"precision": "fp16"}})]})


def test_recipes_select_the_backbone_after_the_first_tap_and_never_the_head_or_a_loop() -> None:
    def conv(name: str) -> onnx.NodeProto:
        return helper.make_node("Conv", ["x", "w"], [name + "_out"], name=name)

    body = helper.make_graph([conv("/backbone/_blocks.9/_inside_loop/Conv")], "body", [], [])
    nodes = [conv("/backbone/_conv_stem/Conv"), conv("/backbone/_blocks.0/_depthwise_conv/Conv"),
             conv("/backbone/_blocks.4/_project_conv/Conv"), helper.make_node("Add", ["a", "b"], ["c"],
                                                                             name="/backbone/_blocks.5/Add"),
             conv("/backbone/_blocks.5/_expand_conv/Conv"), conv("/backbone/_blocks.15/_project_conv/Conv"),
             conv("/steps.0/subnet/conv1/Conv"), conv("/head/Conv"),
             helper.make_node("Loop", ["n", "c"], ["y"], body=body, name="/dyn/Loop")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    ops, late = ort_int8.select_nodes(model, "backbone-late", first_tap=4)
    assert late == ["/backbone/_blocks.5/Add", "/backbone/_blocks.5/_expand_conv/Conv",
                    "/backbone/_blocks.15/_project_conv/Conv"] and ops == ["Add", "Conv"]
    _, whole = ort_int8.select_nodes(model, "backbone")
    assert whole[0] == "/backbone/_conv_stem/Conv" and len(whole) == 6
    _, all_conv = ort_int8.select_nodes(model, "all-conv")
    assert "/steps.0/subnet/conv1/Conv" in all_conv and "/head/Conv" in all_conv
    for recipe in ("backbone-late", "backbone", "backbone-conv", "all-conv"):
        _, names = ort_int8.select_nodes(model, recipe, first_tap=4)
        assert not any("inside_loop" in n or n == "/dyn/Loop" for n in names)
        if recipe != "all-conv":
            assert not any(n.startswith(("/steps", "/head")) for n in names)
    assert ort_int8.select_nodes(model, "all") == (None, None)
