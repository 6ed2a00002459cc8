"""The objects a user of `dist_train.fit` would pass, and the recipe-path run they must equal
(tests/unit/test_fit.py in this process; tests/dist/test_fit_dist.py from a torchrun script)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 4
# The recipe path: the same data from csv files and the same network as a layer list.
RECIPE = {
    "name": "fit",
    "seed": SEED,
    "data": {"source": None, "valid_source": None, "target": "label", "task": "multiclass"},
    "model": {"layers": [{"linear": 16}, "relu", {"linear": "out"}]},
    "loss": "cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "scheduler": {"name": "cosine", "warmup_steps": 3},
    "train": {"epochs": 2, "batch_size": 24, "log_every_steps": 5},
    "metrics": ["accuracy"],
}
# What fit() gets instead: no model or data sections, the rest as in RECIPE.
FIT_RECIPE = {k: v for k, v in RECIPE.items() if k not in ("model", "data", "metrics")}


def write_tables(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name, rows in (("train", 144), ("valid", 37)):
        x = rng.normal(size=(rows, 6))
        label = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
        lines = [",".join([*(f"{v:.6f}" for v in x[r]), str(label[r])]) for r in range(rows)]
        path = root / f"{name}.csv"
        path.write_text(",".join([f"f{i}" for i in range(6)] + ["label"]) + "\n")
        path.write_text(path.read_text() + "\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


class Rows(torch.utils.data.Dataset):
    """A plain map-style Dataset of (features, label) pairs read from one of the csv files."""

    def __init__(self, csv: Path) -> None:
        table = np.loadtxt(csv, delimiter=",", skiprows=1)
        self.x = torch.tensor(table[:, :6], dtype=torch.float32)
        self.y = torch.tensor(table[:, 6], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def user_model() -> nn.Module:
    """Built under the recipe's seed in the layer list's order: the same initial weights."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def user_metrics() -> dict:
    import torchmetrics

    return {"accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=3)}


def as_recipe_names(state: dict) -> dict:
    """nn.Sequential's `0.weight` is the layer list's `layers.0.weight`."""
    return {f"layers.{k}": v.detach() for k, v in state.items()}
