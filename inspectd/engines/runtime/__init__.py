"""Runtime backends behind one interface, and the factory that picks one for a line.

One backend, one file: onnxruntime_backend.py (reference), tensorrt_backend.py (TensorRT 10+
with pycuda), torch_backend.py (PyTorch on CUDA, training extra). A backend module exposes
`unavailable_reason() -> str | None` and a `Backend` subclass.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from inspectd.engines.bundle import Bundle
from inspectd.engines.runtime.base import Backend, InputShapeError
from inspectd.errors import BackendUnavailable, ConfigError, InspectdError

log = logging.getLogger("inspectd.runtime")

REFERENCE = "onnxruntime"
DEFAULT_PREFERENCE = ("tensorrt", "onnxruntime")
# name -> (module, class name); modules are imported only when a line asks for them.
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("inspectd.engines.runtime.onnxruntime_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("inspectd.engines.runtime.tensorrt_backend", "TensorRTBackend"),
    "torch": ("inspectd.engines.runtime.torch_backend", "TorchBackend"),
}

__all__ = ["Backend", "InputShapeError", "EngineInfo", "BACKENDS", "DEFAULT_PREFERENCE", "REFERENCE",
           "backend_class", "open_backend"]


@dataclass
class EngineInfo:
    """Which backend serves a line, and why each one before it was skipped."""

    backend: str
    details: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "details": self.details, "skipped": dict(self.skipped)}


def backend_class(name: str) -> type[Backend]:
    """The Backend class for `name`; BackendUnavailable with the reason if it cannot run here."""
    if name not in BACKENDS:
        raise InspectdError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    module_name, cls_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(f"{name}: {exc}") from None
    reason = module.unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    return getattr(module, cls_name)


def open_backend(bundle: Bundle, preference: Sequence[str] = DEFAULT_PREFERENCE,
                 options: dict[str, dict[str, Any]] | None = None,
                 gate: Callable[[Backend], None] | None = None,
                 on_fallback: Callable[[str, str], None] | None = None) -> tuple[Backend, EngineInfo]:
    """Open the first backend in `preference` that loads (and passes `gate`, if given, unless it
    is the reference configuration: ONNX Runtime FP32 on CPU, `Backend.is_reference`). `on_fallback(name, reason)` is told about each one skipped."""
    options = options or {}
    skipped: dict[str, str] = {}
    for name in preference:
        backend: Backend | None = None
        try:
            cls = backend_class(name)
            try:
                backend = cls(bundle, **options.get(name, {}))
            except TypeError as exc:  # an option the backend does not take: a config mistake
                raise ConfigError(f"backend_options.{name}: {exc}") from None
            if gate is not None and not getattr(backend, "is_reference", False):
                gate(backend)  # any reduced precision or other runtime, ONNX Runtime INT8 included
        except ConfigError:
            raise  # a wrong option is the integrator's mistake: refuse, don't fall back silently
        except Exception as exc:  # ours, or the library's own (CUDA out of memory, a failed graph capture)
            if backend is not None:
                backend.close()
            if not isinstance(exc, InspectdError):
                exc = BackendUnavailable(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            skipped[name] = str(exc)
            log.warning("backend %s skipped: %s", name, exc)
            if on_fallback is not None:
                on_fallback(name, str(exc))
            continue
        info = EngineInfo(backend=name, details=backend.describe(), skipped=skipped)
        log.info("backend %s serves bundle %s%s", name, bundle.bundle_id,
                 "".join(f"; {k} skipped: {v}" for k, v in skipped.items()))
        return backend, info
    raise BackendUnavailable("no backend could serve bundle " + bundle.bundle_id + ": "
                             + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
