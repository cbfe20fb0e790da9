"""Engine latency of designs side by side in one run (ONNX Runtime CPU, batch 1, random weights),
with the first design's backbone alone as the floor the flow head adds to.

    python benchmarks/engine_latency.py --iterations 200 --rounds 3

Latency does not depend on trained weights, so each design is built from its ModelConfig and
exported; every round times each design once in turn (interleaved), so load changes hit all alike.
Several rounds are reported, not the best one. The first design is the reference for the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

from inspectd.engines.methods.flow import build_model
from inspectd.engines.model import ModelConfig
from inspectd.engines.runtime.onnxruntime_backend import session_options

DESIGNS = {
    "previous default (256x256, 4 coupling steps)": {"steps": 4, "components": 0, "members": 1},
    "one flow at 384x384 (MTD, the default before ensembles)": {"image_height": 384, "image_width": 384,
                                                                "members": 1},
    "default at 384x384 (MTD, 3 members)": {"image_height": 384, "image_width": 384},
    "one flow at 960x384 (KSDD, the default before ensembles)": {"image_height": 960, "image_width": 384,
                                                                 "members": 1},
    "default at 960x384 (KSDD, 3 members)": {"image_height": 960, "image_width": 384},
}


class _Backbone(torch.nn.Module):
    """The engine's frozen backbone alone, up to its last tap: what the flow head adds is measured against it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model.features(images)


def _input_shape(mc: ModelConfig) -> tuple[int, int, int, int]:
    return (1, mc.input_height, mc.input_width, 1 if mc.color_mode == "gray" else 3)


def _session(mc: ModelConfig, threads: int, backbone_only: bool = False, spin: bool = False) -> ort.InferenceSession:
    buf = io.BytesIO()
    model = build_model(mc).eval()
    module = _Backbone(model).eval() if backbone_only else model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(_input_shape(mc), dtype=torch.uint8),), buf,
                          dynamo=False, opset_version=17, input_names=["images"])
    # The product's session options (onnxruntime_backend.session_options), so the figures are the daemon's.
    return ort.InferenceSession(buf.getvalue(), session_options(ort, threads, spin), providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200, help="timed runs per design per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--spin", choices=("on", "off"), default="off",
                    help="pool threads sleep between operators (the product default) or spin inside a call "
                         "(a line's backend_options.onnxruntime.spin: true)")
    ap.add_argument("--designs", default=None, help="JSON {name: ModelConfig overrides} (default: built-in)")
    args = ap.parse_args()
    designs = json.loads(args.designs) if args.designs else DESIGNS
    configs = {name: ModelConfig(**o) for name, o in designs.items()}
    ref = next(iter(designs))
    spin = args.spin == "on"
    sessions = {name: _session(mc, args.threads, spin=spin) for name, mc in configs.items()}
    backbone = f"backbone only (input of {ref!r})"
    sessions[backbone] = _session(configs[ref], args.threads, backbone_only=True, spin=spin)
    configs[backbone] = configs[ref]
    inputs = {name: np.random.default_rng(0).integers(0, 256, _input_shape(mc), np.uint8)
              for name, mc in configs.items()}
    print(f"{args.threads} intra-op threads, spin {args.spin}, batch 1; ratio = p99 / p99 of {ref!r} in the same round")
    print("| round | design | p50 ms | p99 ms | p99 ratio |\n|---|---|---|---|---|")
    for r in range(args.rounds):
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for name, s in sessions.items():
            for _ in range(10):
                s.run(None, {"images": inputs[name]})
        for _ in range(args.iterations):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"images": inputs[name]})
                times[name].append(time.perf_counter() - t)
        p99_ref = float(np.percentile(times[ref], 99))
        for name, t in times.items():
            a = np.asarray(t) * 1000
            print(f"| {r + 1} | {name} | {np.median(a):.2f} | {np.percentile(a, 99):.2f} | "
                  f"{np.percentile(a, 99) / 1000 / p99_ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()
