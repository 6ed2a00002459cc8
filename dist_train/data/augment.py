"""Vectorised per-batch image/feature augmentation on the training split.

One `affine_grid` + `grid_sample` call transforms the whole batch (shift, rotation, zoom,
flips), ~100x cheaper than per-sample transforms. Randomness comes from a generator seeded by
(seed, optimizer step, micro-batch, rank): distinct per rank and step, reproducible on rerun and
after resume without any RNG state to checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dist_train.config.schema import AugmentConfig


def augment_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    mixed = (seed * 1_000_003 + step * 8_191 + micro * 131 + rank) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    if x.dim() == 4 and (cfg.shift or cfg.rotation or cfg.scale or cfg.flip or cfg.vflip):
        x = _affine(x, cfg, gen)
    if cfg.noise:
        x = x + cfg.noise * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return x


def _affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = uniform(-cfg.rotation, cfg.rotation) * math.pi / 180
    zoom = uniform(*cfg.scale) if cfg.scale else torch.ones(n)
    sx = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    sy = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if cfg.vflip else torch.ones(n)
    # Whole-pixel shifts in normalised [-1, 1] coordinates (2 / size per pixel).
    tx = torch.randint(-cfg.shift, cfg.shift + 1, (n,), generator=gen) * 2.0 / w
    ty = torch.randint(-cfg.shift, cfg.shift + 1, (n,), generator=gen) * 2.0 / h
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # rotation/zoom matrix times diag(sx, sy) (the flips), plus the translation column
    theta = torch.stack(
        [torch.stack([cos * sx, -sin * sy, tx], 1), torch.stack([sin * sx, cos * sy, ty], 1)], 1
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    smooth = cfg.rotation or cfg.scale
    return F.grid_sample(
        x, grid, mode="bilinear" if smooth else "nearest", padding_mode="zeros", align_corners=False
    )
