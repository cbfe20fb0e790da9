"""Truncated / tampered model.onnx or cached engine -> refused with the reason, at every door:
load_bundle, the ONNX Runtime backend, the TensorRT engine cache inside the bundle folder
(`<bundle>/engines/`, pure Python: no GPU needed), and `inspectd run` (exit 1, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inspectd.engines.bundle import MANIFEST, load_bundle
from inspectd.engines.preprocess import sha256_file
from inspectd.engines.runtime.engine_cache import EngineCache, EngineKey, StaleEngine
from inspectd.engines.runtime.onnxruntime_backend import OnnxRuntimeBackend
from inspectd.errors import BundleError


@pytest.fixture()
def bundle_copy(toy_path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "toy"
    shutil.copytree(toy_path, dst)
    return dst


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip_first", "flip_last", "empty", "append"])
def test_damaged_model_onnx_is_refused_naming_the_file(bundle_copy: Path, damage: str) -> None:
    model = bundle_copy / "model.onnx"
    data = model.read_bytes()
    if damage == "truncate":
        model.write_bytes(data[: len(data) // 2])
    elif damage == "flip_first":
        _flip(model, 0)
    elif damage == "flip_last":
        _flip(model, -1)
    elif damage == "empty":
        model.write_bytes(b"")
    else:
        model.write_bytes(data + b"\x00")
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256 .*tampered or truncated") as err:
        load_bundle(bundle_copy)
    assert "\n" not in str(err.value)


def test_model_swapped_with_rehashed_manifest_is_refused_by_the_runtime(bundle_copy: Path) -> None:
    """Someone rewrites the hashes too: verification passes, ONNX Runtime refuses with the reason."""
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    digest = sha256_file(model)
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["model"]["sha256"] = manifest["files"]["model.onnx"] = digest
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="ONNX Runtime cannot load model.onnx"):
        OnnxRuntimeBackend(bundle)


def _key(bundle_path: Path, **kw: object) -> EngineKey:
    fields = dict(gpu_name="NVIDIA Jetson Orin NX", compute_capability="8.7", tensorrt_version="10.3.0",
                  onnx_sha256=sha256_file(bundle_path / "model.onnx"), precision="fp16", input_shape=(1, 32, 32, 1))
    fields.update(kw)
    return EngineKey(**fields)  # type: ignore[arg-type]


def test_engine_cache_in_the_bundle_refuses_tampered_truncated_and_stale_engines(bundle_copy: Path) -> None:
    cache = EngineCache.for_bundle(bundle_copy)
    key = _key(bundle_copy)
    engine_bytes = bytes(range(256)) * 64
    path = cache.store(key, engine_bytes)
    assert path.parent == bundle_copy / "engines"
    assert cache.lookup(key) == path
    load_bundle(bundle_copy)  # a cached engine next to the model does not break bundle verification

    _flip(path, 1000)
    with pytest.raises(StaleEngine, match=r"corrupt \(sha256"):
        cache.lookup(key)
    path.write_bytes(engine_bytes[:-1])
    with pytest.raises(StaleEngine, match="truncated or overwritten"):
        cache.lookup(key)
    path.write_bytes(engine_bytes)
    cache.sidecar_path(key).write_text("{not json")
    with pytest.raises(StaleEngine, match="unreadable engine sidecar"):
        cache.lookup(key)
    cache.sidecar_path(key).unlink()
    with pytest.raises(StaleEngine, match="no sidecar"):
        cache.lookup(key)

    # The model is re-exported (new ONNX content): the old engine is for another key, never loaded.
    cache.store(key, engine_bytes)
    new_key = _key(bundle_copy, onnx_sha256="f" * 64)
    with pytest.raises(StaleEngine, match="no cached engine for"):
        cache.lookup(new_key)
    # ... even if someone copies it over the new key's file name.
    shutil.copy(path, cache.engine_path(new_key))
    shutil.copy(cache.sidecar_path(key), cache.sidecar_path(new_key))
    with pytest.raises(StaleEngine, match="built for .* not for"):
        cache.lookup(new_key)
    # Without permission to build, the refusal says how to fix it.
    with pytest.raises(StaleEngine, match="run `inspectd build-engine`"):
        cache.get_or_build(_key(bundle_copy, precision="int8"), build=None)


def test_daemon_refuses_a_tampered_bundle_at_start_with_one_line(bundle_copy: Path, tmp_path: Path,
                                                                  toy_frames: Path) -> None:
    _flip(bundle_copy / "model.onnx", 10)
    config = tmp_path / "lines.yaml"
    config.write_text(yaml.safe_dump({
        "zmq": {"endpoint": f"ipc://{tmp_path}/v.sock"}, "metrics": {"port": 0},
        "lines": [{"id": "L1", "bundle": str(bundle_copy), "threshold": 3.0, "backends": ["onnxruntime"],
                   "source": {"type": "replay", "path": str(toy_frames)}}]}))
    proc = subprocess.run([sys.executable, "-m", "inspectd", "run", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "inspectd run: error:" in proc.stderr and "model.onnx does not match its sha256" in proc.stderr
