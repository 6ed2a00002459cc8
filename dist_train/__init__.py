"""dist_train: a YAML recipe -> a trained PyTorch model, on 1 CPU, N GPUs or a SLURM cluster."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["FitResult", "UserError", "fit", "load_recipe", "train"]

from dist_train.api import FitResult, fit, train
from dist_train.config.recipe import load_recipe
from dist_train.errors import UserError
