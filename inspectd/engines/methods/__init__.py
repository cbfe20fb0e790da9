"""Engine methods, one file each, behind the interface in base.py. `inspectd train --method NAME`."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from inspectd.engines.methods.base import FitData, Fitted, Method

__all__ = ["FitData", "Fitted", "Method", "NAMES", "get", "options_from", "options_to_dict"]

# name -> module under inspectd.engines.methods (imported on use: they import torch)
_MODULES = {"flow": "flow", "cutpaste-ae": "cutpaste_ae", "inpaint": "inpaint",
            "classifier": "classifier"}
NAMES = tuple(_MODULES)


def get(name: str) -> Method:
    if name not in _MODULES:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(NAMES)})")
    return importlib.import_module(f"inspectd.engines.methods.{_MODULES[name]}").METHOD


def options_from(cls: type, raw: dict[str, Any], method: str) -> Any:
    """A method's options dataclass from raw values (CLI strings or manifest JSON): unknown keys
    and values of the wrong type are a ValueError naming the option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"option {key!r} is not an option of method {method} "
                             f"(options: {', '.join(f.replace('_', '-') for f in fields) or 'none'})")
        default = fields[name].default
        kind = type(default) if default is not dataclasses.MISSING else str
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes", "on")
            elif kind in (int, float, str):
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"option {key}={value!r}: expected {kind.__name__} for method {method}") from None
        kwargs[name] = value
    options = cls(**kwargs)
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
