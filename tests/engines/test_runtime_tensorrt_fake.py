"""TensorRT backend lifecycle against a FAKE TensorRT + FAKE pycuda (named as such: there is
no GPU or TensorRT here). The fakes are numpy-backed stand-ins for exactly the calls the
backend makes; they compute the toy bundle's function, so the real parity gate against the
real ONNX Runtime applies. They also record which thread made each CUDA call and whether a
context was current, which is what these tests check:

- every CUDA / TensorRT call happens on the ONE worker thread, with its context pushed;
- buffers are allocated once (for the profile's max batch); bigger batches are split;
- close() frees every allocation, pops and detaches the context, joins the thread;
- the engine cache is used: built once (by `build_engine`, i.e. `inspectd build-engine`), reused;
  the backend NEVER builds: a missing or corrupt engine is refused with the reason, and a line
  skips the backend (counted as a fallback) instead of building inside the daemon.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inspectd.engines.bundle import Bundle, load_bundle
from inspectd.errors import BackendUnavailable, InspectdError
from tests.engines.test_runtime_toybundle import TOY_POOL, make_toy_bundle


class FakeCuda:
    """FAKE pycuda.driver: host memory posing as device memory, contexts as a per-thread stack."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.allocs: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.calls: list[tuple[str, int, bool]] = []  # (call, thread id, context current?)
        self.contexts: list[Any] = []
        self.next_addr = 0x1000
        fake = self

        class Context:
            def __init__(self) -> None:
                self.detached = False
                self.thread = threading.get_ident()

            def push(self) -> None:
                fake._stack().append(self)
                fake._record("push")

            @staticmethod
            def pop() -> None:
                fake._record("pop")
                fake._stack().pop()

            def detach(self) -> None:
                fake._record("detach")
                self.detached = True

        class Device:
            def __init__(self, i: int) -> None:
                self.i = i

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "FAKE GPU"

            def compute_capability(self) -> tuple[int, int]:
                return (8, 7)

            def make_context(self) -> Context:
                ctx = Context()
                fake.contexts.append(ctx)
                fake._stack().append(ctx)
                fake._record("make_context")
                return ctx

        class DeviceAllocation:
            def __init__(self, addr: int) -> None:
                self.addr = addr

            def __int__(self) -> int:
                return self.addr

            def free(self) -> None:
                fake._record("free")
                fake.freed.append(self.addr)

        class Stream:
            handle = 42

            def __init__(self) -> None:
                fake._record("Stream")

            def synchronize(self) -> None:
                fake._record("synchronize")

        self.Context, self.Device, self.Stream = Context, Device, Stream
        self._Alloc = DeviceAllocation

    def _stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _record(self, call: str) -> None:
        self.calls.append((call, threading.get_ident(), bool(self._stack())))

    def init(self) -> None:
        pass

    def pagelocked_empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        self._record("pagelocked_empty")
        return np.zeros(shape, dtype)

    def mem_alloc(self, nbytes: int) -> Any:
        self._record("mem_alloc")
        addr, self.next_addr = self.next_addr, self.next_addr + 0x1000 + int(nbytes)
        self.allocs[addr] = np.zeros(int(nbytes), np.uint8)
        return self._Alloc(addr)

    def memcpy_htod_async(self, dev: Any, host: np.ndarray, stream: Any) -> None:
        self._record("memcpy_htod_async")
        raw = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        self.allocs[int(dev)][: raw.size] = raw

    memcpy_htod = lambda self, dev, host: self.memcpy_htod_async(dev, host, None)  # noqa: E731

    def memcpy_dtoh_async(self, host: np.ndarray, dev: Any, stream: Any) -> None:
        self._record("memcpy_dtoh_async")
        flat = host.reshape(-1).view(np.uint8)
        flat[:] = self.allocs[int(dev)][: flat.size]


def make_fake_trt(cuda: FakeCuda, bundle_shape: tuple[int, int, int]) -> types.ModuleType:
    """FAKE tensorrt 10 module: an 'engine' computing the toy model (4x4 mean -> (x/255-0.5)^2)."""
    h, w, c = bundle_shape
    hm, wm = h // TOY_POOL, w // TOY_POOL
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32",
                                            PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS")
    trt.float32, trt.float16, trt.int32 = "float32", "float16", "int32"
    trt.nptype = lambda dt: dt
    trt.builds = []
    trt.networks = []

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class ExecutionContext:
        def __init__(self, engine: "Engine") -> None:
            self.engine, self.addr, self.shape = engine, {}, None

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            cuda._record("set_input_shape")
            ok = 1 <= shape[0] <= engine_max(self.engine) and tuple(shape[1:]) == (h, w, c)
            self.shape = tuple(shape) if ok else None
            return ok

        def set_tensor_address(self, name: str, addr: int) -> None:
            cuda._record("set_tensor_address")
            self.addr[name] = addr

        def execute_async_v3(self, stream_handle: int) -> bool:
            cuda._record("execute_async_v3")
            n = self.shape[0]
            x = cuda.allocs[self.addr["images"]][: n * h * w * c].reshape(n, h, w, c).astype(np.float32)
            pooled = x.mean(axis=3).reshape(n, hm, TOY_POOL, wm, TOY_POOL).mean(axis=(2, 4))
            amap = ((pooled / 255.0 - 0.5) ** 2).astype(np.float32)
            cuda.allocs[self.addr["anomaly_map"]][: amap.nbytes] = amap.view(np.uint8).reshape(-1)
            score = amap.reshape(n, -1).max(axis=1).astype(np.float32)
            cuda.allocs[self.addr["score"]][: score.nbytes] = score.view(np.uint8)
            return True

    def engine_max(engine: "Engine") -> int:
        return engine.max_batch

    class Engine:
        names = ["images", "score", "anomaly_map"]

        def __init__(self, max_batch: int) -> None:
            self.max_batch = max_batch
            self.num_io_tensors = 3

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name == "images" else "OUTPUT"

        def get_tensor_shape(self, name: str) -> tuple:
            return {"images": (-1, h, w, c), "score": (-1,), "anomaly_map": (-1, hm, wm)}[name]

        def get_tensor_dtype(self, name: str) -> Any:
            return np.uint8 if name == "images" else np.float32

        def get_tensor_profile_shape(self, name: str, profile: int) -> list:
            return [(1, h, w, c), (1, h, w, c), (self.max_batch, h, w, c)]

        def create_execution_context(self) -> ExecutionContext:
            cuda._record("create_execution_context")
            return ExecutionContext(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            cuda._record("deserialize_cuda_engine")
            if not data.startswith(b"FAKE-ENGINE:"):
                return None
            return Engine(int(data.split(b":")[1]))

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            self.max_batch = hi[0]

    class Config:
        def __init__(self) -> None:
            self.flags: list[str] = []

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            pass

        def add_optimization_profile(self, profile: Profile) -> None:
            self.profile = profile

        def create_timing_cache(self, data: bytes) -> Any:
            return types.SimpleNamespace(serialize=lambda: data + b"+timing")

        def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
            self.timing = cache
            return True

        def get_timing_cache(self) -> Any:
            return self.timing

        def set_flag(self, flag: str) -> None:
            self.flags.append(flag)

        def clear_flag(self, flag: str) -> None:
            self.flags.append("-" + flag)

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> "Network":
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: object, config: Config) -> bytes:
            cuda._record("build_serialized_network")
            trt.builds.append(list(config.flags))
            trt.networks.append(network)
            calib = getattr(config, "int8_calibrator", None)
            if calib is not None and calib.read_calibration_cache() is None:
                # Like TensorRT: pull batches until None, then hand back a calibration cache.
                trt.calibration_batches = 0
                while calib.get_batch(["images"]) is not None:
                    trt.calibration_batches += 1
                calib.write_calibration_cache(b"FAKE-CALIBRATION")
            return b"FAKE-ENGINE:%d:" % config.profile.max_batch + b"\x00" * 64

    class Tensor:
        def __init__(self, name: str, dtype: str) -> None:
            self.name, self.dtype = name, dtype

    class Layer:
        """What the ONNX parser makes of one node: named after it, float outputs (int for Shape)."""

        def __init__(self, node: Any) -> None:
            self.name, self.precision, self.output_types = node.name, None, {}
            dtype = "int32" if node.op_type in ("Shape", "ConstantOfShape") else "float32"
            self.inputs = [Tensor(t, "float32") for t in node.input]
            self.outputs = [Tensor(t, dtype) for t in node.output]
            self.num_inputs, self.num_outputs = len(self.inputs), len(self.outputs)

        def get_input(self, i: int) -> Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> Tensor:
            return self.outputs[i]

        def set_output_type(self, i: int, dtype: str) -> None:
            self.output_types[i] = dtype

    class Network:
        def __init__(self) -> None:
            self.layers: list[Layer] = []

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse(self, data: bytes) -> bool:
            if data[:2] == b"\x00\x00":
                return False
            import onnx

            self.network.layers = [Layer(n) for n in onnx.load_from_string(data).graph.node]
            return True

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            pass

    trt.Logger, trt.Runtime, trt.Builder, trt.OnnxParser = Logger, Runtime, Builder, OnnxParser
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


@pytest.fixture()
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Bundle, FakeCuda, Any]:
    bundle = load_bundle(make_toy_bundle(tmp_path / "toy"))
    cuda = FakeCuda()
    trt = make_fake_trt(cuda, bundle.input_spec.shape)
    pycuda = types.ModuleType("pycuda")
    driver = types.ModuleType("pycuda.driver")
    for name in ("init", "pagelocked_empty", "mem_alloc", "memcpy_htod_async", "memcpy_htod", "memcpy_dtoh_async"):
        setattr(driver, name, getattr(cuda, name))
    driver.Device, driver.Context, driver.Stream = cuda.Device, cuda.Context, cuda.Stream
    pycuda.driver = driver
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return bundle, cuda, trt


def test_all_cuda_work_on_one_thread_with_its_context(fakes: tuple[Bundle, FakeCuda, Any]) -> None:
    from inspectd.engines.runtime.parity import parity_gate
    from inspectd.engines.runtime.tensorrt_backend import TensorRTBackend

    from inspectd.engines.runtime.tensorrt_backend import build_engine

    bundle, cuda, trt = fakes
    build_engine(bundle, precision="fp16", max_batch=4)
    assert trt.builds == [["-TF32", "FP16"]]  # built once, fp16 (TF32 off), ahead of time
    cuda.calls.clear()
    backend = TensorRTBackend(bundle, precision="fp16", max_batch=4)
    try:
        assert len(trt.builds) == 1  # the backend loaded it, it did not build
        # The real parity gate against real ONNX Runtime: the fake engine computes the toy model.
        report = parity_gate(backend, bundle, threshold=5.0)
        assert report.passed
        scores, maps = backend.infer(np.full((10, 32, 32, 1), 200, np.uint8))  # 10 > max batch 4
        assert scores.shape == (10,) and maps.shape == (10, 8, 8)
        assert np.allclose(scores, (200 / 255 - 0.5) ** 2)
        info = backend.describe()
        assert info["device"] == "FAKE GPU" and info["max_batch"] == 4 and info["precision"] == "fp16"
    finally:
        backend.close()
    caller = threading.get_ident()
    worker_calls = [c for c in cuda.calls if c[0] != "detach"]
    owners = {tid for _, tid, _ in cuda.calls}
    assert len(owners) == 1 and caller not in owners  # one worker thread, never the caller
    assert all(current for name, _, current in worker_calls if name != "make_context"), \
        [c for c in worker_calls if not c[2]]
    names = [c[0] for c in cuda.calls]
    assert names.count("mem_alloc") == 3 and names.count("pagelocked_empty") == 3  # allocated once
    assert names.count("execute_async_v3") == len(report.rows) + 3  # 10 images in chunks of 4
    # close(): everything freed, context popped and detached, thread gone.
    assert sorted(cuda.freed) == sorted(cuda.allocs)
    assert names[-2:] == ["pop", "detach"] and all(ctx.detached for ctx in cuda.contexts)
    assert not backend._thread.is_alive()
    backend.close()  # idempotent
    with pytest.raises(InspectdError, match="closed"):
        backend.infer(np.zeros((1, 32, 32, 1), np.uint8))


def test_engine_cache_reused_then_corrupt_engine_refused_until_build_engine(fakes: tuple[Bundle, FakeCuda, Any]) -> None:
    from inspectd.engines.runtime.engine_cache import EngineCache
    from inspectd.engines.runtime.tensorrt_backend import TensorRTBackend, build_engine

    bundle, cuda, trt = fakes
    path = build_engine(bundle, precision="int8", max_batch=2)
    assert trt.builds == [["-TF32", "FP16", "INT8"]]
    assert trt.calibration_batches == len(bundle.manifest.calibration_images)  # every image, batch 1
    assert [p.read_bytes() for p in (bundle.path / "engines").glob("calib_*.cache")] == [b"FAKE-CALIBRATION"]
    assert path.parent == bundle.path / "engines" and "fake-gpu_sm87_trt10.3.0_int8_b2x32x32x1_" in path.name
    assert list(EngineCache.for_bundle(bundle.path).root.glob("timing_fake-gpu_sm87_trt10.3.0.cache"))
    with TensorRTBackend(bundle, precision="int8", max_batch=2) as backend:
        assert backend.describe()["engine"] == str(path)
    assert len(trt.builds) == 1  # loaded from the cache, not rebuilt

    path.write_bytes(path.read_bytes()[:10])  # truncated on disk
    with pytest.raises(BackendUnavailable, match="truncated.*never built at run time.*inspectd build-engine"):
        TensorRTBackend(bundle, precision="int8", max_batch=2)
    assert len(trt.builds) == 1  # refused, not rebuilt
    build_engine(bundle, precision="int8", max_batch=2)  # what the operator runs
    with TensorRTBackend(bundle, precision="int8", max_batch=2) as backend:
        assert backend.infer(np.zeros((1, 32, 32, 1), np.uint8))[0].shape == (1,)
    assert len(trt.builds) == 2
    # Every context created was detached, every allocation freed, also on the failed start.
    assert all(ctx.detached for ctx in cuda.contexts) and sorted(cuda.freed) == sorted(cuda.allocs)


def test_worker_errors_reach_the_caller_and_the_backend_survives(fakes: tuple[Bundle, FakeCuda, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from inspectd.engines.runtime.tensorrt_backend import TensorRTBackend

    from inspectd.engines.runtime.tensorrt_backend import build_engine

    bundle, cuda, trt = fakes
    build_engine(bundle, precision="fp32", max_batch=2)
    with TensorRTBackend(bundle, precision="fp32", max_batch=2) as backend:
        original = cuda.memcpy_dtoh_async

        def broken(*a: Any) -> None:
            raise RuntimeError("cuMemcpyDtoHAsync failed: an illegal memory access was encountered")

        monkeypatch.setattr(sys.modules["pycuda.driver"], "memcpy_dtoh_async", broken)
        with pytest.raises(InspectdError, match="tensorrt: inference failed: RuntimeError: cuMemcpyDtoHAsync"):
            backend.infer(np.zeros((1, 32, 32, 1), np.uint8))
        monkeypatch.setattr(sys.modules["pycuda.driver"], "memcpy_dtoh_async", original)
        assert backend.infer(np.zeros((1, 32, 32, 1), np.uint8))[0].shape == (1,)
        with pytest.raises(InspectdError, match="expected dtype uint8"):
            backend.infer(np.zeros((1, 32, 32, 1), np.float32))


def test_unparseable_onnx_is_a_clear_build_error(fakes: tuple[Bundle, FakeCuda, Any]) -> None:
    from inspectd.engines.runtime.tensorrt_backend import build_engine

    bundle, cuda, trt = fakes
    bundle.model_path.write_bytes(b"\x00\x00garbage")  # the fake parser refuses this
    with pytest.raises(BackendUnavailable, match=r"TensorRT cannot parse model.onnx"):
        build_engine(bundle)
    assert all(ctx.detached for ctx in cuda.contexts)


def test_int8_without_calibration_images_is_a_clear_error(fakes: tuple[Bundle, FakeCuda, Any],
                                                          tmp_path: Path) -> None:
    from inspectd.engines.runtime.tensorrt_backend import build_engine
    from inspectd.errors import DataError

    bundle, cuda, trt = fakes
    empty = tmp_path / "no-images"
    empty.mkdir()
    with pytest.raises(DataError, match=rf"INT8 calibration needs good images; none in folder {empty}"):
        build_engine(bundle, precision="int8", calib_images=empty)
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        build_engine(bundle, precision="int8", calib_images=empty)
    assert trt.builds == [] and all(ctx.detached for ctx in cuda.contexts)
    assert not list((bundle.path / "engines").glob("*.engine"))


def test_cache_miss_in_the_daemon_skips_tensorrt_with_its_reason_and_never_builds(
        fakes: tuple[Bundle, FakeCuda, Any]) -> None:
    """Issue 11 item 5, on the FAKE TensorRT: a line preferring TensorRT with no engine built for
    this GPU opens at once on ONNX Runtime; the miss is the skip reason, reported as a fallback
    (what the pipeline counts in inspectd_backend_fallbacks_total), and nothing is built."""
    import time

    from inspectd.engines.runtime import open_backend
    from inspectd.engines.runtime.parity import make_gate

    bundle, cuda, trt = fakes
    fallbacks: list[tuple[str, str]] = []
    t0 = time.monotonic()
    backend, info = open_backend(bundle, ["tensorrt", "onnxruntime"], {"tensorrt": {"precision": "fp16"}},
                                 gate=make_gate(bundle, threshold=5.0),
                                 on_fallback=lambda name, why: fallbacks.append((name, why)))
    try:
        assert info.backend == "onnxruntime" and backend.name == "onnxruntime"
        assert [name for name, _ in fallbacks] == ["tensorrt"]
        why = info.skipped["tensorrt"]
        assert "no cached engine for FAKE GPU" in why and "inspectd build-engine" in why, why
        assert trt.builds == []                      # no build inside the daemon
        assert "build_serialized_network" not in [c[0] for c in cuda.calls]
        assert time.monotonic() - t0 < 30
        assert all(ctx.detached for ctx in cuda.contexts)  # the refused backend released its context
    finally:
        backend.close()


def test_an_engine_that_loads_after_the_start_timeout_is_released(fakes: tuple[Bundle, FakeCuda, Any]) -> None:
    """On the FAKE TensorRT: the engine takes longer to load than `start_timeout_s` (a busy GPU, a big
    engine); the constructor gives up (the line falls back), and when the load finishes the worker
    must release its context and device memory, not wait forever holding them (every engine retry
    would leak another)."""
    import threading
    import time

    from inspectd.engines.runtime.tensorrt_backend import TensorRTBackend, build_engine
    from inspectd.errors import BackendUnavailable

    bundle, cuda, trt = fakes
    build_engine(bundle, precision="fp16", max_batch=2)
    load = trt.Runtime.deserialize_cuda_engine

    def slow_load(self: Any, data: Any) -> Any:
        time.sleep(0.5)
        return load(self, data)

    trt.Runtime.deserialize_cuda_engine = slow_load
    try:
        with pytest.raises(BackendUnavailable, match="did not load"):
            TensorRTBackend(bundle, precision="fp16", max_batch=2, start_timeout_s=0.1)
        end = time.monotonic() + 5.0
        while [t for t in threading.enumerate() if t.name.startswith("tensorrt-")]:
            assert time.monotonic() < end, "the worker still holds its context"
            time.sleep(0.05)
    finally:
        trt.Runtime.deserialize_cuda_engine = load
    assert cuda.contexts and all(c.detached for c in cuda.contexts)
    assert sorted(cuda.freed) == sorted(cuda.allocs)


def test_calibration_cache_is_verified_so_a_truncated_one_is_not_fed_to_tensorrt(
        fakes: tuple[Bundle, FakeCuda, Any], tmp_path: Path) -> None:
    """The INT8 calibrator (built on the FAKE TensorRT/pycuda) writes its cache with an integrity
    record; a cache cut short (a killed build, a full disk) or one without the record is not
    returned, so TensorRT recalibrates instead of reusing garbage scales."""
    from inspectd.engines.runtime.tensorrt_backend import _make_calibrator

    bundle, cuda, trt = fakes
    folder = tmp_path / "engines"
    folder.mkdir()
    cache = folder / "calib_test.cache"
    images = [bundle.path / p for p in bundle.manifest.calibration_images]
    calibrator = _make_calibrator(trt, bundle, images, cache)
    try:
        assert calibrator.read_calibration_cache() is None  # nothing yet
        data = b"TRT-8601-EntropyCalibration2\n" + b"images: 3c010a14\n" * 64
        calibrator.write_calibration_cache(memoryview(data))  # TensorRT hands a buffer, not bytes
        assert cache.read_bytes() == data and calibrator.read_calibration_cache() == data
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temp left behind

        cache.write_bytes(data[: len(data) // 2])  # what a build killed mid-write left
        assert calibrator.read_calibration_cache() is None
        cache.write_bytes(data[:-1] + b"X")  # same length, corrupt
        assert calibrator.read_calibration_cache() is None

        calibrator.write_calibration_cache(data)
        assert calibrator.read_calibration_cache() == data
        for sidecar in set(folder.iterdir()) - {cache}:  # a cache from before integrity records
            sidecar.unlink()
        assert calibrator.read_calibration_cache() is None
    finally:
        calibrator.release()


def test_int8_build_recalibrates_when_the_calibration_cache_is_truncated(fakes: tuple[Bundle, FakeCuda, Any]) -> None:
    """build_engine on the FAKE TensorRT: the second INT8 build reuses a whole calibration cache,
    and recalibrates (rather than reuse it) once the cache file is truncated."""
    from inspectd.engines.runtime.tensorrt_backend import build_engine

    bundle, cuda, trt = fakes
    n_images = len(bundle.manifest.calibration_images)
    build_engine(bundle, precision="int8", max_batch=2)
    assert trt.calibration_batches == n_images
    [cache] = (bundle.path / "engines").glob("calib_*.cache")
    trt.calibration_batches = None
    build_engine(bundle, precision="int8", max_batch=2)
    assert trt.calibration_batches is None  # whole cache: reused, no calibration pass

    cache.write_bytes(cache.read_bytes()[:5])  # a build killed while writing it
    build_engine(bundle, precision="int8", max_batch=2)
    assert trt.calibration_batches == n_images  # calibrated again, not fed the truncated cache
    assert cache.read_bytes() == b"FAKE-CALIBRATION"
    assert len(trt.builds) == 3 and all(ctx.detached for ctx in cuda.contexts)


def test_reduced_precision_builds_keep_the_layers_up_to_the_first_tap_in_fp32(
        fakes: tuple[Bundle, FakeCuda, Any], tiny_bundle: Path, tmp_path: Path) -> None:
    """What the builder is told, layer by layer, for the real tiny bundle's graph (FAKE TensorRT:
    its ONNX parser makes one layer per ONNX node, named after it, as TensorRT's does). FP16 rounding
    of the first layers moved MTD scores past the parity gate (RESULTS.md §27); INT8 in the flow head
    gave AUROC 0.50 (§12), so INT8 engines run only the later backbone blocks in INT8."""
    import shutil

    import onnx

    from inspectd.engines.runtime.precision import block_index, first_tap
    from inspectd.engines.runtime.tensorrt_backend import build_engine

    _, _, trt = fakes
    shutil.copytree(tiny_bundle, tmp_path / "tiny")
    bundle = load_bundle(tmp_path / "tiny")
    tap = first_tap(bundle)
    nodes = onnx.load(str(bundle.model_path)).graph.node
    upto_tap = {n.name for n in nodes if n.name.startswith("/backbone/") and block_index(n.name) <= tap}
    late = {n.name for n in nodes if block_index(n.name) > tap}
    head = {n.name for n in nodes if not n.name.startswith(("/backbone/", "/adapter/"))
            and n.op_type not in ("Shape", "ConstantOfShape")}
    assert tap is not None and late and head

    def pinned(network: Any, dtype: str) -> set[str]:
        return {layer.name for layer in network.layers if layer.precision == dtype}

    def outputs_follow_precision(network: Any) -> bool:  # float outputs pinned alike, integer ones never
        return all(layer.output_types == ({i: layer.precision for i, t in enumerate(layer.outputs)
                                           if t.dtype == "float32"} if layer.precision else {})
                   for layer in network.layers)

    build_engine(bundle, precision="fp16", max_batch=1)
    network = trt.networks[-1]
    fp32 = pinned(network, "float32")
    assert upto_tap <= fp32  # the stem and every block up to the first tap ...
    assert all(n.startswith(("/adapter/", "/backbone/")) and block_index(n) <= tap for n in fp32)  # ... nothing after
    assert any(n.startswith("/adapter/") for n in fp32)  # the input normalisation feeds the stem
    assert pinned(network, "float16") == set() and outputs_follow_precision(network)
    assert trt.builds[-1] == ["-TF32", "FP16", "PREFER_PRECISION_CONSTRAINTS"]

    build_engine(bundle, precision="int8", max_batch=1)
    network = trt.networks[-1]
    assert pinned(network, "float32") == fp32  # the same first layers in FP32
    assert pinned(network, "float16") == head  # the method's head kept out of INT8
    assert all(layer.precision is None for layer in network.layers if layer.name in late)  # INT8 allowed
    assert outputs_follow_precision(network)
    assert trt.builds[-1] == ["-TF32", "FP16", "PREFER_PRECISION_CONSTRAINTS", "INT8"]

    build_engine(bundle, precision="fp32", max_batch=1)
    assert all(layer.precision is None for layer in trt.networks[-1].layers)
    assert trt.builds[-1] == ["-TF32"]  # FP32 layers exact: no TF32
