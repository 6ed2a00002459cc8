"""The Python API: what `import dist_train` offers besides the CLI."""

from __future__ import annotations

from pathlib import Path

from dist_train.config.recipe import load_recipe
from dist_train.config.schema import Recipe


def train(
    recipe: Recipe | str | Path,
    output_dir: str | None = None,
    *,
    restart: bool = False,
    allow_changed: bool = False,
) -> dict:
    """Train a `Recipe` (or a recipe path); returns the final validation metrics.

    The same run as `dist-train train`: under `accelerate launch`/`torchrun` every process calls
    it. A stop signal (Ctrl-C) saves a checkpoint and raises
    `dist_train.training.trainer.Preempted`; calling it again with the same `output_dir`
    resumes. Signal handlers are restored when it returns."""
    from dist_train.training.trainer import train as _train

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return _train(recipe, output_dir, restart=restart, allow_changed=allow_changed)
