"""Shared parts of fitting any method: the frozen-feature cache, batching, the learning-rate
schedule, augmentation of good images, scoring, and label-free validation ranking."""

from __future__ import annotations

import io
import math
import sys
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch

from inspectd.engines.export import OPSET
from inspectd.engines.model import reduce_flat
from inspectd.errors import DataError
from inspectd.progress import Progress

if TYPE_CHECKING:
    from inspectd.engines.train import TrainConfig


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def augment(image: np.ndarray, rng: np.random.Generator, cfg: "TrainConfig") -> np.ndarray:
    """Random rotation / translation / scale of a good image (reflected borders, same size)."""
    h, w = image.shape[:2]
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if "rotate" in cfg.augment else 0.0
    scale = 1.0 + rng.uniform(-cfg.scale_range, cfg.scale_range) if "scale" in cfg.augment else 1.0
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    if "translate" in cfg.augment:
        m[:, 2] += rng.uniform(-cfg.translate_frac, cfg.translate_frac, 2) * (w, h)
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)


class PartGraph(torch.nn.Module):
    """One step of an engine, `model.<step>(images)`, as its own graph: the frozen part a method
    caches once with extract_features (the exported graph holds only what that step uses)."""

    def __init__(self, model: torch.nn.Module, step: str) -> None:
        super().__init__()
        self.model, self.step = model, step

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = getattr(self.model, self.step)(images)
        return list(out) if isinstance(out, (list, tuple)) else [out]


@contextmanager
def one_thread() -> Iterator[None]:
    """Eager PyTorch on one intra-op thread while fitting small heads: on a shared 2-core CPU two
    threads were 8-40x slower per step than one (measured, cutpaste-ae), never faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def extract_features(graph: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device,
                     label: str, batch: int = 4) -> list[torch.Tensor]:
    """graph(uint8 images) -> list of feature tensors, for all images, float16 on the CPU.

    On a CPU the frozen graph runs through ONNX Runtime (several times faster than eager
    PyTorch for depthwise convolutions, and the exact graph that is deployed)."""
    bar = Progress(len(images), label)
    run: Callable[[np.ndarray], list[torch.Tensor]]
    if device.type == "cpu":
        import onnxruntime as ort

        buf = io.BytesIO()
        example = torch.from_numpy(np.stack(images[:1]))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about static shapes: sizes are fixed per bundle
            torch.onnx.export(graph.eval(), (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["images"], dynamic_axes={"images": {0: "batch"}})
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        run = lambda x: [torch.from_numpy(f) for f in sess.run(None, {"images": x})]  # noqa: E731
    else:
        run = lambda x: [f.float().cpu() for f in graph(torch.from_numpy(x).to(device))]  # noqa: E731
    out: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for sl in batches(len(images), batch):
            feats = run(np.stack(images[sl]))
            out = out or [[] for _ in feats]
            for i, f in enumerate(feats):
                out[i].append(f.half())
            bar.update(sl.stop - sl.start)
    bar.close()
    return [torch.cat(o) for o in out]


def lr_at(step: int, total: int, cfg: "TrainConfig") -> float:
    """Linear warm-up from lr_min to lr_max, then cosine decay back to lr_min."""
    warm = max(1, int(total * cfg.warmup_fraction))
    if step < warm:
        return cfg.lr_min + (cfg.lr_max - cfg.lr_min) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * progress))


class ScheduledSteps:
    """What every method's training loop shares: the warm-up + cosine learning rate of each step,
    the gradient step (optionally clipped), a refusal to go on once the loss is not finite, and an
    exponential average of the loss for the progress bar and the result."""

    def __init__(self, opt: torch.optim.Optimizer | None, total: int, cfg: "TrainConfig", label: str,
                 clip: float | None = None) -> None:
        self.opt, self.total, self.cfg, self.label, self.clip = opt, total, cfg, label, clip
        self.done = 0
        self.ema: float | None = None
        self.bar = Progress(total, label)

    def step(self, loss: torch.Tensor, apply: Callable[[float], None] | None = None) -> None:
        """One step at this step's learning rate: loss.backward() + opt.step(), or, given `apply`,
        apply(lr) makes the update itself (a method with several gradients / optimizers; opt unused)."""
        lr = lr_at(self.done, self.total, self.cfg)
        if apply is not None:
            apply(lr)
        else:
            if self.opt is None:
                raise RuntimeError("ScheduledSteps without an optimizer needs apply")
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.clip)
            self.opt.step()
        if not torch.isfinite(loss):
            raise DataError(f"training diverged ({self.label}: the loss is not finite); try a lower learning rate")
        value = loss.item()
        self.ema = value if self.ema is None else 0.95 * self.ema + 0.05 * value
        self.done += 1
        self.bar.update(1, loss=self.ema, lr=lr)

    def close(self) -> float:
        """Ends the progress bar; the averaged final loss."""
        self.bar.close()
        return float(self.ema if self.ema is not None else float("nan"))


@torch.no_grad()
def score_images(model: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device,
                 batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Any engine's (scores, maps) for prepared images, in eager PyTorch."""
    scores, maps = [], []
    for sl in batches(len(images), batch):
        s, m = model(torch.from_numpy(np.stack(images[sl])).to(device))
        scores.append(s.float().cpu().numpy())
        maps.append(m.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)


def reduce_maps(maps: torch.Tensor, reduction: str, k: int) -> np.ndarray:
    """(N, P) flattened maps -> image scores by the head's reduction (model.reduce_flat)."""
    return reduce_flat(maps, reduction, k).numpy()


def validation_auroc(scores: np.ndarray, n_good: int) -> float:
    """How well scores separate the first n_good (held-out good) from the rest (synthetic defects)."""
    from inspectd.stats import roc_auc

    return float(roc_auc(np.asarray(scores[:n_good]), np.asarray(scores[n_good:])))


def pick_best(rows: list[dict[str, Any]], key: str = "validation_auroc") -> int:
    """Index of the best row; ties keep the earlier (candidates are listed cheapest / simplest first)."""
    best = 0
    for i, row in enumerate(rows):
        if row[key] > rows[best][key] + 1e-9:
            best = i
    return best


@torch.no_grad()
def select_reduction(model: torch.nn.Module, cfg: "TrainConfig", hold: Sequence[np.ndarray],
                     device: torch.device) -> dict[str, Any]:
    """Label-free choice of a MapHead engine's map reduction (model.head): the candidate of
    cfg.select_reductions that best separates held-out good images from synthetic defects made from
    them. Sets it on the model, its config and cfg.model; returns the manifest's selection record."""
    frames, _ = validation_frames(hold, cfg.seed)
    n_good = len(hold)
    maps = torch.cat([model(torch.from_numpy(frames[sl]).to(device))[1].flatten(1).cpu()
                      for sl in batches(len(frames), 8)])
    rows = [{"reduction": red, "validation_auroc": round(validation_auroc(reduce_maps(maps, red, model.head.topk),
                                                                          n_good), 4)}
            for red in cfg.select_reductions]
    best = rows[pick_best(rows)]
    model.config.reduction = model.head.reduction = cfg.model.reduction = best["reduction"]
    print(f"inspectd train: selected {best['reduction']} reduction (validation AUROC {best['validation_auroc']:.4f} "
          f"on {n_good} held-out good images vs {len(frames) - n_good} synthetic defects)", file=sys.stderr)
    return {"enabled": True, "validation": "held-out good images + synthetic defects made from them",
            "candidates": rows, "chosen": best}


def validation_frames(hold: Sequence[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out good images and the label-free validation defects made from them
    (make_validation_set) as one uint8 batch, good first, and each frame's defect mask: the pixels
    its defect changed (all False on the good frames)."""
    from inspectd.engines.validation import make_validation_set

    val = make_validation_set(list(hold), seed)
    good, bad = np.stack(val.good), np.stack(val.bad)
    changed = np.any(bad != np.repeat(good, len(val.bad) // len(val.good), axis=0), axis=-1)
    return np.concatenate([good, bad]), np.concatenate([np.zeros(good.shape[:3], bool), changed])


def _best_shift(maps: torch.Tensor, masks: np.ndarray, size: tuple[int, int], reach: int) -> tuple[tuple[int, int], dict]:
    """The shift (map pixels, each way up to `reach`) under which the upsampled maps (N, 1, h, w)
    best separate the masked pixels from all others: rows, then columns, again until neither moves
    (at most 3 rounds); ties keep no shift. Returns it and every candidate's pixel AUROC."""
    import torch.nn.functional as F

    from inspectd.engines.model import shift_map
    from inspectd.stats import roc_auc

    seen: dict[tuple[int, int], float] = {}  # shift -> validation pixel AUROC, each computed once

    def auroc(shift: tuple[int, int]) -> float:
        if shift not in seen:
            up = F.interpolate(shift_map(maps, shift), size=size, mode="bilinear", align_corners=False)
            v = up[:, 0, ::2, ::2].numpy()
            seen[shift] = round(roc_auc(v[~masks], v[masks]), 4)
        return seen[shift]

    steps = [0] + [d for d in range(-reach, reach + 1) if d != 0]  # no shift first: ties keep it

    def best_of(candidates: list[tuple[int, int]]) -> tuple[int, int]:
        rows = [{"pixel_auroc": auroc(c)} for c in candidates]
        return candidates[pick_best(rows, "pixel_auroc")]

    chosen = (0, 0)
    for _ in range(3):
        dy = best_of([(d, chosen[1]) for d in steps])[0]
        moved = best_of([(dy, d) for d in steps])
        if moved == chosen:
            break
        chosen = moved
    return chosen, seen


@torch.no_grad()
def select_map_shift(model: torch.nn.Module, cfg: "TrainConfig", hold: Sequence[np.ndarray],
                     device: torch.device) -> dict[str, Any]:
    """Label-free choice of where each of the engine's map heads draws its map: the shift, in map
    pixels up to MAX_MAP_SHIFT_PX input pixels each way, under which that head's upsampled maps best
    separate the pixels synthetic defects changed from all other pixels, on held-out good images and
    the defects made from them (validation_frames). Each head is judged on its own map, so sources
    that look in different places (cutpaste_head / ae_head) each get their own shift.
    Sets the shifts on the model's heads and on cfg.model (map_shift for a one-head engine,
    head_shifts for several); returns the manifest's record."""
    from inspectd.engines.model import map_heads
    from inspectd.engines.model_config import MAX_MAP_SHIFT_PX

    heads = map_heads(model)
    for head in heads.values():
        head.shift = (0, 0)
    seen_maps: dict[str, list[torch.Tensor]] = {name: [] for name in heads}
    hooks = [head.register_forward_hook(lambda _m, _in, out, name=name: seen_maps[name].append(out[1].cpu()))
             for name, head in heads.items()]
    frames, masks = validation_frames(hold, cfg.seed)
    try:
        for sl in batches(len(frames), 8):
            model(torch.from_numpy(frames[sl]).to(device))
    finally:
        for hook in hooks:
            hook.remove()
    masks = masks[:, ::2, ::2]  # every 4th pixel: the same ranking, 4x less to sort
    size = frames.shape[1:3]
    reach = MAX_MAP_SHIFT_PX // cfg.model.map_stride
    unit = f"map pixels ({cfg.model.map_stride} input px)"
    records: dict[str, dict[str, Any]] = {}
    for name, parts in seen_maps.items():
        if not parts:  # a head this engine's score rule does not use
            continue
        chosen, seen = _best_shift(torch.cat(parts)[:, None], masks, size, reach)
        heads[name].shift = chosen
        px = [v * cfg.model.map_stride for v in chosen]
        print(f"inspectd train: {name} map drawn {px[0]:+d} px down, {px[1]:+d} px right (validation pixel AUROC "
              f"{seen[chosen]:.4f}, unshifted {seen[(0, 0)]:.4f})", file=sys.stderr)
        records[name] = {"candidates": [{"shift": list(k), "pixel_auroc": v} for k, v in seen.items()],
                         "chosen": {"map_shift": list(chosen), "input_px": px, "pixel_auroc": seen[chosen]}}
    own = getattr(model, "config", None)  # the engine's own config, when it is not cfg.model itself
    configs = [cfg.model] + ([own] if own is not None and own is not cfg.model else [])
    record: dict[str, Any] = {"enabled": True, "validation": "pixel AUROC of each map head's own map: pixels "
                              "changed by synthetic defects vs all others, held-out good images + the defects "
                              "made from them", "unit": unit}
    if len(records) == 1:
        (name, one), = records.items()
        for c in configs:
            c.map_shift = tuple(one["chosen"]["map_shift"])
        return {**record, "head": name, **one}
    for c in configs:
        c.head_shifts = {name: tuple(r["chosen"]["map_shift"]) for name, r in records.items()}
    return {**record, "heads": records}
