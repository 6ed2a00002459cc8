"""Backbones from the ecosystem keep the global-batch promise: a `model.factory` model and a
transformers (`model.hf`) text model train to the same weights on 1 and 2 gloo ranks."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from dist_helpers import RECIPE, run_info
from procs import ROOT, max_diff, weights

pytestmark = pytest.mark.dist

# `factories:NAME` (tests/factories.py) importable in the torchrun children too
PATH_ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def _same_on_one_and_two(reference_run, recipe_path, *overrides):
    one = reference_run(recipe_path, *overrides, nproc=1, **PATH_ENV)
    two = reference_run(recipe_path, *overrides, nproc=2, **PATH_ENV)
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    diff = max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors"))
    assert diff < 1e-5, diff
    return one, two


def test_factory_model_same_weights_on_one_and_two_processes(reference_run, tiny_data, tmp_path):
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["source"] = f"csv:{tiny_data['train']}"
    recipe["data"]["valid_source"] = f"csv:{tiny_data['valid']}"
    recipe["model"] = {
        "factory": {
            "path": "factories:TupleMLP",
            "kwargs": {"in_features": 6, "hidden": 16, "width": 8},
        },
        "layers": ["relu", {"linear": "out"}],
    }
    path = tmp_path / "factory.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    one, _ = _same_on_one_and_two(reference_run, path, "train.epochs=2")
    assert "backbone.proj.weight" in weights(one / "model.safetensors")


def test_hf_text_model_same_weights_on_one_and_two_processes(reference_run, hf_text, tmp_path):
    """Tiny BERT (no dropout), batch 32 = 32x1 or 16x2; each rank pads its own batch to its
    longest row, which changes only masked positions."""
    recipe = {
        "name": "hf-text",
        "seed": 1,
        "data": {
            "source": f"csv:{hf_text / 'reviews.csv'}",
            "text": "text",
            "target": "label",
            "task": "multiclass",
            "max_length": 24,
            "valid_fraction": 0.2,
        },
        "model": {
            "hf": {"pretrained": str(hf_text / "bert-tiny"), "task": "sequence_classification"}
        },
        "loss": "cross_entropy",
        "optimizer": {"name": "adamw", "lr": 0.003},
        "train": {"epochs": 1, "batch_size": 32, "max_steps": 8},
        "metrics": ["accuracy"],
    }
    path = tmp_path / "hf.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    _one, two = _same_on_one_and_two(reference_run, path)
    ev = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [e["valid/rows"] for e in ev if e["event"] == "eval"] == [400]
