"""The normalizing-flow head of the seed method (paper 000).

Each affine coupling step splits the channels into (y1, y2) and computes
    z1 = y1,  z2 = exp(s(y1)) * y2 + t(y1)
where one subnet Conv-BN-Swish-Conv produces [s, t]. s is soft-clamped (clamp * tanh(s / clamp))
for stability, and a fixed channel permutation follows each step so every channel is
transformed. Per position, log|det J| = sum over channels of s, so the negative log-likelihood
0.5 * |z|^2 - log|det J| decomposes into a map: that map is the anomaly heatmap.
"""

from __future__ import annotations

import torch
from torch import nn


class Subnet(nn.Module):
    """Conv-BN-Swish-Conv. The last conv starts at zero so every step starts as the identity."""

    def __init__(self, c_in: int, c_hidden: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_hidden, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(c_hidden)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(c_hidden, c_out, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x))))


class AffineCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, clamp: float, seed: int,
                 cond_channels: int = 0) -> None:
        super().__init__()
        self.c1 = channels // 2
        self.c2 = channels - self.c1
        self.clamp = clamp
        self.subnet = Subnet(self.c1 + cond_channels, hidden, 2 * self.c2, kernel_size)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("perm", torch.randperm(channels, generator=g), persistent=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) -> (z permuted, log|det J| per position (N, H, W)). `cond` (positional
        channels) only conditions the subnet: it is not transformed, so the Jacobian is unchanged."""
        y1, y2 = x[:, : self.c1], x[:, self.c1:]
        s, t = self.subnet(y1 if cond is None else torch.cat([y1, cond], dim=1)).chunk(2, dim=1)
        s = self.clamp * torch.tanh(s / self.clamp)
        z2 = torch.exp(s) * y2 + t
        z = torch.cat([y1, z2], dim=1)[:, self.perm]
        return z, s.sum(dim=1)


class ScaleFlow(nn.Module):
    """`steps` coupling steps over one feature scale."""

    def __init__(self, channels: int, steps: int, hidden_ratio: float, kernel_size: int, clamp: float,
                 seed: int, cond_channels: int = 0) -> None:
        super().__init__()
        hidden = max(8, int(round(channels * hidden_ratio)))
        self.steps = nn.ModuleList(
            AffineCoupling(channels, hidden, kernel_size, clamp, seed * 1000 + i, cond_channels) for i in range(steps))

    def transform(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(0.5 |z|^2, log|det J|) per position, each divided by the channel count: (N, H, W) x 2."""
        logdet = torch.zeros_like(x[:, 0])
        for step in self.steps:
            x, ld = step(x, cond)
            logdet = logdet + ld
        c = x.shape[1]
        return 0.5 * (x * x).sum(dim=1) / c, logdet / c

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position NLL (the training loss) divided by the channel count: (N, H, W)."""
        half_z2, logdet = self.transform(x, cond)
        return half_z2 - logdet
