"""Serialized TensorRT engines cached next to the bundle, keyed by everything that makes an
engine valid: GPU, compute capability, TensorRT version, ONNX content, precision, input shape.

Pure Python (no TensorRT import) so the key and file logic is testable anywhere. An engine is
only handed out when its JSON sidecar names exactly the requested key and the engine file
still has the recorded size and sha256: a mismatching, truncated or corrupt engine is never
loaded (a bad engine can crash the process inside TensorRT rather than raise).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from inspectd.engines.preprocess import sha256_file
from inspectd.fileio import atomic_write
from inspectd.errors import BackendUnavailable

ENGINE_DIR = "engines"
ENGINE_SUFFIX = ".engine"
SIDECAR_SUFFIX = ".json"
SIDECAR_SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")


class StaleEngine(BackendUnavailable):
    """A cached engine that must not be loaded (absent, for another key, truncated, corrupt)."""


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; any change means a different engine."""

    gpu_name: str
    compute_capability: str  # "8.7"
    tensorrt_version: str
    onnx_sha256: str
    precision: str  # fp32 | fp16 | int8
    input_shape: tuple[int, ...]  # (max_batch, H, W, C), NHWC uint8
    # What the builder kept in full precision (runtime/precision.py): engines built before the
    # policy existed (no such field) ran everything in FP16 / TF32 and are rebuilt, not loaded.
    precision_policy: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.onnx_sha256):
            raise ValueError(f"onnx_sha256 {self.onnx_sha256!r} is not a sha256 hex digest")
        if len(self.input_shape) != 4 or any(int(d) < 1 for d in self.input_shape):
            raise ValueError(f"input_shape {self.input_shape!r} is not (max_batch, H, W, C) with positive sizes")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineKey":
        return cls(gpu_name=str(d["gpu_name"]), compute_capability=str(d["compute_capability"]),
                   tensorrt_version=str(d["tensorrt_version"]), onnx_sha256=str(d["onnx_sha256"]),
                   precision=str(d["precision"]), input_shape=tuple(int(v) for v in d["input_shape"]),
                   precision_policy=str(d.get("precision_policy", "")))

    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def device_stem(self) -> str:
        """GPU + TensorRT part of the name: what a timing cache is valid for."""
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        return f"{gpu}_sm{self.compute_capability.replace('.', '')}_trt{self.tensorrt_version}"

    def file_stem(self) -> str:
        """Readable prefix for humans listing the folder; the digest makes it unique."""
        b, h, w, c = self.input_shape
        return f"{self.device_stem()}_{self.precision}_b{b}x{h}x{w}x{c}_{self.digest()[:16]}"

    def describe(self) -> str:
        b, h, w, c = self.input_shape
        return (f"{self.gpu_name} (sm {self.compute_capability}), TensorRT {self.tensorrt_version}, "
                f"{self.precision} ({self.precision_policy or 'no precision policy'}), input up to {b}x{h}x{w}x{c}, "
                f"onnx {self.onnx_sha256[:12]}")


class EngineCache:
    """Engines for one bundle under `<bundle>/engines/` (or `root` if given)."""

    def __init__(self, root: str | os.PathLike, key_type: type = EngineKey, suffix: str = ENGINE_SUFFIX) -> None:
        """`key_type`: the key class (EngineKey for TensorRT; any class with as_dict/from_dict/
        file_stem/describe and equality, e.g. the ONNX Runtime INT8 key); `suffix`: engine file suffix."""
        self.root = Path(root)
        self.key_type = key_type
        self.suffix = suffix

    @classmethod
    def for_bundle(cls, bundle_path: str | os.PathLike, key_type: type = EngineKey,
                   suffix: str = ENGINE_SUFFIX) -> "EngineCache":
        return cls(Path(bundle_path) / ENGINE_DIR, key_type=key_type, suffix=suffix)

    def engine_path(self, key: EngineKey) -> Path:
        return self.root / (key.file_stem() + self.suffix)

    def sidecar_path(self, key: EngineKey) -> Path:
        return self.root / (key.file_stem() + SIDECAR_SUFFIX)

    def lookup(self, key: EngineKey) -> Path:
        """The verified engine file for `key`; StaleEngine saying why it cannot be used."""
        engine, sidecar = self.engine_path(key), self.sidecar_path(key)
        if not engine.is_file():
            others = self.known_keys()
            hint = (" (cached engines here are for: " + "; ".join(k.describe() for k in others) + ")"
                    if others else "")
            raise StaleEngine(f"no cached engine for {key.describe()} in {self.root}{hint}")
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            recorded_key = self.key_type.from_dict(meta["key"])
            recorded_sha, recorded_size = str(meta["sha256"]), int(meta["size"])
        except FileNotFoundError:
            raise StaleEngine(f"{engine}: no sidecar {sidecar.name} (interrupted write?), not loading it") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise StaleEngine(f"{sidecar}: unreadable engine sidecar ({type(exc).__name__}: {exc})") from None
        if recorded_key != key:
            raise StaleEngine(f"{engine}: built for {recorded_key.describe()}, not for {key.describe()}")
        size = engine.stat().st_size
        if size != recorded_size:
            raise StaleEngine(f"{engine}: truncated or overwritten ({size} bytes, sidecar says {recorded_size})")
        actual = sha256_file(engine)
        if actual != recorded_sha:
            raise StaleEngine(f"{engine}: corrupt (sha256 {actual[:12]}…, sidecar says {recorded_sha[:12]}…)")
        return engine

    def store(self, key: EngineKey, engine_bytes: bytes, extra: dict[str, Any] | None = None) -> Path:
        """Write engine then sidecar, each by rename: a reader never sees a half-written pair
        that verifies (the sidecar, written last, is what makes the engine loadable)."""
        self.root.mkdir(parents=True, exist_ok=True)
        engine, sidecar = self.engine_path(key), self.sidecar_path(key)
        sidecar.unlink(missing_ok=True)  # the old pair stops verifying before the engine changes
        atomic_write(engine, engine_bytes)
        meta = {"schema": SIDECAR_SCHEMA, "key": key.as_dict(), "sha256": hashlib.sha256(engine_bytes).hexdigest(),
                "size": len(engine_bytes), "extra": extra or {}}
        atomic_write(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return engine

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes] | None) -> tuple[Path, str | None]:
        """The engine for `key`, building (and storing) it when missing or stale and `build`
        is given. Returns (path, why it was rebuilt or None). Without `build`, StaleEngine."""
        try:
            return self.lookup(key), None
        except StaleEngine as exc:
            if build is None:
                raise StaleEngine(f"{exc}; engine building is disabled (run `inspectd build-engine`)") from None
            reason = str(exc)
        return self.store(key, build()), reason

    def known_keys(self) -> list[EngineKey]:
        """Keys of the engines whose sidecars parse (for error messages and listings)."""
        keys = []
        if not self.root.is_dir():
            return keys
        for sidecar in sorted(self.root.glob("*" + SIDECAR_SUFFIX)):
            try:
                keys.append(self.key_type.from_dict(json.loads(sidecar.read_text(encoding="utf-8"))["key"]))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
                continue
        return keys


