"""Factories for `model.factory` tests (importable as `factories:NAME` with tests/ on the path):
functions and a class returning nn.Modules, in the shapes the ecosystem's factories come in."""

from __future__ import annotations

import torch
from torch import nn


class TupleMLP(nn.Module):
    """Returns a tuple (features, hidden), as many library models do: the first tensor counts."""

    def __init__(self, in_features: int, hidden: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh())
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return self.proj(h), h


def mlp(in_features: int, num_classes: int, hidden: int = 16) -> nn.Module:
    """A function (not a class) returning a module, like torchvision.models.resnet18."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class DictOut(nn.Module):
    """Returns a dict without `logits`: refused, naming model.factory."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, x: torch.Tensor):
        return {"hidden": self.fc(x)}


def not_a_module(**_kwargs) -> str:
    return "nope"
