"""Benchmark-only baselines on the flow's own backbone taps and input (never in the product).

PaDiM-style: taps upsampled to the finest tap, 100 random channels, a Gaussian per position,
Mahalanobis distance. Nearest neighbour (PatchCore-style, full memory bank): taps pooled to the
same grid the flow models (input / `grid_stride`), distance to the nearest training patch. Both
score an image by the peak of their smoothed map, as their papers do.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from inspectd.engines.fitting import extract_features
from inspectd.engines.methods.flow import FeatureGraph, build_model
from inspectd.engines.model import ModelConfig, gaussian_kernel1d


def _smooth(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    k = gaussian_kernel1d(sigma)
    r = k.numel() // 2
    x = F.pad(maps[:, None], (r, r, r, r), mode="replicate")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))[:, 0]


def baselines(mc: ModelConfig, train_imgs: list[np.ndarray], test_imgs: list[np.ndarray], grid_stride: int,
              seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (image scores, maps at input/4) for `test_imgs` (whole frames at the bundle input size)."""
    h_in, w_in = train_imgs[0].shape[:2]
    model = FeatureGraph(build_model(replace(mc, fusion="separate", tiles=(1, 1), image_height=h_in, image_width=w_in,
                                             neighbourhood=1, positional=0)).eval())
    dev = torch.device("cpu")
    tr = extract_features(model, train_imgs, dev, "baseline features (train)")
    te = extract_features(model, test_imgs, dev, "baseline features (test)")
    map_size = (h_in // 4, w_in // 4)
    out = {}

    def embed(feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        return torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False)
                          for f in feats], dim=1)
    g = torch.Generator().manual_seed(seed)
    etr = embed(tr)
    idx = torch.randperm(etr.shape[1], generator=g)[:100]
    etr = etr[:, idx]
    n, d, h, w = etr.shape
    x = etr.permute(2, 3, 0, 1).reshape(h * w, n, d)
    mean = x.mean(dim=1, keepdim=True)
    xc = x - mean
    inv = torch.linalg.inv(xc.transpose(1, 2) @ xc / (n - 1) + 0.01 * torch.eye(d))
    del xc, x
    maps = []
    for sl in range(0, te[0].shape[0], 16):
        e = embed([t[sl:sl + 16] for t in te])[:, idx]
        y = e.permute(2, 3, 0, 1).reshape(h * w, -1, d) - mean
        m = torch.einsum("pnd,pde,pne->pn", y, inv, y).clamp_min(0).sqrt()
        maps.append(m.T.reshape(-1, h, w))
    pmap = _smooth(F.interpolate(torch.cat(maps)[:, None], size=map_size, mode="bilinear",
                                 align_corners=False)[:, 0])
    out["PaDiM-style Gaussian"] = (pmap.flatten(1).max(1).values.numpy(), pmap.numpy())

    grid = (h_in // grid_stride, w_in // grid_stride)

    def pooled(feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(f.float(), grid) for f in feats], dim=1)
    bank = pooled(tr).permute(0, 2, 3, 1).reshape(-1, sum(f.shape[1] for f in tr))
    dists = []
    for sl in range(0, te[0].shape[0], 8):
        q = pooled([t[sl:sl + 8] for t in te])
        b, c, ph, pw = q.shape
        dmin = torch.cdist(q.permute(0, 2, 3, 1).reshape(-1, c), bank).min(dim=1).values
        dists.append(dmin.reshape(b, ph, pw))
    nmap = _smooth(F.interpolate(torch.cat(dists)[:, None], size=map_size, mode="bilinear",
                                 align_corners=False)[:, 0])
    out["nearest-neighbour patches"] = (nmap.flatten(1).max(1).values.numpy(), nmap.numpy())
    return out
