"""`inspectd check-config --engines`: before a (re)start, open every engine a line may run (its own
bundle and each of its recipes) as the daemon would — the line's backends in order, the parity gate
at the line's threshold — then time it on this machine and compare with the line's budget. So a
bundle that no backend accepts, or one too slow for the line, is found before parts are judged."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from inspectd.daemon.config import DaemonConfig
from inspectd.errors import InspectdError


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
                engine_ms = time_engine(backend.infer, timing_frame(bundle))
            except Exception as exc:  # whatever a backend raises: the line could not use it
                check(logging.ERROR, f"bundle {bundle.bundle_id} on {info.backend}: fails on its golden image: {exc}")
                continue
            finally:
                backend.close()
            opened = (f"bundle {bundle.bundle_id} on {info.backend}"
                      + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
            problem = engine_time_problem(engine_ms, settings.latency_budget_ms, settings.on_deadline_miss)
            if problem is None:
                check(logging.INFO, f"{opened}: {engine_ms:.1f} ms per frame, latency budget "
                                    f"{settings.latency_budget_ms:g} ms", engine_ms)
            else:
                check(problem[0], f"{opened}: {problem[1]}", engine_ms)
    return checks
