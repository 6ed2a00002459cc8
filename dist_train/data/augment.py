"""Vectorised per-batch image/feature augmentation on the training split.

One `affine_grid` + `grid_sample` call transforms the whole batch (shift, rotation, zoom,
flips), ~100x cheaper than per-sample transforms. Randomness comes from a generator seeded by
(seed, optimizer step, micro-batch, rank): distinct per rank and step, reproducible on rerun and
after resume without any RNG state to checkpoint. The generator lives on the batch's device, so
the draws are made there: no host-side draw and blocking copy per step (on CPU the values are
those of a CPU generator, as before; on an accelerator they come from its own generator, so
they differ from the CPU's but are equally reproducible).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dist_train.config.schema import AugmentConfig


def augment_generator(
    seed: int, step: int, micro: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator on `device` (the batch's) seeded from the key; seeding is host-side
    arithmetic, no device work."""
    mixed = (seed * 1_000_003 + step * 8_191 + micro * 131 + rank) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    if x.dim() == 4 and (cfg.shift or cfg.rotation or cfg.scale or cfg.flip or cfg.vflip):
        x = _affine(x, cfg, gen)
    if cfg.noise:
        # drawn in float32 on the generator's device, as before, then in the batch's dtype
        noise = torch.randn(x.shape, generator=gen, device=gen.device)
        x = x + cfg.noise * noise.to(x.device, x.dtype)
    return x


def _affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    dev = gen.device  # every draw and the matrix built from them stay on the generator's device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, device=dev)

    def sign() -> torch.Tensor:  # -1 (mirror) or +1, each with probability 1/2
        return torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -1.0, 1.0)

    ones = torch.ones(n, device=dev)
    angle = uniform(-cfg.rotation, cfg.rotation) * math.pi / 180
    zoom = uniform(*cfg.scale) if cfg.scale else ones
    sx = sign() if cfg.flip else ones
    sy = sign() if cfg.vflip else ones
    # Whole-pixel shifts in normalised [-1, 1] coordinates (2 / size per pixel).
    tx = torch.randint(-cfg.shift, cfg.shift + 1, (n,), generator=gen, device=dev) * 2.0 / w
    ty = torch.randint(-cfg.shift, cfg.shift + 1, (n,), generator=gen, device=dev) * 2.0 / h
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
