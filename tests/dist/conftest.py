"""Fixtures for real multi-process runs: a small tabular problem with exactly 97 valid rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_helpers import RECIPE, make_table


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
