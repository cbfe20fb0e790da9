"""What a reduced-precision engine keeps in FP32: everything the bundle's first feature tap is
computed from (the input adapter, the backbone's stem and its blocks up to the first tap); INT8
engines also keep the method's head out of INT8 (FP16).

Why (RESULTS.md §27, the MTD default bundle, FP16 emulated on a CPU): the methods read the first
tap almost directly, and the good parts' features vary little against their magnitude, so rounding
there is amplified into the score. 16-bit rounding of the whole engine (torch autocast, and
OpenVINO's f16 on an AVX-512 FP16 CPU) moved normalised golden scores by 0.063-0.070, past the
parity gate's 0.05; with these layers in FP32 by 0.013. TF32 (10-bit mantissa inputs, what TensorRT
and cuDNN use for FP32 layers on Ampere and later GPUs by default) moved them by 0.070, so FP32
layers run with TF32 off. INT8 (ort_int8 recipe "backbone-late") keeps the same layers unquantised
for the same reason (§12).

The rule is the same for every method: the bundle manifest's backbone taps, and the graph's node
(or TensorRT layer) names, `/backbone/_blocks.N/...`, which the ONNX export gives every backbone.
A method without a backbone (inpaint, vae) keeps nothing back.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

# Recorded in every TensorRT engine's cache key: engines built without it are rebuilt, not loaded.
PRECISION_POLICY = "fp32-to-first-tap,int8-late-backbone-only,no-tf32"

# (name, input tensor names, output tensor names): an ONNX node or a TensorRT layer, in graph order.
Node = tuple[str, Sequence[str], Sequence[str]]


def first_tap(bundle: Any) -> int | None:
    """The backbone block of the bundle's first feature tap (manifest `backbone.taps`); None if none."""
    taps = list(getattr(getattr(bundle.manifest, "backbone", None), "taps", None) or [])
    return min(int(t) for t in taps) if taps else None


def block_index(name: str) -> int:
    """The backbone block index in a node name (`/backbone/_blocks.7/...` -> 7); -1 otherwise (stem)."""
    m = re.match(r"/backbone/_blocks\.(\d+)/", name)
    return int(m.group(1)) if m else -1


def full_precision_nodes(nodes: Sequence[Node], tap: int | None) -> set[str]:
    """Names of the nodes the first tap's tensor is computed from, the tap's block included. Empty
    when `tap` is None or no node belongs to that block (a graph without a backbone)."""
    if tap is None:
        return set()
    in_block = [n for n in nodes if block_index(n[0]) == tap]
    if not in_block:
        return set()
    made_in_block = {t for n in in_block for t in n[2]}
    read_in_block = {t for n in in_block for t in n[1]}
    # The tap: what block `tap` makes that it does not read itself (its output; the block's last node).
    todo = [t for t in made_in_block if t not in read_in_block]
    producer = {t: n for n in nodes for t in n[2]}
    keep: set[str] = set()
    seen: set[str] = set()
    while todo:
        tensor = todo.pop()
        if tensor in seen or tensor not in producer:
            continue  # a graph input or an initializer (weights)
        seen.add(tensor)
        name, inputs, _ = producer[tensor]
        keep.add(name)
        todo.extend(inputs)
    return keep


def layer_precisions(nodes: Sequence[Node], tap: int | None, precision: str) -> dict[str, str]:
    """Node name -> the precision a `precision` build pins it to ("float32" / "float16"); nodes not
    named are left to the builder. fp16: the first tap's ancestors FP32. int8: the same, and every
    node outside the backbone (the method's head: flow, density, map) FP16, so that only the backbone
    blocks after the first tap may run in INT8 — ONNX Runtime's default INT8 recipe ("backbone-late")
    for the same reasons: the flow's convolutions in INT8 gave AUROC 0.50 (RESULTS.md §12). A graph
    with no backbone block after the first tap keeps its head unpinned (there would be nothing left
    for INT8)."""
    if precision not in ("fp16", "int8"):
        return {}
    pins = dict.fromkeys(full_precision_nodes(nodes, tap), "float32")
    if precision == "int8" and tap is not None and any(block_index(n[0]) > tap for n in nodes):
        for name, _, _ in nodes:
            if name not in pins and not name.startswith("/backbone/"):
                pins[name] = "float16"
    return pins


def trt_layers(network: Any) -> list[Node]:
    """A TensorRT INetworkDefinition's layers as Node tuples (the ONNX parser names them after the
    ONNX nodes they come from)."""
    def names(tensors: Iterable[Any]) -> list[str]:
        return [t.name for t in tensors if t is not None]

    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        out.append((layer.name, names(layer.get_input(j) for j in range(layer.num_inputs)),
                    names(layer.get_output(j) for j in range(layer.num_outputs))))
    return out
