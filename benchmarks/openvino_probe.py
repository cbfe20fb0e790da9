"""OpenVINO on this CPU beside the product's ONNX Runtime FP32 engine: speed, accuracy and the parity
gate's figure for each precision, side by side in one run (issue 16: pick the runtime and precision
by measurement). A probe, not a backend: needs `pip install openvino` (not a dependency of inspectd).

    python benchmarks/openvino_probe.py --bundle B --split DIR [--rounds 3] [--iterations 60]

Engines (batch 1, 2 threads each, latency hint):
- `ort fp32`: the product's engine (OnnxRuntimeBackend with its defaults): the reference;
- `ov fp32` / `ov bf16` / `ov fp16`: model.onnx compiled by OpenVINO with that inference precision
  (bf16 runs on AMX / AVX-512 BF16 where the CPU has them; fp16, only on CPUs with AVX-512 FP16 or
  AMX-FP16, is the precision of the TensorRT FP16 engines a GPU line runs);
- `ort int8 R` / `ov int8 R`: every INT8 model of the bundle's engine cache that is valid here
  (`inspectd build-engine --backend onnxruntime --precision int8 --recipe R`: ONNX QDQ; looked up and
  loaded as the daemon does), run by either runtime (OpenVINO keeps the unquantised rest in FP32);
- `ov bf16 backbone + fp32 head` (flow bundles with a projection): model.onnx cut where the flow's
  input begins (the embedding the `centre0` projection reads), the backbone part compiled in BF16,
  the flow and map head in FP32, run one after the other.
Reported per engine: p50 per round and throughput / the reference's in the same round; image AUROC on
DIR/test_good vs DIR/test_bad (normalised as the bundle does; the dataset's standard split); the
largest normalised score difference from the reference on the bundle's golden images (the parity
gate's measure; its tolerance is 0.05).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inspectd.engines import preprocess
from inspectd.engines.bundle import load_bundle
from inspectd.engines.runtime import ort_int8
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import BackendUnavailable
from inspectd.stats import roc_auc

THREADS = 2


def _split_at_embedding(model_path: Path, folder: Path) -> tuple[Path, Path] | None:
    """model.onnx as (images -> embedding, embedding -> score + map), cut at the tensor the flow's
    projection (`centre0`) reads; None for a graph without one (another method, no projection)."""
    import onnx
    from onnx.utils import extract_model

    graph = onnx.load(str(model_path)).graph
    cut = next((n.input[0] for n in graph.node if n.op_type == "Sub" and list(n.input[1:]) == ["centre0"]), None)
    if cut is None:
        return None
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    extract_model(str(model_path), str(folder / "backbone.onnx"), inputs, [cut])
    extract_model(str(model_path), str(folder / "head.onnx"), [cut], outputs)
    return folder / "backbone.onnx", folder / "head.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True, help="folder with test_good/ and test_bad/")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=60)
    args = ap.parse_args()
    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("openvino_probe: needs OpenVINO (pip install openvino)") from None
    import onnxruntime as ort

    bundle = load_bundle(args.bundle)
    spec = bundle.input_spec
    good_files = preprocess.list_images(args.split / "test_good")
    bad_files = preprocess.list_images(args.split / "test_bad")
    test = [preprocess.load_prepared(p, spec)[None] for p in [*good_files, *bad_files]]
    golden = [preprocess.load_stored(p, spec)[None] for p in [*bundle.golden_images()[0], *bundle.golden_images()[1]]]
    core = ov.Core()

    def ov_compiled(path: Path, precision: str) -> Any:
        return core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": precision})

    def ov_engine(path: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
        request = ov_compiled(path, precision).create_infer_request()
        return lambda x: np.asarray(request.infer({0: x})[0]).reshape(-1)

    def scores_of(backend: OnnxRuntimeBackend) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: np.asarray(backend.infer(x)[0]).reshape(-1)

    backends = [OnnxRuntimeBackend(bundle, intra_op_threads=THREADS)]  # the reference
    engines: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "ort fp32 (product)": scores_of(backends[0]),
        "ov fp32": ov_engine(bundle.model_path, "f32"),
        "ov bf16": ov_engine(bundle.model_path, "bf16"),
    }
    if "FP16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # AVX512-FP16 / AMX-FP16 CPUs
        engines["ov fp16"] = ov_engine(bundle.model_path, "f16")
    with tempfile.TemporaryDirectory(prefix="ov-probe-") as tmp:  # read by compile_model only
        split = _split_at_embedding(bundle.model_path, Path(tmp))
        if split is not None:
            first = ov_compiled(split[0], "bf16").create_infer_request()
            second = ov_compiled(split[1], "f32").create_infer_request()
            engines["ov bf16 backbone + fp32 head"] = (
                lambda x: np.asarray(second.infer({0: first.infer({0: x})[0]})["score"]).reshape(-1))
    for recipe in ort_int8.RECIPES:  # the bundle's verified INT8 engines, as the daemon loads them
        try:
            path = ort_int8.cached_int8(bundle, recipe)
        except BackendUnavailable:
            continue  # not built (inspectd build-engine ... --precision int8 --recipe R), or stale
        backends.append(OnnxRuntimeBackend(bundle, intra_op_threads=THREADS, precision="int8", int8_recipe=recipe))
        engines[f"ort int8 {recipe}"] = scores_of(backends[-1])
        engines[f"ov int8 {recipe}"] = ov_engine(path, "f32")

    for run in engines.values():
        for x in golden[:2] * 5:
            run(x)
    scores = {k: np.concatenate([run(x) for x in test]) for k, run in engines.items()}
    gold = {k: np.concatenate([run(x) for x in golden]) for k, run in engines.items()}
    p50 = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, run in engines.items():
            t = []
            for i in range(args.iterations):
                x = test[i % len(test)]
                t0 = time.perf_counter()
                run(x)
                t.append((time.perf_counter() - t0) * 1e3)
            p50[k].append(float(np.median(t)))
    ref_key = "ort fp32 (product)"
    n_good = len(good_files)
    print(f"bundle {bundle.bundle_id} ({spec.height}x{spec.width}), {len(good_files)} good + {len(bad_files)} bad test "
          f"images, {len(golden)} golden, OpenVINO {ov.__version__}, ONNX Runtime {ort.__version__}")
    print("| engine | p50 ms per round | throughput / ort fp32 per round | image AUROC | max normalised score diff "
          "on golden (gate 0.05) |\n|---|---|---|---|---|")
    for k in engines:
        norm = bundle.normalize(scores[k])
        auroc = roc_auc(norm[:n_good], norm[n_good:])
        diff = float(np.max(np.abs(bundle.normalize(gold[k]) - bundle.normalize(gold[ref_key]))))
        ratios = [r / v for r, v in zip(p50[ref_key], p50[k])]
        print(f"| {k} | {' / '.join(f'{v:.1f}' for v in p50[k])} | {' / '.join(f'{r:.2f}' for r in ratios)} | "
              f"{auroc:.4f} | {diff:.4f} |")
    for backend in backends:
        backend.close()


if __name__ == "__main__":
    main()
