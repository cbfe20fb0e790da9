"""The daemon's one YAML configuration file and its schema.

Every model forbids unknown keys, so a typo (`latency_budget`) is an error instead of a silently
ignored setting. `load_config` turns any problem into one ConfigError line that names the file,
the field path (`lines[1].latency_budget_ms`) and what was expected. Relative paths in the file
resolve against the file's own folder, so a config works from any working directory.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from inspectd.errors import ConfigError

__all__ = ["DaemonConfig", "LineConfig", "GenicamSourceConfig", "ReplaySourceConfig", "SourceConfig",
           "DeviceSelector", "TriggerConfig", "ThresholdFile", "ZmqConfig", "CurveConfig",
           "MetricsConfig", "HeatmapConfig", "ArchiveConfig", "BackendOptions", "OnnxRuntimeOptions",
           "TensorRTOptions", "TorchOptions", "BridgesConfig", "MqttBridgeConfig", "MqttTlsConfig",
           "OpcuaBridgeConfig", "OpcuaSecurityConfig", "BridgeCurveConfig", "load_config", "config_from_dict",
           "config_warnings", "parse_config_text", "RecipeConfig", "ShadowConfig", "DEFAULT_RECIPE"]

LINE_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
CHUNK_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"   # a GenICam name without the Chunk prefix
_ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    # The loader passes the config file's folder; without it (config built in code) paths stay as given.
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base) / value))  # readable in errors: no "dir/../x"
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------- zmq, metrics
class CurveConfig(_Strict):
    """ZeroMQ CURVE encryption for the PUB socket: the server certificate (as written by
    `zmq.auth.create_certificates`, holding public + secret key) and, optionally, a folder of
    client public certificates allowed to connect (None = any client that knows the server key)."""

    server_secret_key_file: ConfigPath
    allowed_clients_dir: ConfigPath | None = None


class ZmqConfig(_Strict):
    endpoint: str = "tcp://127.0.0.1:5555"
    sndhwm: int = Field(1000, ge=1)
    linger_ms: int = Field(0, ge=0)
    curve: CurveConfig | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint_scheme(cls, value: str) -> str:
        if not value.startswith(_ZMQ_SCHEMES) or len(value) <= value.index("://") + 3:
            raise ValueError(f"expected a ZeroMQ endpoint like tcp://127.0.0.1:5555 or ipc:///run/x.sock, "
                             f"got {value!r}")
        return value


class MetricsConfig(_Strict):
    # 127.0.0.1 by default: metrics reveal line state, exposing them is a deliberate choice.
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)  # 0 = any free port (tests)
    # The read-only live page (/, /live) on the same endpoint: it shows part images, so a box that
    # exposes its metrics to a network may want it off.
    live: bool = True
    # Further names the live view answers to (a DNS alias, a reverse proxy's name); besides the
    # loopback names, this box's own host name and the address a browser connected to (live.py).
    live_hosts: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------- sources
class DeviceSelector(_Strict):
    """Exactly one way to pick the camera among those the producer (.cti) lists."""

    serial: str | None = None
    id: str | None = None
    index: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "DeviceSelector":
        given = [k for k in ("serial", "id", "index") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("expected exactly one of serial, id, index"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def describe(self) -> str:
        for key in ("serial", "id", "index"):
            if getattr(self, key) is not None:
                return f"{key} {getattr(self, key)!r}"
        return "?"


class TriggerConfig(_Strict):
    mode: Literal["Off", "On"] = "Off"
    source: str | None = None  # e.g. Software, Line0; written only when given
    # Which trigger mode and source apply to (SFNC TriggerSelector), written before them. Unset:
    # FrameStart on a camera that has a TriggerSelector (one part, one frame), nothing on one without.
    selector: str | None = None


class GenicamSourceConfig(_Strict):
    type: Literal["genicam"]
    cti: ConfigPath
    device: DeviceSelector
    pixel_format: str | None = None          # written and read back when given
    exposure_us: float | None = Field(None, gt=0)
    trigger: TriggerConfig | None = None
    # Further GenICam features written (and read back) after the ones above, e.g. {Gain: 2.0}.
    features: dict[str, Union[bool, int, float, str]] = Field(default_factory=dict)

    @field_validator("features", mode="before")
    @classmethod
    def _feature_values(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, item in value.items():
                if not isinstance(item, (bool, int, float, str)):
                    raise ValueError(f"feature {name!r}: expected a number, string or true/false, got {item!r}")
        return value
    fetch_timeout_s: float = Field(1.0, gt=0)
    # While waiting for a frame the source asks the camera every poll_ms (genicam's GenTL calls keep
    # the GIL while they block, so it never waits inside them): a frame waits at most this long, and
    # each ask costs CPU (at 2 ms a few % of one core per camera: benchmarks/RESULTS.md §20).
    poll_ms: float = Field(2.0, ge=0.5, le=50.0)
    reconnect_backoff_s: tuple[float, float] = (0.5, 10.0)

    @field_validator("reconnect_backoff_s")
    @classmethod
    def _backoff_order(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (0 < low <= high) or not math.isfinite(high):
            raise ValueError(f"expected [min, max] seconds with 0 < min <= max, got {list(value)}")
        return value


class ReplaySourceConfig(_Strict):
    type: Literal["replay"]
    path: ConfigPath                         # folder of images, or a video file
    fps: float | None = Field(None, gt=0)    # None = as fast as the pipeline takes frames
    loop: bool = False
    # Label frames "good"/"bad" from good/ and bad/ subfolders or file names (Frame.meta["label"]).
    labels_from_subfolders: bool = True
    # auto: grey files give H x W frames, colour files RGB; or force one for every frame.
    color: Literal["auto", "rgb", "gray"] = "auto"
    # A looping replay keeps its first pass decoded in memory (MiB) instead of decoding every
    # pass, as a camera hands over decoded frames; 0 = decode every pass.
    cache_mb: float = Field(256, ge=0)


SourceConfig = Annotated[Union[GenicamSourceConfig, ReplaySourceConfig], Field(discriminator="type")]


# ---------------------------------------------------------------------------------------- line
class ThresholdFile(_Strict):
    file: ConfigPath  # calibration output (JSON) holding the line's threshold


class HeatmapConfig(_Strict):
    publish: Literal["none", "ng", "all"] = "ng"
    width: int = Field(64, ge=1, le=4096)
    height: int = Field(64, ge=1, le=4096)
    encoding: Literal["png", "raw"] = "png"


class ArchiveConfig(_Strict):
    enabled: bool = False
    dir: ConfigPath = Path("/var/lib/inspectd/archive")
    quota_mb: int = Field(1024, gt=0)
    save: Literal["ng", "all"] = "ng"
    # Frames waiting for a slow disk are held in memory: at most this much (then records are dropped, counted).
    queue_mb: int = Field(256, gt=0)


# ---------------------------------------------------------------------------------------- backend options
# One typed model per backend, holding exactly the keyword arguments its class takes (engines/runtime/*),
# so a typo fails `check-config` instead of giving every part a fail-safe verdict on the line. None =
# the backend's own default; the daemon passes only the keys that are set (model_dump(exclude_none=True)).
class OnnxRuntimeOptions(_Strict):
    intra_op_threads: int | None = Field(None, ge=0)   # 0 = the documented default (thread_budget)
    # true: pool threads spin between the operators of one call (never after it returns): faster, but
    # only on a box that runs nothing else; one busy process beside it makes parts miss the deadline.
    spin: bool | None = None
    device: Literal["cpu", "cuda"] | None = None        # cuda: ORT's TensorRT/CUDA providers
    fp16: bool | None = None                            # with device: cuda
    # int8: the bundle's cached INT8 model (inspectd build-engine --backend onnxruntime --precision int8),
    # CPU only; used only after the parity gate passes on the golden images, else the line falls back.
    precision: Literal["fp32", "int8"] | None = None
    int8_recipe: Literal["backbone-late", "backbone", "backbone-conv", "all-conv", "all"] | None = None


class TensorRTOptions(_Strict):
    # No `build`: the daemon never builds an engine (inspectd build-engine does, ahead of time).
    precision: Literal["fp32", "fp16", "int8"] | None = None
    device: int | None = Field(None, ge=0)              # CUDA device index
    max_batch: int | None = Field(None, ge=1)
    workspace_mb: int | None = Field(None, ge=1)
    start_timeout_s: float | None = Field(None, gt=0)


class TorchOptions(_Strict):
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d+)?)$")
    fp16: bool | None = None
    cuda_graph: bool | None = None
    graph_batch: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=0)


class BackendOptions(_Strict):
    onnxruntime: OnnxRuntimeOptions | None = None
    tensorrt: TensorRTOptions | None = None
    torch: TorchOptions | None = None

    def _given(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    # Read like the {backend: {option: value}} dict this replaced (dict(options) works), holding
    # only the options that are set: exactly the keyword arguments the backend classes take.
    def keys(self) -> list[str]:
        return self._given()

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._given():
            raise KeyError(name)
        return getattr(self, name).model_dump(exclude_none=True)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: self[name] for name in self._given()}


def _known_backends() -> tuple[str, ...]:
    from inspectd.engines.runtime import BACKENDS  # no torch: the factory imports backends lazily
    return tuple(BACKENDS)


RECIPE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
DEFAULT_RECIPE = "default"   # the line's own bundle + threshold: the implicit recipe of every line


def finite_number(value: int | float) -> bool:
    """math.isfinite, also for an integer literal no float can hold (False, not OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_threshold_shape(value: Any) -> Any:
    # One clear message instead of pydantic's per-union-member errors.
    if isinstance(value, bool) or not isinstance(value, (int, float, dict, ThresholdFile)):
        raise ValueError(f"expected a number or {{file: calib.json}}, got {repr(value)[:40]}")
    if isinstance(value, (int, float)) and not finite_number(value):
        raise ValueError(f"expected a finite number, got {repr(value)[:40]}")
    return value


def _check_roi_shape(value: Any) -> Any:
    if value is None:
        return value
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"expected [x, y, w, h] (4 integers) or null, got {value!r}")
    x, y, w, h = value
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise ValueError(f"expected [x, y, w, h] with x, y >= 0 and w, h > 0, got {list(value)}")
    return value


class RecipeConfig(_Strict):
    """A named alternative to the line's own bundle + threshold (which is the recipe `default`).
    The bundle records its own ROI/tiles; `roi`, when given, must be the bundle's (check-config)."""

    name: str = Field(pattern=RECIPE_NAME_PATTERN)
    bundle: ConfigPath
    threshold: Union[float, ThresholdFile]
    roi: tuple[int, int, int, int] | None = None
    preload: bool = False   # open + warm its engine at start (instant switch; costs memory per engine)

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_shape(cls, value: Any) -> Any:
        return _check_threshold_shape(value)

    @field_validator("roi", mode="before")
    @classmethod
    def _roi_shape(cls, value: Any) -> Any:
        return _check_roi_shape(value)


class ShadowConfig(_Strict):
    """A candidate bundle scored on the same frames as the active one, off the critical path."""

    bundle: ConfigPath
    threshold: Union[float, ThresholdFile]
    queue_size: int = Field(2, ge=1, le=64)          # frames waiting for the shadow; full = oldest dropped
    correlation_window: int = Field(200, ge=3, le=100000)   # pairs in the rolling Pearson correlation

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_shape(cls, value: Any) -> Any:
        return _check_threshold_shape(value)


class LineConfig(_Strict):
    id: str = Field(pattern=LINE_ID_PATTERN, max_length=64)
    source: SourceConfig
    roi: tuple[int, int, int, int] | None = None   # x, y, w, h in source pixels
    bundle: ConfigPath
    backends: list[str] = Field(default_factory=lambda: ["tensorrt", "onnxruntime"], min_length=1)
    backend_options: BackendOptions = Field(default_factory=BackendOptions)
    threshold: Union[float, ThresholdFile]      # applies to the NORMALIZED score
    latency_budget_ms: float = Field(50.0, gt=0)
    on_deadline_miss: Literal["NG", "OK", "SKIP"] = "NG"
    queue_size: int = Field(4, ge=1, le=1024)
    heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    # GenICam chunk values passed through in every verdict header (`chunks: {name: value}`), e.g.
    # [EncoderValue, Timestamp]: read from the buffer's chunk data (node Chunk<name>); a chunk the
    # camera does not deliver is null (one warning per name), never a stopped line.
    chunks: list[Annotated[str, Field(pattern=CHUNK_NAME_PATTERN, max_length=64)]] = Field(default_factory=list)
    # Named recipes besides the line's own bundle/threshold (recipe `default`); `recipe` is the one
    # active at start (a switch or promote through the control socket persists in state_dir).
    recipes: list[RecipeConfig] = Field(default_factory=list)
    recipe: str = Field(DEFAULT_RECIPE, pattern=RECIPE_NAME_PATTERN)
    shadow: ShadowConfig | None = None

    @model_validator(mode="after")
    def _recipe_names(self) -> "LineConfig":
        names = [r.name for r in self.recipes]
        if DEFAULT_RECIPE in names:
            raise ValueError(f"recipe name {DEFAULT_RECIPE!r} is the line's own bundle/threshold; pick another")
        if len(set(names)) != len(names):
            raise ValueError(f"recipe listed twice in {names}")
        if self.recipe != DEFAULT_RECIPE and self.recipe not in names:
            raise ValueError(f"recipe {self.recipe!r} is not among the line's recipes "
                             f"({', '.join([DEFAULT_RECIPE] + names)})")
        return self

    @field_validator("chunks")
    @classmethod
    def _chunks_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"chunk listed twice in {value}")
        return value

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_shape(cls, value: Any) -> Any:
        return _check_threshold_shape(value)

    @field_validator("roi", mode="before")
    @classmethod
    def _roi_shape(cls, value: Any) -> Any:
        return _check_roi_shape(value)

    @field_validator("backends")
    @classmethod
    def _backends_known(cls, value: list[str]) -> list[str]:
        known = _known_backends()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown backend {name!r} (known: {', '.join(known)})")
        if len(set(value)) != len(value):
            raise ValueError(f"backend listed twice in {value}")
        return value

    @model_validator(mode="after")
    def _options_for_listed_backends(self) -> "LineConfig":
        extra = sorted(set(self.backend_options.keys()) - set(self.backends))
        if extra:
            raise ValueError(f"backend_options for {', '.join(extra)} which is not in backends {self.backends}")
        return self



# ---------------------------------------------------------------------------------------- PLC bridges
# `inspectd bridge mqtt|opcua --config FILE`: separate processes that subscribe to the verdict
# stream (inspectd/bridges/) and republish it; they read this same file (the lines, the zmq
# section, heartbeat_interval_s) plus the `bridges` section below.
_MQTT_TOPIC_PART = r"^[^#+\x00]+$"


class BridgeCurveConfig(_Strict):
    """CURVE client keys of the bridges (needed when zmq.curve is set): the bridge's own NAME.key_secret
    (its NAME.key goes into zmq.curve.allowed_clients_dir) and the server's public NAME.key (default:
    the public half of zmq.curve.server_secret_key_file)."""

    client_secret_key_file: ConfigPath
    server_key_file: ConfigPath | None = None


class MqttTlsConfig(_Strict):
    ca: ConfigPath | None = None          # CA bundle that signed the broker's certificate (None: system CAs)
    cert: ConfigPath | None = None        # client certificate + key (mutual TLS), both or neither
    key: ConfigPath | None = None

    @model_validator(mode="after")
    def _cert_and_key(self) -> "MqttTlsConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (client certificate and its private key)")
        return self


class MqttBridgeConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    # The password lives in its own file (mode 0600), never in the config.
    password_file: ConfigPath | None = None
    tls: MqttTlsConfig | None = None
    client_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,40}$")  # default inspectd-<host>
    topic_prefix: str = Field("inspectd", max_length=100)
    qos: Literal[0, 1, 2] = 1
    keepalive_s: int = Field(10, ge=2, le=3600)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if (not value or value.startswith("/") or value.endswith("/") or "//" in value
                or not re.fullmatch(_MQTT_TOPIC_PART, value)):
            raise ValueError(f"expected topic levels like inspectd or plant/inspectd (no wildcards # +), "
                             f"got {value!r}")
        return value

    @model_validator(mode="after")
    def _password_needs_user(self) -> "MqttBridgeConfig":
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file without username")
        return self


class OpcuaSecurityConfig(_Strict):
    """Basic256Sha256 SignAndEncrypt only; with security on, anonymous access is off and a client
    must present (as its user identity) one of the certificates in trusted_clients_dir."""

    policy: Literal["Basic256Sha256"] = "Basic256Sha256"
    mode: Literal["SignAndEncrypt"] = "SignAndEncrypt"
    certificate: ConfigPath               # the server's application certificate (PEM or DER)
    private_key: ConfigPath               # its private key (PEM), mode 0600
    trusted_clients_dir: ConfigPath       # client certificates (*.pem, *.der) admitted


class OpcuaBridgeConfig(_Strict):
    # Loopback by default: exposing the server to the plant network is a deliberate choice (with security).
    endpoint: str = "opc.tcp://127.0.0.1:4840/inspectd/"
    namespace_uri: str = Field("urn:inspectd", min_length=1)
    security: OpcuaSecurityConfig | None = None
    # How long SetRecipe waits for the daemon: less than the PLC's OPC UA call timeout (asyncua's
    # default: 4 s), or a switch could be made after the PLC took the call as failed. Over 1 s: the
    # daemon keeps 1 s of it to get the answer back (control.ANSWER_MARGIN_S).
    set_recipe_timeout_s: float = Field(3.0, gt=1.0, le=330.0)

    @field_validator("endpoint")
    @classmethod
    def _opc_endpoint(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^/:\s]+:\d{1,5}(/\S*)?", value):
            raise ValueError(f"expected opc.tcp://HOST:PORT/PATH, e.g. opc.tcp://127.0.0.1:4840/inspectd/, "
                             f"got {value!r}")
        return value


class BridgesConfig(_Strict):
    # Where the bridges subscribe; default: zmq.endpoint (a 0.0.0.0 / * bind is reached on 127.0.0.1).
    endpoint: str | None = None
    curve: BridgeCurveConfig | None = None
    # No heartbeat for this long -> the line is offline / not Healthy. Default: 2 heartbeat intervals
    # (i.e. reported within one interval after the next heartbeat was due).
    stale_after_s: float | None = Field(None, gt=0)
    mqtt: MqttBridgeConfig | None = None
    opcua: OpcuaBridgeConfig | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint_scheme(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith(_ZMQ_SCHEMES) or len(value) <= value.index("://") + 3):
            raise ValueError(f"expected a ZeroMQ endpoint like tcp://127.0.0.1:5555, got {value!r}")
        return value


class DaemonConfig(_Strict):
    zmq: ZmqConfig = Field(default_factory=ZmqConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Writable state (the unit's ReadWritePaths): calibration reports go to <state_dir>/<line>/calibration/.
    state_dir: ConfigPath = Path("/var/lib/inspectd")
    lines: list[LineConfig] = Field(min_length=1)
    bridges: BridgesConfig | None = None   # PLC bridges (inspectd bridge mqtt|opcua); the daemon ignores it

    @field_validator("lines")
    @classmethod
    def _unique_ids_and_cameras(cls, lines: list[LineConfig]) -> list[LineConfig]:
        seen: dict[str, int] = {}
        cameras: dict[tuple[str, str], str] = {}
        for i, line in enumerate(lines):
            if line.id in seen:
                raise ValueError(f"line id {line.id!r} is used by lines[{seen[line.id]}] and lines[{i}]")
            seen[line.id] = i
            src = line.source
            if isinstance(src, GenicamSourceConfig):
                # A camera can be opened by one line only (GenTL: resource in use).
                key = (str(src.cti), src.device.describe())
                if key in cameras:
                    raise ValueError(f"lines {cameras[key]!r} and {line.id!r} use the same camera "
                                     f"({src.device.describe()} on {src.cti})")
                cameras[key] = line.id
        return lines

    def line(self, line_id: str) -> LineConfig:
        for line in self.lines:
            if line.id == line_id:
                return line
        raise ConfigError(f"no line {line_id!r} (lines: {', '.join(l.id for l in self.lines)})")


# ---------------------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML would silently keep the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...]:
    """The non-None members of a Union (`X | None` alone is no union to pydantic: no member tag)."""
    if get_origin(tp) in (Union, UnionType):
        return tuple(arg for arg in get_args(tp) if arg is not type(None))
    return ()


def _union_member(members: tuple[Any, ...], tag: str, discriminator: str | None) -> Any:
    """The member pydantic names `tag`: by discriminator value, else by type name (`float`, `ThresholdFile`)."""
    for member in map(_unwrap, members):
        if discriminator is not None and isinstance(member, type) and issubclass(member, BaseModel):
            field = member.model_fields.get(discriminator)
            if field is not None and tag in get_args(field.annotation):
                return member
        elif getattr(member, "__name__", None) == tag:
            return member
    return None


def _child(tp: Any, part: Any) -> tuple[Any, str | None]:
    """(the type found at `part` inside `tp`, its discriminator); (None, None) past what the schema knows."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        if field is None:  # an unknown key: nothing below it to follow
            return None, None
        return field.annotation, field.discriminator if isinstance(field.discriminator, str) else None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, set, frozenset) and args:
        return args[0], None
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], None
        return (args[part], None) if isinstance(part, int) and 0 <= part < len(args) else (None, None)
    if origin is dict and len(args) == 2:
        return args[1], None
    return None, None


def _walk_loc(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """(`loc` without pydantic's union-member tags, the path of the first non-discriminated union it
    goes through or None). Follows the schema, so a tag is dropped at any depth (a recipe's or
    shadow's threshold too) while a key the operator wrote, even one spelt `float`, is kept:
    ('lines', 1, 'source', 'genicam', 'cti') -> ('lines', 1, 'source', 'cti')."""
    out: list[Any] = []
    union_at: tuple[Any, ...] | None = None
    tp: Any = DaemonConfig
    discriminator: str | None = None
    for part in loc:
        tp = _unwrap(tp)
        members = _union_members(tp)
        if len(members) == 1:  # Optional: pydantic adds no tag
            tp = _unwrap(members[0])
            members = ()
        if len(members) > 1 and isinstance(part, str):
            # Every member of a smart union reports its own failure: together they are one problem.
            if discriminator is None and union_at is None:
                union_at = tuple(out)
            tp, discriminator = _union_member(members, part, discriminator), None
            continue
        out.append(part)
        tp, discriminator = _child(tp, part) if tp is not None else (None, None)
    return tuple(out), union_at


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """('lines', 1, 'source', 'genicam', 'cti') -> ('lines', 1, 'source', 'cti')."""
    return _walk_loc(loc)[0]


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _field_path(loc: tuple[Any, ...]) -> str:
    """('lines', 1, 'latency_budget_ms') -> 'lines[1].latency_budget_ms'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(str(part)):
            out += f"[{str(part)[:40]!r}]"  # a key with spaces, newlines, ...: quoted, one line
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _pick_error(errors: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The error to report and how many distinct problems there are. A value that fails every
    member of a union (a threshold: number or {file:}, on a line, recipe or shadow) yields one error
    per member; they count as one problem, and the most specific one (a member's own complaint: the
    `threshold: {fil: x}` typo) beats "Input should be a valid number"."""
    by_path: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for err in errors:
        stripped, union_at = _walk_loc(tuple(err["loc"]))
        by_path.setdefault(union_at if union_at is not None else stripped, []).append(err)
    by_path = _pair_misspellings(by_path)
    first_group = next(iter(by_path.values()))
    deepest = max(len(e["loc"]) for e in first_group)
    members = [e for e in first_group if len(e["loc"]) == deepest]
    # A misspelt key explains a "missing" one next to it: report the misspelling.
    chosen = next((e for e in members if e["type"] == "extra_forbidden"), members[0])
    return chosen, len(by_path)


def _pair_misspellings(by_path: dict[tuple[Any, ...], list[dict[str, Any]]]
                       ) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """`treshold:` gives two errors, `threshold` missing and `treshold` unknown: one problem, shown
    as the unknown key with the one it resembles (in the missing one's place)."""
    unknown = {path: group for path, group in by_path.items()
               if path and isinstance(path[-1], str) and any(e["type"] == "extra_forbidden" for e in group)}
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    taken: set[tuple[Any, ...]] = set()
    for path, group in by_path.items():
        if path in taken:
            continue
        if path and isinstance(path[-1], str) and all(e["type"] == "missing" for e in group):
            near = {p[-1]: p for p in unknown if p[:-1] == path[:-1] and p not in taken}
            match = difflib.get_close_matches(path[-1], list(near), n=1, cutoff=0.6)
            if match:
                typo = near[match[0]]
                taken.add(typo)
                out[typo] = [dict(e, did_you_mean=path[-1]) for e in by_path[typo]]
                continue
        out[path] = group
    return out


def _describe_error(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        if err.get("did_you_mean"):
            return f"unknown key (did you mean {err['did_you_mean']}?)"
        return "unknown key (not part of the schema; check the spelling)"
    if kind == "missing":
        return "required field is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        msg = "expected type: genicam or replay" + (f" (got {err['input'].get('type')!r})"
                                                     if isinstance(err.get("input"), dict) and "type" in err["input"]
                                                     else "")
        return msg
    else:
        value = err.get("input")
        if isinstance(value, (str, int, float, bool)) or value is None:
            msg += f" (got {value!r})"
        elif isinstance(value, (list, dict)):
            msg += f" (got a {'list' if isinstance(value, list) else 'mapping'})"
    return msg


def config_from_dict(raw: Any, source: str = "<config>", base_dir: str | os.PathLike | None = None,
                     validate_paths: bool = False) -> DaemonConfig:
    """Validate an already-parsed mapping (tests, generated configs). Errors name `source`."""
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}, not a mapping"
        raise ConfigError(f"{source}: the file is {kind} (expected keys such as zmq, metrics, lines)")
    try:
        config = DaemonConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        first, count = _pick_error(exc.errors())
        more = f" (and {count - 1} more error{'s' if count > 2 else ''})" if count > 1 else ""
        where = _field_path(_strip_union_tags(tuple(first["loc"])))
        raise ConfigError(f"{source}: {where}: {_describe_error(first)}{more}") from None
    if validate_paths:
        check_paths(config, source)
    return config


def load_config(path: str | os.PathLike, validate_paths: bool = False) -> DaemonConfig:
    """Read and validate the daemon config. Every problem is one ConfigError line (exit code 2)
    naming the file, the field path and what was expected. `validate_paths` also checks that
    bundles, .cti files, threshold files and replay inputs exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return config_from_dict(parse_config_text(text, path), source=str(path), base_dir=path.resolve().parent,
                            validate_paths=validate_paths)


def parse_config_text(text: str, source: str | os.PathLike) -> Any:
    """The YAML of a config file, parsed as the daemon reads it (a duplicate key is an error, not
    last-one-wins); ConfigError naming `source` and the line. Tools that read or edit the daemon's
    config (inspectd calibrate) use this, so they never accept a file the daemon refuses."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}:{where}: YAML syntax error: {problem}") from None


def _check_threshold_file(source: str, where: str, bundle: Path, threshold: Any, active: bool) -> None:
    """Read a threshold file as the daemon will: readable (check-config runs as the service user),
    a finite threshold; for what judges from the start (`active`), calibrated for the bundle it
    would judge, as the daemon refuses to start otherwise. (A recipe or shadow waiting with another
    bundle's file is refused when it is asked for, with the reason, like the daemon does.)"""
    if not isinstance(threshold, ThresholdFile):
        return
    from inspectd.daemon.line import read_calibration
    from inspectd.engines.bundle import read_bundle_id
    try:
        read_calibration(threshold.file, read_bundle_id(bundle) if active else None)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {where}.threshold.file: {exc}") from None


def _check_bundle_and_threshold(source: str, where: str, bundle: Path, threshold: Any, active: bool = False) -> None:
    from inspectd.engines.bundle import MANIFEST
    if not (bundle / MANIFEST).is_file():
        raise ConfigError(f"{source}: {where}.bundle: {bundle} is not a bundle (no {MANIFEST})")
    _check_threshold_file(source, where, bundle, threshold, active)


def check_paths(config: DaemonConfig, source: str = "<config>") -> None:
    """ConfigError naming the field for the first referenced path that does not exist."""
    for i, line in enumerate(config.lines):
        where = f"lines[{i}]"
        if not line.bundle.is_dir():
            raise ConfigError(f"{source}: {where}.bundle: {line.bundle} "
                              f"{'does not exist' if not line.bundle.exists() else 'is not a folder'}")
        from inspectd.engines.bundle import MANIFEST
        if not (line.bundle / MANIFEST).is_file():
            raise ConfigError(f"{source}: {where}.bundle: {line.bundle} is not a bundle (no {MANIFEST})")
        from inspectd.engines.bundle import check_line_roi_at
        check_line_roi_at(line.roi, line.bundle, f"{source}: {where}.roi")  # same pixels as training
        for j, recipe in enumerate(line.recipes):
            _check_bundle_and_threshold(source, f"{where}.recipes[{j}]", recipe.bundle, recipe.threshold,
                                        active=recipe.name == line.recipe)
            check_line_roi_at(recipe.roi, recipe.bundle, f"{source}: {where}.recipes[{j}].roi")
        if line.shadow is not None:
            _check_bundle_and_threshold(source, f"{where}.shadow", line.shadow.bundle, line.shadow.threshold)
        src = line.source
        if isinstance(src, GenicamSourceConfig) and not src.cti.is_file():
            raise ConfigError(f"{source}: {where}.source.cti: {src.cti} does not exist (GenTL producer file)")
        if isinstance(src, GenicamSourceConfig):
            _check_camera_frames(source, where, src, [line.bundle] + [r.bundle for r in line.recipes])
        if isinstance(src, ReplaySourceConfig) and not src.path.exists():
            raise ConfigError(f"{source}: {where}.source.path: {src.path} does not exist")
        if isinstance(line.threshold, ThresholdFile) and not line.threshold.file.is_file():
            raise ConfigError(f"{source}: {where}.threshold.file: {line.threshold.file} does not exist")
        _check_threshold_file(source, where, line.bundle, line.threshold, active=line.recipe == DEFAULT_RECIPE)
    curve = config.zmq.curve
    if curve is not None:
        if not curve.server_secret_key_file.is_file():
            raise ConfigError(f"{source}: zmq.curve.server_secret_key_file: "
                              f"{curve.server_secret_key_file} does not exist")
        if curve.allowed_clients_dir is not None and not curve.allowed_clients_dir.is_dir():
            raise ConfigError(f"{source}: zmq.curve.allowed_clients_dir: {curve.allowed_clients_dir} "
                              f"is not a folder")


def _check_camera_frames(source: str, where: str, src: GenicamSourceConfig, bundles: list[Path]) -> None:
    """A camera told to deliver another Width or Height than the frames a bundle of the line was trained
    on, or mono frames to a bundle trained on colour ones, would have every frame refused (fail-safe
    verdicts): said before the line starts."""
    from inspectd.engines.bundle import read_bundle_color_mode, read_bundle_frame_size

    for key, asked in (("pixel_format", src.pixel_format), ("features.PixelFormat", src.features.get("PixelFormat"))):
        if not (isinstance(asked, str) and asked.startswith("Mono")):
            continue
        for bundle in bundles:
            if read_bundle_color_mode(bundle) == "rgb":
                raise ConfigError(f"{source}: {where}.source.{key}: {asked}, but the bundle {bundle} was trained on "
                                  f"colour frames: every frame would get the fail-safe verdict; set a colour pixel "
                                  f"format or train on mono frames")
    for bundle in bundles:
        trained = read_bundle_frame_size(bundle)
        for key, size in zip(("Height", "Width"), trained or ()):
            asked = src.features.get(key)
            if type(asked) is int and asked != size:
                raise ConfigError(f"{source}: {where}.source.features.{key}: {asked}, but the bundle {bundle} was "
                                  f"trained on {trained[1]}x{trained[0]} frames: every frame would get the fail-safe "
                                  f"verdict; set {key}: {size} or train on frames of this size")


_LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint ('tcp://0.0.0.0:5555' -> '0.0.0.0'); None for ipc:// and inproc://."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint[len("tcp://"):].rsplit(":", 1)[0]


def is_loopback(host: str) -> bool:
    return host.startswith(_LOOPBACK_HOSTS)


def config_warnings(config: DaemonConfig, source: str = "<config>") -> list[str]:
    """Settings that are valid but unsafe on a line; `check-config` prints them and the daemon logs
    them at start. One line each, naming the file and the field."""
    out: list[str] = []
    for i, line in enumerate(config.lines):
        if line.on_deadline_miss == "OK":
            out.append(f"{source}: lines[{i}].on_deadline_miss: OK FAILS OPEN on line {line.id}: a part without "
                       f"a result in time (deadline miss, engine error, malformed or dropped frame) is PASSED "
                       f"UNINSPECTED; use NG unless a person checks every part downstream")
    host = endpoint_host(config.zmq.endpoint)
    if host is not None and not is_loopback(host) and config.zmq.curve is None:
        out.append(f"{source}: zmq.endpoint: {config.zmq.endpoint} is reachable from other machines without "
                   f"CURVE: anyone on that network can read (and spoof a consumer of) the verdicts; "
                   f"set zmq.curve or bind 127.0.0.1")
    bridges = config.bridges
    if bridges is not None and bridges.mqtt is not None and bridges.mqtt.tls is None \
            and not is_loopback(bridges.mqtt.host):
        out.append(f"{source}: bridges.mqtt.host: {bridges.mqtt.host} without tls: verdicts and the "
                   f"broker password cross the network in clear; set bridges.mqtt.tls")
    if bridges is not None and bridges.opcua is not None and bridges.opcua.security is None:
        host = bridges.opcua.endpoint[len("opc.tcp://"):].split("/", 1)[0].rsplit(":", 1)[0]
        if not is_loopback(host):
            out.append(f"{source}: bridges.opcua.endpoint: {bridges.opcua.endpoint} without security: "
                       f"anyone on that network can read the line anonymously; set bridges.opcua.security")
    for i, line in enumerate(config.lines):
        if line.chunks and isinstance(line.source, ReplaySourceConfig):
            out.append(f"{source}: lines[{i}].chunks: replayed files carry no GenICam chunk data: "
                       f"{', '.join(line.chunks)} will be null in every verdict")
    return out


def _without_thresholds(line: dict[str, Any]) -> dict[str, Any]:
    line = {k: v for k, v in line.items() if k != "threshold"}
    line["recipes"] = [{k: v for k, v in r.items() if k != "threshold"} for r in line.get("recipes") or []]
    if line.get("shadow"):
        line["shadow"] = {k: v for k, v in line["shadow"].items() if k != "threshold"}
    return line


def _differences(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key, out)
    elif a != b:
        out.append(where)


def restart_changes(running: DaemonConfig, fresh: DaemonConfig) -> list[str]:
    """The settings a re-read config changed that a SIGHUP does not apply (it applies thresholds only):
    dotted field names, lines by id (`lines[press3].latency_budget_ms`). `bridges` belongs to the
    bridge services, not the daemon."""
    old = running.model_dump(mode="json", exclude={"bridges"})
    new = fresh.model_dump(mode="json", exclude={"bridges"})
    old_lines = {line["id"]: _without_thresholds(line) for line in old.pop("lines")}
    new_lines = {line["id"]: _without_thresholds(line) for line in new.pop("lines")}
    out: list[str] = []
    _differences(old, new, "", out)
    for line_id in sorted(set(old_lines) | set(new_lines)):
        if line_id not in new_lines or line_id not in old_lines:
            out.append(f"lines[{line_id}] ({'removed' if line_id not in new_lines else 'added'})")
        else:
            _differences(old_lines[line_id], new_lines[line_id], f"lines[{line_id}]", out)
    return out


def summary(config: DaemonConfig) -> str:
    """'2 lines: line1 (genicam), line2 (replay)' for check-config and the startup log."""
    parts = [f"{line.id} ({line.source.type})" for line in config.lines]
    return f"{len(parts)} line{'s' if len(parts) != 1 else ''}: {', '.join(parts)}"

