"""`inspectd build-engine`, `check-engine` and `bench`: engine building, the parity gate by
hand, and the side-by-side latency benchmark. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any

from inspectd.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("build-engine",
                              help="build a TensorRT engine for this GPU, or an ONNX Runtime INT8 model for this "
                                   "CPU, into the bundle's engine cache (model.onnx is never replaced)")
    p.add_argument("--bundle", required=True, help="model bundle directory")
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="tensorrt",
                   help="tensorrt (default) or onnxruntime (CPU static INT8 quantisation, --precision int8)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default=None,
                   help="tensorrt: default fp16; onnxruntime: int8 (the only precision it caches)")
    p.add_argument("--calibration", default=None, metavar="DIR", dest="calib_images",
                   help="folder of good images for INT8 calibration (default: the bundle's calibration images)")
    p.add_argument("--recipe", default=None, help="onnxruntime int8: which nodes to quantise (backbone-late = default, backbone, "
                                                  "backbone-conv, all-conv, all)")
    p.add_argument("--force", action="store_true", help="onnxruntime int8: rebuild even if a verified one is cached")
    p.add_argument("--workspace", type=int, default=1024, metavar="MB", help="builder workspace limit (MB)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engine accepts (profile max)")
    p.add_argument("--calib-images", default=None, metavar="DIR", dest="calib_images", help=argparse.SUPPRESS)
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.set_defaults(func=_build_engine)

    p = subparsers.add_parser("check-engine", help="run the parity gate: a backend vs ONNX Runtime CPU on the "
                                                   "bundle's golden images")
    p.add_argument("--bundle", required=True)
    p.add_argument("--backend", required=True, help="backend to check (tensorrt, torch, onnxruntime)")
    p.add_argument("--threshold", type=float, default=None, help="line threshold (normalized score) for the "
                                                                 "OK/NG comparison")
    p.add_argument("--tolerance", type=float, default=None, help="max |normalized score diff| (default 0.05)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, e.g. precision=int8, device=cpu (repeatable)")
    p.add_argument("--precision", default=None, help="shorthand for --option precision=... (e.g. int8)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_check_engine)

    p = subparsers.add_parser("bench", help="latency of each available backend side by side, plus preprocessing")
    p.add_argument("--bundle", required=True)
    p.add_argument("--backend", action="append", default=None, metavar="NAME",
                   help="backend to measure (repeatable; default: every known backend that runs here)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="second batch size measured besides batch 1")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0 = the daemon's default for the usable CPUs)")
    p.add_argument("--frame", default=None, metavar="WxH",
                   help="decoded camera frame size for the preprocessing timing (default: the size the bundle "
                        "was trained on when all its images had one, else 1280x1024)")
    p.add_argument("--rate", type=float, default=None, metavar="FPS",
                   help="also time batch-1 calls started FPS times a second, as the line's frames arrive "
                        "(a CPU idle between frames can answer slower than back to back); takes "
                        "iterations / FPS seconds per backend")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_bench)


def parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values that parse as JSON (numbers, true/false) are typed."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_frame(text: str) -> tuple[int, int]:
    """'1280x1024' -> (1280, 1024)."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise ConfigError(f"--frame {text!r} is not WIDTHxHEIGHT with positive sizes")
    return size


def _build_engine(args: argparse.Namespace) -> int:
    from inspectd.engines.bundle import load_bundle

    if args.backend == "onnxruntime":
        return _build_ort_int8(args)
    from inspectd.engines.runtime.tensorrt_backend import build_engine

    if args.recipe is not None or args.force:
        raise ConfigError("--recipe and --force apply to --backend onnxruntime only")
    args.precision = args.precision or "fp16"
    if args.workspace < 1 or args.max_batch < 1:
        raise ConfigError("--workspace and --max-batch must be >= 1")
    bundle = load_bundle(args.bundle)
    path = build_engine(bundle, precision=args.precision, workspace_mb=args.workspace,
                        calib_images=args.calib_images, max_batch=args.max_batch, device=args.device)
    print(f"engine: {path}")
    return 0


def _build_ort_int8(args: argparse.Namespace) -> int:
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.runtime import ort_int8
    from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from inspectd.engines.runtime.parity import ParityError, parity_gate

    if (args.precision or "int8") != "int8":
        raise ConfigError(f"--backend onnxruntime builds int8 engines only (FP32 is model.onnx itself), "
                          f"not {args.precision}")
    recipe = args.recipe or ort_int8.DEFAULT_RECIPE
    if recipe not in ort_int8.RECIPES:
        raise ConfigError(f"--recipe {recipe!r} is not one of {', '.join(ort_int8.RECIPES)}")
    bundle = load_bundle(args.bundle)
    path, why = ort_int8.build_int8(bundle, calibration=args.calib_images, recipe=recipe, force=args.force)
    print(f"engine: {path}" + (f" (built: {why})" if why else " (cached, verified)"))
    # The gate the daemon will run before using it, shown now: a failing engine is kept for
    # inspection but no line will use it.
    with OnnxRuntimeBackend(bundle, precision="int8", int8_recipe=recipe) as backend:
        try:
            report = parity_gate(backend, bundle)
            print(f"parity gate PASS: {report.summary()}")
        except ParityError as exc:
            print(f"parity gate FAIL (lines will not use this engine): {exc}")
            return 1
    return 0


def _check_engine(args: argparse.Namespace) -> int:
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.runtime import backend_class
    from inspectd.engines.runtime.parity import SCORE_TOLERANCE, ParityError, parity_gate

    tolerance = SCORE_TOLERANCE if args.tolerance is None else args.tolerance
    if not tolerance > 0:
        raise ConfigError(f"--tolerance must be > 0, got {args.tolerance}")
    options = parse_options(args.option)
    if args.precision is not None:
        options["precision"] = args.precision
    bundle = load_bundle(args.bundle)
    cls = backend_class(args.backend) if not (args.backend == "torch" and options.get("device") == "cpu") \
        else _torch_cpu_class()
    try:
        inspect.signature(cls).bind(bundle, **options)
    except TypeError as exc:
        raise ConfigError(f"--option for backend {args.backend}: {exc}") from None
    backend = cls(bundle, **options)
    try:
        report = parity_gate(backend, bundle, threshold=args.threshold, tolerance=tolerance)
    except ParityError as exc:
        if exc.report is not None and exc.report.rows:
            print(json.dumps(exc.report.as_dict(), indent=2) if args.json else exc.report.table())
        raise
    finally:
        backend.close()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0


def _torch_cpu_class() -> Any:
    # The factory refuses torch without CUDA (not a line configuration); by hand, CPU is allowed.
    from inspectd.engines.runtime.torch_backend import TorchBackend, unavailable_reason
    from inspectd.errors import BackendUnavailable

    reason = unavailable_reason("cpu")
    if reason:
        raise BackendUnavailable(reason)
    return TorchBackend


def _bench(args: argparse.Namespace) -> int:
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.runtime.bench import run_bench

    if args.iterations < 1 or args.batch < 1 or args.warmup < 0 or args.threads < 0:
        raise ConfigError("--iterations and --batch must be >= 1, --warmup and --threads >= 0")
    bundle = load_bundle(args.bundle)
    options = {"onnxruntime": {"threads": args.threads}} if args.threads else {}
    result = run_bench(bundle, backends=args.backend, iterations=args.iterations, batch=args.batch,
                       warmup=args.warmup, options=options,
                       frame_size=parse_frame(args.frame) if args.frame else None, rate=args.rate)
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(result.table())
    return 0
