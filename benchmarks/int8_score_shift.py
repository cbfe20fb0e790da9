"""How an INT8 engine's normalised scores move against FP32, image by image: is the shift one
offset / scale a re-calibration of the INT8 engine could absorb, or per-image noise the parity gate
must refuse? (Issue 16; read-only apart from building the INT8 engine into the given bundle's cache.)

    python benchmarks/int8_score_shift.py --bundle B --split S [--count 60]

For the first --count images of S/test_good and of S/test_bad (prepared as the bundle prepares
frames): FP32 (model.onnx) and INT8 (the bundle's cached default-recipe engine, built if absent)
normalised scores; per set the mean / std of each, of the difference, its largest magnitude, the
correlation, and the residual of the best affine map INT8 -> FP32 fitted on that set (what a
per-engine re-normalisation could at best remove).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from inspectd.engines.bundle import load_bundle
from inspectd.engines.preprocess import list_images, load_prepared
from inspectd.engines.runtime import ort_int8
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--count", type=int, default=60)
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    int8_path, built = ort_int8.build_int8(bundle)  # the cached engine when it is still valid
    if built:
        print(f"built {int8_path}: {built}")
    # The engines as a line runs them (the INT8 one is the cached model build_int8 verified).
    engines = {"fp32": OnnxRuntimeBackend(bundle, intra_op_threads=1),
               "int8": OnnxRuntimeBackend(bundle, intra_op_threads=1, precision="int8")}
    for kind in ("test_good", "test_bad"):
        paths = list_images(args.split / kind)[: args.count]
        scores = {k: [] for k in engines}
        for p in paths:
            x = load_prepared(p, bundle.input_spec)[None]
            for k, engine in engines.items():
                scores[k].append(bundle.normalize(float(engine.infer(x)[0][0])))
        a, b = np.asarray(scores["fp32"]), np.asarray(scores["int8"])
        d = b - a
        fit = np.polyfit(b, a, 1)
        resid = a - np.polyval(fit, b)
        print(json.dumps({"set": kind, "n": len(paths), "engine_int8": Path(int8_path).name,
                          "fp32_mean": round(float(a.mean()), 3), "fp32_std": round(float(a.std()), 3),
                          "int8_mean": round(float(b.mean()), 3), "int8_std": round(float(b.std()), 3),
                          "diff_mean": round(float(d.mean()), 3), "diff_std": round(float(d.std()), 3),
                          "diff_max_abs": round(float(np.abs(d).max()), 3),
                          "correlation": round(float(np.corrcoef(a, b)[0, 1]), 4),
                          "affine_residual_std": round(float(resid.std()), 3),
                          "affine_residual_max_abs": round(float(np.abs(resid).max()), 3)}))


if __name__ == "__main__":
    main()
