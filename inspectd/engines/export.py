"""Export the torch engine to ONNX (uint8 NHWC in; raw score and anomaly map out)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from inspectd.engines.bundle import INPUT_NAME, OUTPUT_NAMES
from torch import nn

OPSET = 17


def export_onnx(model: nn.Module, path: Path) -> None:
    """Any method's engine (with `.config`, a ModelConfig) traced to ONNX with a dynamic batch axis."""
    cfg = model.config
    channels = 1 if cfg.color_mode == "gray" else 3
    example = torch.zeros(1, cfg.input_height, cfg.input_width, channels, dtype=torch.uint8)
    model = model.eval().cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: self-contained, no onnxscript dependency, batch axis dynamic.
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"},
                                        OUTPUT_NAMES[1]: {0: "batch"}})
    path.write_bytes(buf.getvalue())
