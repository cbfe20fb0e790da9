"""TensorRT 10+ backend (tensor-name API) with pycuda, and the engine builder.

Threading: CUDA contexts are per thread, so ONE worker thread creates the context
(`make_context`), owns every CUDA/TensorRT object and runs every call; `infer()` hands the
batch to it through a queue and waits. Buffers (page-locked host, device) are allocated once
for the engine profile's max batch; larger batches are split. `close()` frees buffers,
engine and context inside that thread, pops and detaches the context and joins the thread.

Engines come from the bundle's engine cache (engine_cache.py): keyed by GPU, compute
capability, TensorRT version, ONNX sha256, precision, input shape and precision policy (FP16 and
INT8 engines keep the layers up to the first feature tap in FP32, INT8 ones their head in FP16,
TF32 off: precision.py). The backend never builds: a missing, stale or corrupt engine is refused
with the reason (BackendUnavailable, so a line falls back to its next backend and counts the
fallback). A build takes minutes and would starve the daemon's watchdog; engines are built only
by `inspectd build-engine` (`build_engine`).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inspectd.engines.bundle import Bundle
from inspectd.engines.preprocess import fingerprint, list_images, load_prepared, load_stored
from inspectd.engines.runtime.base import Backend
from inspectd.engines.runtime.engine_cache import EngineCache, EngineKey, StaleEngine
from inspectd.engines.runtime.precision import PRECISION_POLICY, first_tap, layer_precisions, trt_layers
from inspectd.errors import BackendUnavailable, DataError, InspectdError
from inspectd.fileio import atomic_write

NAME = "tensorrt"
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_MB = 1024
log = logging.getLogger("inspectd.runtime.tensorrt")


def unavailable_reason(device: int = 0) -> str | None:
    try:
        import tensorrt as trt
    except ImportError as exc:
        return f"TensorRT not installed (import tensorrt: {exc})"
    if int(trt.__version__.split(".")[0]) < 10:
        return f"TensorRT {trt.__version__} is too old (the tensor-name API needs 10+)"
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return f"pycuda not installed (import pycuda.driver: {exc})"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError without a driver
        return f"no CUDA device (CUDA driver: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if count <= device:
        return f"no CUDA device {device} (found {count})"
    return None


def chunks(n: int, max_batch: int) -> list[tuple[int, int]]:
    """[start, stop) slices covering n items in pieces of at most max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def resolve_shape(shape: Sequence[int], batch: int) -> tuple[int, ...]:
    """An engine tensor shape with its dynamic batch (-1) set to `batch`; other -1s are an error
    (the bundle contract fixes H, W, C and the map size)."""
    dims = [int(d) for d in shape]
    if not dims:
        raise InspectdError("engine tensor has no dimensions")
    if dims[0] == -1:
        dims[0] = batch
    if any(d < 0 for d in dims):
        raise InspectdError(f"engine tensor shape {tuple(shape)} has dynamic dimensions beyond the batch")
    return tuple(dims)


def check_profile(input_name: str, profile: Sequence[Sequence[int]], spec_shape: tuple[int, int, int]) -> int:
    """Validate the engine's (min, opt, max) profile for the NHWC input; return max batch."""
    lo, _opt, hi = (tuple(int(d) for d in s) for s in profile)
    if lo[1:] != spec_shape or hi[1:] != spec_shape:
        raise BackendUnavailable(f"engine input {input_name!r} profile {lo}..{hi} does not match the bundle input "
                                 f"N x {' x '.join(map(str, spec_shape))}")
    if lo[0] > 1:
        raise BackendUnavailable(f"engine input {input_name!r} profile needs batch >= {lo[0]}; the line runs batch 1")
    return hi[0]


def device_key_facts(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor"); needs pycuda and cuda.init()."""
    import pycuda.driver as cuda

    cuda.init()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


def engine_key(bundle: Bundle, precision: str, max_batch: int, device: int = 0) -> EngineKey:
    import tensorrt as trt

    gpu, cc = device_key_facts(device)
    return EngineKey(gpu_name=gpu, compute_capability=cc, tensorrt_version=trt.__version__,
                     onnx_sha256=bundle.manifest.model.sha256, precision=precision,
                     input_shape=(max_batch, *bundle.input_spec.shape), precision_policy=PRECISION_POLICY)


# --------------------------------------------------------------------------- runtime


@dataclass
class _Request:
    batch: np.ndarray | None  # None = stop
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[np.ndarray, np.ndarray] | None = None
    error: BaseException | None = None


class TensorRTBackend(Backend):
    name = NAME

    def __init__(self, bundle: Bundle, precision: str = "fp16", device: int = 0,
                 max_batch: int = DEFAULT_MAX_BATCH, start_timeout_s: float = 120.0,
                 workspace_mb: int | None = None) -> None:
        super().__init__(bundle)
        if workspace_mb is not None:  # a builder setting: it shaped the cached engine already
            log.info("tensorrt: workspace_mb applies when building (inspectd build-engine --workspace); "
                     "not used when loading")
        reason = unavailable_reason(device)
        if reason:
            raise BackendUnavailable(reason)
        self._precision, self._device, self._max_batch = precision, int(device), int(max_batch)
        self._requests: queue.Queue[_Request] = queue.Queue()
        self._started = _Request(batch=None)  # reused as the "thread is ready or failed" signal
        self._facts: dict[str, Any] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"tensorrt-{bundle.bundle_id}", daemon=True)
        self._thread.start()
        # Loading (never building) an engine: seconds; the thread always signals.
        if not self._started.done.wait(start_timeout_s):
            # Given up: once the load finishes, the worker takes this stop and releases the context
            # and device memory (it would otherwise hold them forever, once per retry).
            self._closed = True
            self._requests.put(_Request(batch=None))
            raise BackendUnavailable(f"tensorrt: engine did not load within {start_timeout_s:.0f} s")
        if self._started.error is not None:
            self._thread.join(timeout=30)
            err = self._started.error
            if isinstance(err, InspectdError):
                raise err
            raise BackendUnavailable(f"tensorrt: {type(err).__name__}: {err}") from None

    # -- caller side

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.check_batch(batch)
        if self._closed:
            raise InspectdError("tensorrt: backend is closed")
        req = _Request(batch=np.ascontiguousarray(batch))
        self._requests.put(req)
        while not req.done.wait(1.0):
            if not self._thread.is_alive():  # never wait forever on a dead worker
                raise InspectdError("tensorrt: worker thread is gone")
        if req.error is not None:
            if isinstance(req.error, InspectdError):
                raise req.error
            raise InspectdError(f"tensorrt: inference failed: {type(req.error).__name__}: {req.error}")
        if req.result is None:
            raise InspectdError("tensorrt: worker returned no result")
        return req.result

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, **self._facts}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._requests.put(_Request(batch=None))
            self._thread.join()

    # -- worker thread: owns the CUDA context and every TensorRT object

    def _run(self) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt

            ctx = cuda.Device(self._device).make_context()  # created and made current on this thread
        except BaseException as exc:  # e.g. out of device memory: the constructor must not wait forever
            self._started.error = exc
            self._started.done.set()
            return
        state: dict[str, Any] = {}
        try:
            try:
                self._setup(trt, cuda, state)
            except BaseException as exc:
                self._started.error = exc
                return
            finally:
                cuda.Context.pop()
                self._started.done.set()
            while True:
                req = self._requests.get()
                if req.batch is None:
                    break
                ctx.push()
                try:
                    req.result = self._execute(cuda, state, req.batch)
                except BaseException as exc:  # reported to the caller, the thread carries on
                    req.error = exc
                finally:
                    cuda.Context.pop()
                    req.done.set()
        finally:
            ctx.push()
            try:
                for buf in state.get("device", {}).values():
                    buf.free()
                # TensorRT objects go in dependency order: context before engine before runtime.
                for name in ("context", "engine", "runtime", "stream", "host", "device"):
                    state.pop(name, None)
                state.clear()
            finally:
                ctx.pop()
                ctx.detach()

    def _setup(self, trt: Any, cuda: Any, state: dict[str, Any]) -> None:
        key = engine_key(self.bundle, self._precision, self._max_batch, self._device)
        cache = EngineCache.for_bundle(self.bundle.path)
        try:
            path = cache.lookup(key)
        except StaleEngine as exc:
            raise StaleEngine(f"{exc}; engines are never built at run time: run `inspectd build-engine "
                              f"--bundle {self.bundle.path} --precision {self._precision}`") from None
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendUnavailable(f"{path}: TensorRT could not deserialize the engine")
        state.update(logger=logger, runtime=runtime, engine=engine)
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        model = self.bundle.manifest.model
        if inputs != [model.input_name] or sorted(outputs) != sorted(model.output_names):
            raise BackendUnavailable(f"{path}: engine tensors {inputs} -> {outputs} do not match the bundle "
                                     f"({model.input_name} -> {model.output_names})")
        input_name = inputs[0]
        max_batch = check_profile(input_name, engine.get_tensor_profile_shape(input_name, 0),
                                  self.bundle.input_spec.shape)
        context = engine.create_execution_context()
        stream = cuda.Stream()
        host: dict[str, np.ndarray] = {}
        device: dict[str, Any] = {}
        state.update(context=context, stream=stream, host=host, device=device)
        for name in inputs + outputs:
            shape = resolve_shape(engine.get_tensor_shape(name), max_batch)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            host[name] = cuda.pagelocked_empty(shape, dtype)
            device[name] = cuda.mem_alloc(host[name].nbytes)
            # Addresses never change: bind once; only the input shape changes per call.
            context.set_tensor_address(name, int(device[name]))
        state.update(input=input_name, outputs=list(model.output_names), max_batch=max_batch)
        gpu, cc = device_key_facts(self._device)
        self._facts = {"device": gpu, "compute_capability": cc, "tensorrt": trt.__version__,
                       "precision": self._precision, "max_batch": max_batch, "engine": str(path)}

    def _execute(self, cuda: Any, state: dict[str, Any], batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        context, stream = state["context"], state["stream"]
        host, device = state["host"], state["device"]
        name_in, (name_score, name_map) = state["input"], state["outputs"]
        scores, maps = [], []
        for start, stop in chunks(batch.shape[0], state["max_batch"]):
            n = stop - start
            if not context.set_input_shape(name_in, batch[start:stop].shape):
                raise InspectdError(f"tensorrt: engine refused input shape {batch[start:stop].shape}")
            host[name_in][:n] = batch[start:stop]
            cuda.memcpy_htod_async(device[name_in], host[name_in][:n], stream)
            if not context.execute_async_v3(stream_handle=stream.handle):
                raise InspectdError("tensorrt: execute_async_v3 failed (see the TensorRT log)")
            for name in (name_score, name_map):
                cuda.memcpy_dtoh_async(host[name][:n], device[name], stream)
            stream.synchronize()
            # Copies: the page-locked buffers are reused by the next call.
            scores.append(np.array(host[name_score][:n], dtype=np.float32).reshape(n))
            maps.append(np.array(host[name_map][:n], dtype=np.float32))
        return np.concatenate(scores), np.concatenate(maps)


# --------------------------------------------------------------------------- builder


def build_engine(bundle: Bundle, precision: str = "fp16", workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 calib_images: str | Path | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 device: int = 0) -> Path:
    """Build (or rebuild) the engine for this GPU into the bundle's engine cache; return its path.

    INT8 calibrates on `calib_images` (a folder) or else the bundle's `calibration_images`.
    """
    reason = unavailable_reason(device)
    if reason:
        raise BackendUnavailable(reason)
    import pycuda.driver as cuda
    import tensorrt as trt

    ctx = cuda.Device(device).make_context()  # this thread, for the duration of the build
    try:
        key = engine_key(bundle, precision, max_batch, device)
        data = _build_serialized(trt, bundle, key, workspace_mb, calib_images)
        return EngineCache.for_bundle(bundle.path).store(key, data, extra={"workspace_mb": workspace_mb})
    finally:
        ctx.pop()
        ctx.detach()


def _build_serialized(trt: Any, bundle: Bundle, key: EngineKey, workspace_mb: int,
                      calib_images: str | Path | None) -> bytes:
    """Run the TensorRT builder on the bundle's ONNX; needs a current CUDA context."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(bundle.model_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"{bundle.path}: TensorRT cannot parse {bundle.model_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    max_batch, h, w, c = key.input_shape
    profile = builder.create_optimization_profile()
    profile.set_shape(bundle.manifest.model.input_name, (1, h, w, c), (1, h, w, c), (max_batch, h, w, c))
    config.add_optimization_profile(profile)

    cache_dir = EngineCache.for_bundle(bundle.path).root
    cache_dir.mkdir(parents=True, exist_ok=True)
    timing_path = cache_dir / f"timing_{key.device_stem()}.cache"
    timing_bytes = timing_path.read_bytes() if timing_path.is_file() else b""
    timing_cache = config.create_timing_cache(timing_bytes)
    # ignore_mismatch=False: a cache from another device/version is refused, not misapplied.
    if not config.set_timing_cache(timing_cache, False):
        log.warning("%s: timing cache does not match this GPU/TensorRT; starting a new one", timing_path)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)

    calibrator = None
    # FP32 layers are there to be exact: TF32 (on by default) rounds their inputs to FP16's mantissa.
    config.clear_flag(trt.BuilderFlag.TF32)
    if key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 layers fall back to fp16, not fp32
        pins = layer_precisions(trt_layers(network), first_tap(bundle), key.precision)
        pinned = pin_precisions(trt, network, pins)
        if pinned:
            # Prefer, not obey: a layer TensorRT cannot run as pinned is a warning, not a failed build.
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("%s: %d layers pinned to FP32 (up to the first feature tap), %d to FP16 (the head, for int8)",
                 bundle.path, sum(1 for p in pinned.values() if p == "float32"),
                 sum(1 for p in pinned.values() if p == "float16"))
    if key.precision == "int8":
        images = _calibration_paths(bundle, calib_images)
        # Keyed by model and image set: another calibration folder must not reuse old scales.
        calib_cache = cache_dir / f"calib_{key.onnx_sha256[:16]}_{fingerprint(images)[:16]}.cache"
        calibrator = _make_calibrator(trt, bundle, images, calib_cache)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        # No set_calibration_profile (deprecated in 10): calibration runs at profile 0's opt
        # shape, batch 1, which is why the calibrator feeds batches of one image.
    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.release()
    if serialized is None:
        raise BackendUnavailable(f"{bundle.path}: TensorRT failed to build a {key.precision} engine (see its log)")
    updated = config.get_timing_cache()
    if updated is not None:
        try:  # whole or not at all (fsync'd, a unique temp name); only a speed-up: a failure is a warning
            atomic_write(timing_path, bytes(updated.serialize()))
        except OSError as exc:
            log.warning("%s: cannot write the timing cache (%s); the next build times its layers again",
                        timing_path, exc)
    return bytes(serialized)


def pin_precisions(trt: Any, network: Any, pins: dict[str, str]) -> dict[str, str]:
    """Pin each network layer named in `pins` (with a float output) to its precision, math and float
    outputs; return what was pinned (layer name -> precision)."""
    floats = (trt.float32, trt.float16)
    pinned = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        want = pins.get(layer.name)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if want is None or not any(t.dtype in floats for t in outputs):
            continue  # not pinned, or a shape/integer layer
        dtype = getattr(trt, want)
        layer.precision = dtype
        for j, tensor in enumerate(outputs):
            if tensor.dtype in floats:
                layer.set_output_type(j, dtype)
        pinned[layer.name] = want
    return pinned


def _calibration_paths(bundle: Bundle, folder: str | Path | None) -> list[Path]:
    paths = list_images(folder) if folder is not None else [bundle.path / p for p in bundle.manifest.calibration_images]
    if not paths:
        where = f"folder {folder}" if folder is not None else f"bundle {bundle.path} (manifest calibration_images)"
        raise DataError(f"INT8 calibration needs good images; none in {where}")
    return paths


def _make_calibrator(trt: Any, bundle: Bundle, images: list[Path], cache_path: Path) -> Any:
    """An IInt8EntropyCalibrator2 fed with prepared uint8 batches of good images."""
    import pycuda.driver as cuda

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batch_size = 1  # = the profile's opt batch, the shape calibration runs at
            # Decoded up front: a bad image is a clear DataError here, not an error swallowed
            # inside a TensorRT callback.
            # The bundle's own calibration images are stored prepared (ROI cropped, resized): read
            # them as they are; images from a folder are camera frames and go through prepare().
            stored = all(bundle.path in p.parents for p in images)
            load = load_stored if stored else load_prepared
            self.pending = [load(p, bundle.input_spec) for p in images]
            shape = (self.batch_size, *bundle.input_spec.shape)
            self.host = np.zeros(shape, dtype=np.uint8)
            self.device = cuda.mem_alloc(self.host.nbytes)

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if len(self.pending) < self.batch_size:
                return None  # no more data: calibration ends
            take, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
            for i, image in enumerate(take):
                self.host[i] = image
            cuda.memcpy_htod(self.device, self.host)
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return read_calibration_cache(cache_path)

        def write_calibration_cache(self, cache: Any) -> None:
            write_calibration_cache(cache_path, bytes(cache))

        def release(self) -> None:
            self.device.free()

    return _EntropyCalibrator()


def calibration_sidecar(cache_path: Path) -> Path:
    """The cache's integrity record, in `sha256sum` format (so `sha256sum -c` checks it too)."""
    return cache_path.with_name(cache_path.name + ".sha256")


def read_calibration_cache(cache_path: Path) -> bytes | None:
    """The calibration cache if it matches its recorded sha256, else None (TensorRT then
    recalibrates): a truncated or corrupt cache would give wrong INT8 scales without an error."""
    sidecar = calibration_sidecar(cache_path)
    if not cache_path.is_file():
        return None
    try:
        data = cache_path.read_bytes()
        recorded = sidecar.read_text(encoding="ascii").split()[0] if sidecar.is_file() else None
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        log.warning("%s: unreadable calibration cache (%s); recalibrating", cache_path, exc)
        return None
    if recorded is None:
        log.warning("%s: no integrity record %s (interrupted write?); recalibrating", cache_path, sidecar.name)
        return None
    if hashlib.sha256(data).hexdigest() != recorded:
        log.warning("%s: truncated or corrupt (%d bytes, sha256 differs from %s); recalibrating",
                    cache_path, len(data), sidecar.name)
        return None
    return data


def write_calibration_cache(cache_path: Path, data: bytes) -> None:
    """Cache, then its sha256 record, each by rename (atomic_write): the record is written last,
    so a build killed or a disk filled partway leaves a cache that does not verify, never a
    half-written one that does. The old record goes first, as for engines (engine_cache.store)."""
    sidecar = calibration_sidecar(cache_path)
    try:
        sidecar.unlink(missing_ok=True)
        atomic_write(cache_path, data)
        atomic_write(sidecar, f"{hashlib.sha256(data).hexdigest()}  {cache_path.name}\n".encode("ascii"))
    except OSError as exc:
        # Called from inside TensorRT's build: the cache only saves the next build a calibration
        # pass, so losing it is a warning, not a failed build (which then reports the disk itself).
        log.warning("%s: cannot write the calibration cache (%s); the next build recalibrates", cache_path, exc)
