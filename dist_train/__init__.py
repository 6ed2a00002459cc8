"""dist_train: a YAML recipe -> a trained PyTorch model, on 1 CPU, N GPUs or a SLURM cluster."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["UserError", "load_recipe", "train"]

from dist_train.config.recipe import load_recipe
from dist_train.errors import UserError


def train(recipe, output_dir: str | None = None, **kwargs) -> dict:
    """Train a `Recipe` (or a recipe path); returns the final validation metrics."""
    from dist_train.training.trainer import train as _train

    if not hasattr(recipe, "model_dump"):
        recipe = load_recipe(recipe)
    return _train(recipe, output_dir, **kwargs)
