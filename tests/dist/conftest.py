"""Fixtures for real multi-process runs: a small tabular problem with exactly 97 valid rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = {
    "name": "tiny",
    "seed": 3,
    "data": {"source": None, "valid_source": None, "target": "label", "task": "multiclass",
             "standardize": True},
    "model": {"layers": [{"linear": 32}, "relu", {"linear": 16}, "tanh", {"linear": "out"}]},
    "loss": "cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "scheduler": {"name": "cosine", "warmup_steps": 5},
    "train": {"epochs": 3, "batch_size": 24, "log_every_steps": 1},
    "metrics": ["accuracy", "f1", "auroc", "precision", "recall", "confusion_matrix"],
    "checkpoint": {"every_epochs": 1, "keep": 3},
}


def make_table(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    cols = {f"f{i}": x[:, i] for i in range(6)} | {"label": label}
    header = ",".join(cols)
    lines = [",".join(f"{cols[c][r]:.6f}" if c != "label" else str(cols[c][r]) for c in cols)
             for r in range(rows)]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_data")
    make_table(root / "train.csv", 480, 0)
    make_table(root / "valid.csv", 97, 1)
    return {"train": root / "train.csv", "valid": root / "valid.csv"}


@pytest.fixture
def tiny_recipe(tiny_data, tmp_path) -> Path:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["source"] = f"csv:{tiny_data['train']}"
    recipe["data"]["valid_source"] = f"csv:{tiny_data['valid']}"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())
