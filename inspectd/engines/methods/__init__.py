"""Engine methods, one file each, behind the interface in base.py. `inspectd train --method NAME`."""

from __future__ import annotations

import importlib

from inspectd.engines.methods.base import FitData, Fitted, Method, MethodBase, options_from, options_to_dict

__all__ = ["FitData", "Fitted", "Method", "MethodBase", "NAMES", "get", "options_from", "options_to_dict"]

# name -> module under inspectd.engines.methods (imported on use: they import torch)
_MODULES = {"flow": "flow", "cutpaste-ae": "cutpaste_ae", "inpaint": "inpaint",
            "classifier": "classifier", "vae": "vae"}
NAMES = tuple(_MODULES)


def get(name: str) -> Method:
    if name not in _MODULES:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(NAMES)})")
    return importlib.import_module(f"inspectd.engines.methods.{_MODULES[name]}").METHOD
