"""`inspectd check-config --engines`: before a (re)start, open every engine a line may run (its own
bundle and each of its recipes) as the daemon would — the line's backends in order, the parity gate
at the line's threshold — then time it on this machine and compare with the line's budget. So a
bundle that no backend accepts, or one too slow for the line, is found before parts are judged.
Where the config gives the line's frame rate, the engine's CPU per frame is held against the CPUs
this process may use too: a line that needs over half of them loses parts as soon as anything else
runs on the PC (benchmarks/RESULTS.md §29), though its engine answers well within the budget."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from inspectd.daemon.config import DaemonConfig, LineConfig
from inspectd.errors import InspectdError

CPU_TIMED_CALLS = 5
CPU_SHARE_LIMIT = 0.5  # of the usable CPUs; the same line as the InspectdCpuHeadroomLow alert


@dataclass(frozen=True)
class EngineCheck:
    line: str
    recipe: str
    level: int                    # logging.INFO (fits), WARNING or ERROR
    message: str                  # what was opened and measured, or why it cannot judge parts
    engine_ms: float | None = None

    def describe(self) -> str:
        return f"line {self.line}, recipe {self.recipe}: {self.message}"


def check_engines(config: DaemonConfig) -> list[EngineCheck]:
    """One EngineCheck per (line, recipe) of the config, in config order. Never raises for a bad
    bundle, threshold or backend: that is an ERROR check."""
    from inspectd.daemon.line import LineThreshold
    from inspectd.daemon.pipeline import default_backend_opener, engine_time_problem, time_engine, timing_frame
    from inspectd.daemon.recipes import config_specs
    from inspectd.daemon.run import line_settings, ort_lines
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.runtime.onnxruntime_backend import usable_cpus

    n_ort = ort_lines(config.lines)
    checks = []
    for cfg in config.lines:
        settings = line_settings(cfg, n_ort)
        for spec in config_specs(cfg).values():
            def check(level: int, message: str, engine_ms: float | None = None) -> None:
                checks.append(EngineCheck(cfg.id, spec.name, level, message, engine_ms))

            skipped: list[str] = []
            try:
                bundle = load_bundle(spec.bundle)
                threshold = LineThreshold.from_config(cfg.id, spec.threshold, bundle.bundle_id)
                backend, info = default_backend_opener(bundle, settings, lambda name, why: skipped.append(name),
                                                       threshold.value)
            except InspectdError as exc:
                check(logging.ERROR, f"cannot judge parts: {exc}")
                continue
            try:
                frame = timing_frame(bundle)
                engine_ms = time_engine(backend.infer, frame)
                cpu_ms = cpu_ms_per_frame(backend.infer, frame)
            except Exception as exc:  # whatever a backend raises: the line could not use it
                check(logging.ERROR, f"bundle {bundle.bundle_id} on {info.backend}: fails on its golden image: {exc}")
                continue
            finally:
                backend.close()
            opened = (f"bundle {bundle.bundle_id} on {info.backend}"
                      + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
            problem = engine_time_problem(engine_ms, settings.latency_budget_ms, settings.on_deadline_miss)
            level, said = (logging.INFO, f"{engine_ms:.1f} ms per frame, latency budget "
                                         f"{settings.latency_budget_ms:g} ms") if problem is None else problem
            cpu_level, cpu_said = cpu_share(cpu_ms, line_rate(cfg), usable_cpus())
            check(max(level, cpu_level), f"{opened}: {said}; {cpu_said}", engine_ms)
    return checks


def cpu_ms_per_frame(infer: Callable[[np.ndarray], Any], frame: np.ndarray) -> float:
    """The process's CPU time per call of a warm engine, in ms: all its threads (the engine's pool
    included), so only meaningful where nothing else of the process runs, as in this check."""
    start = time.process_time()
    for _ in range(CPU_TIMED_CALLS):
        infer(frame)
    return (time.process_time() - start) * 1000.0 / CPU_TIMED_CALLS


def line_rate(cfg: LineConfig) -> tuple[float, str] | None:
    """(frames per second, where the config says it) when the config fixes the line's rate: a
    camera's AcquisitionFrameRate feature or a replay's fps; None for a triggered or free camera."""
    source = cfg.source
    if source.type == "genicam":
        rate = source.features.get("AcquisitionFrameRate")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
            return float(rate), "source.features.AcquisitionFrameRate"
    elif source.type == "replay" and source.fps is not None:
        return float(source.fps), "source.fps"
    return None


def cpu_share(cpu_ms: float, rate: tuple[float, str] | None, usable: int) -> tuple[int, str]:
    """(logging level, what to say) of an engine costing `cpu_ms` of CPU per frame at the line's
    `rate` on `usable` CPUs: WARNING when the line alone needs over CPU_SHARE_LIMIT of them."""
    said = f"{cpu_ms:.0f} ms of CPU per frame"
    if rate is None:
        return logging.INFO, said + " (the config gives no frame rate to hold it against)"
    fps, where = rate
    need = fps * cpu_ms / 1000.0
    said += f", at {fps:g} fps ({where}) {need:.2f} of the {usable} CPUs this process may use"
    if need > CPU_SHARE_LIMIT * usable:
        return logging.WARNING, (said + f", over {CPU_SHARE_LIMIT:.0%}: any other busy program on this PC "
                                 f"will cost parts their verdict; run the line alone on it, give it more CPUs "
                                 f"(CPUAffinity=), lower the rate or deploy a cheaper bundle (inspectd train "
                                 f"--members 1 or a smaller --image-size)")
    return logging.INFO, said
