"""Vectorised batch augmentation: exact whole-pixel shifts and flips, reproducible draws that
differ per rank/step, noise of the requested size."""

from __future__ import annotations

import pytest
import torch

from dist_train.config.schema import AugmentConfig
from dist_train.data.augment import augment_batch, augment_generator


def images(n: int = 16, c: int = 2, h: int = 7, w: int = 9) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0)) + 0.5


def gen(rank: int = 0, step: int = 0, micro: int = 0, seed: int = 0) -> torch.Generator:
    return augment_generator(seed, step, micro, rank)


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`img` moved by (dy, dx) whole pixels, zeros coming in."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_shift_moves_whole_pixels_and_keeps_values():
    x = images()
    out = augment_batch(x, AugmentConfig(shift=2), gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out[i], _shifted(x[i], dy, dx))
        ]
        assert found, f"image {i} is not an exact whole-pixel shift"
        shifts.add(found[0])
    assert len(shifts) > 3  # draws differ within the batch
    # nearest sampling: every output value is an input value of the same image, or padding
    for i in range(len(x)):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}


def test_flip_is_an_exact_mirror():
    x = images()
    out = augment_batch(x, AugmentConfig(flip=True), gen())
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_vflip_is_an_exact_mirror():
    x = images()
    out = augment_batch(x, AugmentConfig(vflip=True), gen(step=3))
    assert all(
        torch.equal(out[i], x[i].flip(-2)) or torch.equal(out[i], x[i]) for i in range(len(x))
    )
    assert any(torch.equal(out[i], x[i].flip(-2)) for i in range(len(x)))


def test_zero_config_is_identity():
    x = images()
    assert torch.equal(augment_batch(x, AugmentConfig(), gen()), x)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(shift=1, flip=True),
        AugmentConfig(rotation=15, scale=(0.9, 1.1)),
        AugmentConfig(noise=0.1),
    ],
)
def test_same_generator_seed_same_output(cfg):
    x = images()
    a = augment_batch(x, cfg, gen(rank=1, step=5, micro=1))
    b = augment_batch(x, cfg, gen(rank=1, step=5, micro=1))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("other", [{"rank": 1}, {"step": 1}, {"micro": 1}, {"seed": 1}])
def test_different_rank_step_or_seed_different_output(other):
    x, cfg = images(), AugmentConfig(shift=2, flip=True, noise=0.05)
    assert not torch.equal(augment_batch(x, cfg, gen()), augment_batch(x, cfg, gen(**other)))


def test_noise_std_roughly_right():
    x = torch.zeros(64, 300)  # tables are augmented with noise only
    out = augment_batch(x, AugmentConfig(noise=0.3, shift=3, flip=True), gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.std().item() == pytest.approx(0.3, rel=0.05)
    assert abs(out.mean().item()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_preserved(dtype):
    x = images().to(dtype)
    cfg = AugmentConfig(shift=1, flip=True, vflip=True, rotation=10, scale=(0.8, 1.2), noise=0.01)
    out = augment_batch(x, cfg, gen())
    assert out.shape == x.shape and out.dtype == dtype


def test_rotation_and_zoom_stay_close_to_input():
    x = torch.zeros(4, 1, 15, 15)
    x[:, :, 5:10, 5:10] = 1.0  # a centred square
    out = augment_batch(x, AugmentConfig(rotation=10, scale=(0.95, 1.05)), gen())
    assert out.shape == x.shape
    assert (out - x).abs().mean() < 0.1  # small transforms keep the square in place
    assert out[:, :, 7, 7].min() > 0.9


def test_cpu_draws_are_the_cpu_generators_stream():
    """On CPU the draws are exactly a CPU generator's seeded from the same key (values as before
    the draws moved to the batch's device): a shift-only batch moves by the generator's randint."""
    x = images(n=8)
    out = augment_batch(x, AugmentConfig(shift=2), gen(rank=1, step=4, micro=1, seed=3))
    mixed = (3 * 1_000_003 + 4 * 8_191 + 1 * 131 + 1) % (2**63 - 1)
    ref = torch.Generator().manual_seed(mixed)
    torch.rand(8, generator=ref)  # the angle draw (rotation 0)
    dx = torch.randint(-2, 3, (8,), generator=ref)
    dy = torch.randint(-2, 3, (8,), generator=ref)
    for i in range(8):
        # the grid samples the input at p + shift: the image moves by minus the draw
        assert torch.equal(out[i], _shifted(x[i], -int(dy[i]), -int(dx[i])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an accelerator")
def test_draws_are_made_on_the_batch_device():
    """On an accelerator the generator and every draw live there; the result is reproducible and
    augmenting does not synchronise with the host (checked under CUDA's sync debug mode)."""
    x = images().cuda()
    cfg = AugmentConfig(shift=2, flip=True, vflip=True, rotation=10, scale=(0.9, 1.1), noise=0.1)
    g = augment_generator(0, 5, 1, 0, device=x.device)
    assert g.device.type == "cuda"
    torch.cuda.set_sync_debug_mode("error")  # any blocking device->host copy raises
    try:
        a = augment_batch(x, cfg, g)
        b = augment_batch(x, cfg, augment_generator(0, 5, 1, 0, device=x.device))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.device == x.device and torch.equal(a, b) and not torch.equal(a, x)
