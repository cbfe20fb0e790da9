"""Engine cache: these tests exercise the cache-key and file logic WITHOUT TensorRT (which
cannot be installed here). The "engine" bytes are opaque payloads; what is tested is that an
engine is only handed out for exactly its key and only while its bytes are intact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from inspectd.engines.runtime.engine_cache import EngineCache, EngineKey, StaleEngine
from inspectd.engines.runtime.precision import PRECISION_POLICY
from inspectd.errors import BackendUnavailable

KEY = EngineKey(gpu_name="NVIDIA Jetson Orin NX", compute_capability="8.7", tensorrt_version="10.3.0",
                onnx_sha256="ab" * 32, precision="fp16", input_shape=(8, 256, 256, 1))
ENGINE = b"\x00serialized-engine\x01" * 1000


def test_each_key_field_changes_the_file(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    variants = [replace(KEY, gpu_name="NVIDIA GeForce RTX 4090"), replace(KEY, compute_capability="8.9"),
                replace(KEY, tensorrt_version="10.4.0"), replace(KEY, onnx_sha256="cd" * 32),
                replace(KEY, precision="int8"), replace(KEY, input_shape=(1, 256, 256, 1)),
                replace(KEY, input_shape=(8, 256, 256, 3)), replace(KEY, precision_policy=PRECISION_POLICY)]
    paths = {cache.engine_path(k) for k in [KEY, *variants]}
    assert len(paths) == 1 + len(variants)
    assert cache.engine_path(KEY) == cache.engine_path(EngineKey.from_dict(KEY.as_dict()))  # stable
    assert cache.engine_path(KEY).name.startswith("nvidia-jetson-orin-nx_sm87_trt10.3.0_fp16_b8x256x256x1_")


def test_bad_key_values_are_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        replace(KEY, precision="fp8")
    with pytest.raises(ValueError, match="sha256"):
        replace(KEY, onnx_sha256="nothex")
    with pytest.raises(ValueError, match="input_shape"):
        replace(KEY, input_shape=(0, 256, 256, 1))


def test_store_then_lookup_round_trip(tmp_path: Path) -> None:
    cache = EngineCache.for_bundle(tmp_path)
    path = cache.store(KEY, ENGINE)
    assert path.parent == tmp_path / "engines"
    assert cache.lookup(KEY) == path and path.read_bytes() == ENGINE
    sidecar = json.loads(cache.sidecar_path(KEY).read_text())
    assert EngineKey.from_dict(sidecar["key"]) == KEY and sidecar["size"] == len(ENGINE)
    assert cache.known_keys() == [KEY]
    assert not list(tmp_path.glob("engines/*.tmp"))  # no leftovers from the atomic writes


def test_missing_engine_names_the_engines_that_are_there(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, ENGINE)
    other = replace(KEY, gpu_name="NVIDIA GeForce RTX 3060", compute_capability="8.6")
    with pytest.raises(StaleEngine, match=r"no cached engine for NVIDIA GeForce RTX 3060.*Jetson Orin NX"):
        cache.lookup(other)


def test_an_engine_built_before_the_precision_policy_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    """Engines built before FP16 builds kept the first layers in FP32 (and TF32 off) have no
    policy in their sidecar: they are named as such and not loaded."""
    cache = EngineCache(tmp_path)
    old = cache.store(KEY, ENGINE)
    sidecar = json.loads(cache.sidecar_path(KEY).read_text())
    del sidecar["key"]["precision_policy"]  # as written before the field existed
    cache.sidecar_path(KEY).write_text(json.dumps(sidecar))
    assert EngineKey.from_dict(sidecar["key"]) == KEY and cache.lookup(KEY) == old  # still readable ...
    current = replace(KEY, precision_policy=PRECISION_POLICY)
    with pytest.raises(StaleEngine, match=r"no cached engine for .*fp16 \(fp32-to-first-tap,int8-late-backbone-only,no-tf32\).*"
                                          r"cached engines here are for: .*fp16 \(no precision policy\)"):
        cache.lookup(current)  # ... but not for a build with today's policy


def test_truncated_engine_is_refused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, ENGINE)
    path.write_bytes(ENGINE[: len(ENGINE) // 2])
    with pytest.raises(StaleEngine, match="truncated"):
        cache.lookup(KEY)


def test_corrupt_engine_same_size_is_refused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, ENGINE)
    data = bytearray(ENGINE)
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StaleEngine, match="corrupt .*sha256"):
        cache.lookup(KEY)


def test_engine_renamed_to_another_key_is_refused(tmp_path: Path) -> None:
    """An engine copied under another key's name (e.g. from another GPU) is not loaded."""
    cache = EngineCache(tmp_path)
    src = replace(KEY, gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    cache.store(src, ENGINE)
    cache.engine_path(src).rename(cache.engine_path(KEY))
    cache.sidecar_path(src).rename(cache.sidecar_path(KEY))
    with pytest.raises(StaleEngine, match=r"built for NVIDIA GeForce RTX 4090 \(sm 8.9\).*not for NVIDIA Jetson"):
        cache.lookup(KEY)


@pytest.mark.parametrize("sidecar_text", [None, "{not json", '{"key": {}}', "[]"])
def test_missing_or_broken_sidecar_is_refused(tmp_path: Path, sidecar_text: str | None) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, ENGINE)
    if sidecar_text is None:
        cache.sidecar_path(KEY).unlink()
    else:
        cache.sidecar_path(KEY).write_text(sidecar_text)
    with pytest.raises(StaleEngine, match="sidecar"):
        cache.lookup(KEY)


def test_stale_engine_is_rebuilt_when_building_is_allowed(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.store(KEY, ENGINE)
    path.write_bytes(b"garbage")
    builds: list[int] = []

    def build() -> bytes:
        builds.append(1)
        return b"fresh engine"

    got, why = cache.get_or_build(KEY, build)
    assert builds == [1] and got.read_bytes() == b"fresh engine" and "truncated" in (why or "")
    again, why2 = cache.get_or_build(KEY, build)  # now valid: no second build
    assert builds == [1] and again == got and why2 is None


def test_stale_engine_without_building_is_a_clear_error(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, ENGINE).write_bytes(b"x")
    with pytest.raises(BackendUnavailable, match="truncated.*building is disabled.*inspectd build-engine"):
        cache.get_or_build(KEY, None)
    with pytest.raises(BackendUnavailable, match="no cached engine.*building is disabled"):
        cache.get_or_build(replace(KEY, precision="int8"), None)


def test_failed_build_leaves_no_loadable_engine(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def build() -> bytes:
        raise BackendUnavailable("TensorRT failed to build")

    with pytest.raises(BackendUnavailable, match="failed to build"):
        cache.get_or_build(KEY, build)
    with pytest.raises(StaleEngine):
        cache.lookup(KEY)
