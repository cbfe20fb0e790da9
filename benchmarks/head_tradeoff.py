"""Latency of flow-head designs against the backbone alone, side by side in one run (ONNX Runtime CPU).

    python benchmarks/head_tradeoff.py --iterations 200

Random weights (latency does not depend on them); Lite0 taps 4,10,15 at 256x256 grey, batch 1.
Each round times every model once, in turn, so load changes hit all of them alike.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

from inspectd.engines.model import ModelConfig, build_model

DESIGNS = {
    "fused 8x8, k3, hidden x1.0": dict(fusion="fused", kernel_size=3, hidden_ratio=1.0),
    "fused 8x8, k3, hidden x0.5": dict(fusion="fused", kernel_size=3, hidden_ratio=0.5),
    "fused 8x8, k3, hidden x0.4 (default)": dict(fusion="fused", kernel_size=3, hidden_ratio=0.4),
    "fused 8x8, k1, hidden x1.0": dict(fusion="fused", kernel_size=1, hidden_ratio=1.0),
    "separate 32/16/8, k3, hidden x0.5": dict(fusion="separate", kernel_size=3, hidden_ratio=0.5),
    "separate 32/16/8, k3, hidden x1.0": dict(fusion="separate", kernel_size=3, hidden_ratio=1.0),
}


class _Backbone(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.features(images)


def _session(module: torch.nn.Module, threads: int) -> ort.InferenceSession:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, 256, 256, 1, dtype=torch.uint8),), buf, dynamo=False,
                          opset_version=17, input_names=["images"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    sessions = {"backbone only (to block 15)": _session(_Backbone(build_model(ModelConfig())), args.threads)}
    for name, overrides in DESIGNS.items():
        sessions[name] = _session(build_model(ModelConfig(**overrides)), args.threads)
    x = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 1), dtype=np.uint8)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, {"images": x})
    for _ in range(args.iterations):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"images": x})
            times[name].append(time.perf_counter() - t)
    base = float(np.median(times["backbone only (to block 15)"]))
    print("| design | p50 ms | p99 ms | p50 / backbone p50 |\n|---|---|---|---|")
    for name, t in times.items():
        a = np.asarray(t) * 1000
        print(f"| {name} | {np.median(a):.2f} | {np.percentile(a, 99):.2f} | {np.median(a) / 1000 / base:.2f} |")


if __name__ == "__main__":
    main()
