"""Shared pieces of the typed recipe and the rules every part of dist_train applies the same
way: the strict base model, metric direction, and how a global batch splits (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

LOWER_IS_BETTER = {"loss", "mse", "mae"}


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid")


def default_mode(monitor: str) -> Literal["min", "max"]:
    """`min` for losses and errors (`valid/loss`, `valid/mae`), `max` for everything else
    (`valid/accuracy@5` included: the part before `@k` names the metric)."""
    return "min" if monitor.rsplit("/", 1)[-1].split("@")[0] in LOWER_IS_BETTER else "max"


def better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `best` by more than `min_delta` in direction `mode`
    ("min"/"max"). No value never improves; a first value always does."""
    if value is None:
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def batch_split_error(batch_size: int, world_size: int, grad_accum: int) -> str | None:
    """Why a global `train.batch_size` cannot split into equal micro-batches over `world_size`
    processes x `grad_accum` accumulation steps, or None when it can. Every optimizer step must
    see exactly `batch_size` samples on any world size: that is what makes 1 and N agree."""
    if grad_accum < 1:
        return f"train.grad_accum {grad_accum} must be at least 1; fix the recipe."
    parts = world_size * grad_accum
    if batch_size % parts == 0:
        return None
    return (
        f"train.batch_size {batch_size} (global) does not split evenly over {world_size} "
        f"process(es) x train.grad_accum {grad_accum}; use a multiple of {parts} or another "
        "number of processes."
    )


def per_device_batch(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Micro-batch size per process (assumes `batch_split_error` returned None)."""
    return batch_size // (world_size * grad_accum)
