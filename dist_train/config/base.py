"""Shared pieces of the typed recipe: the strict base model and metric direction (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

LOWER_IS_BETTER = {"loss", "mse", "mae"}


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid")


def default_mode(monitor: str) -> Literal["min", "max"]:
    return "min" if monitor.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"
