"""Freezing as its own section (issue 14, item 3) on 2 gloo ranks: parameters and batch-norm
statistics frozen without finetune.from stay bitwise unchanged under DDP; a gradual unfreezing
schedule switches at its epochs with no DDP reduction error; a kill -9 before a switch and a
resume across it end bitwise equal to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
import yaml
from dist_helpers import events, make_table, run_info
from procs import bitwise_equal, cli, weights

from dist_train.build import build_components
from dist_train.config.recipe import load_recipe

pytestmark = [pytest.mark.dist, pytest.mark.slow]

BACKBONE = ("layers.0.", "layers.1.")  # linear + batch norm: unfrozen after 2 epochs
MIDDLE = ("layers.3.", "layers.4.")  # linear + batch norm: unfrozen after 1 epoch


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeze")
    make_table(root / "train.csv", 240, 0)  # 10 steps per epoch at batch 24
    make_table(root / "valid.csv", 37, 1)
    raw = {
        "name": "freeze-schedule",
        "seed": 5,
        "data": {
            "source": f"csv:{root / 'train.csv'}",
            "valid_source": f"csv:{root / 'valid.csv'}",
            "target": "label",
            "task": "multiclass",
        },
        "model": {
            "layers": [
                {"linear": 16},
                "batchnorm",
                "relu",
                {"linear": 16},
                "batchnorm",
                "relu",
                {"linear": "out"},
            ]
        },
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        "train": {"epochs": 3, "batch_size": 24, "log_every_steps": 1},
        "freeze": {
            "params": ["layers.0", "layers.1", "layers.3", "layers.4"],  # module names
            "schedule": [
                {"epoch": 1, "unfreeze": ["layers.3.*", "layers.4.*"]},
                {"epoch": 2, "unfreeze": ["layers.[01].*"]},
            ],
        },
        "metrics": ["accuracy"],
        "checkpoint": {"every_steps": 4, "keep": 20},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _initial(recipe) -> dict:
    """The seeded initial weights every rank starts from (built on this CPU)."""
    state = build_components(load_recipe(recipe)).model.state_dict()
    return {k: v.clone() for k, v in state.items()}


def _same(a: dict, b: dict, prefixes) -> bool:
    keys = [k for k in a if k.startswith(prefixes)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_unfreeze_schedule_on_two_ranks_and_resume_across_the_switch(recipe, tmp_path):
    ref = tmp_path / "ref"
    r = cli("train", str(recipe), "-o", str(ref), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Expected to have finished reduction" not in r.stderr
    assert run_info(ref)["world_size"] == 2
    assert [(e["epoch"], e["params"]) for e in events(ref, "unfreeze")] == [(1, 4), (2, 4)]
    init = _initial(recipe)
    ckpt = {s: weights(ref / f"checkpoints/step-{s:06d}/model.safetensors") for s in (10, 20)}
    # Epoch 0: everything but the head frozen, batch-norm running statistics included.
    assert "layers.1.running_mean" in init and "layers.4.num_batches_tracked" in init
    assert _same(ckpt[10], init, BACKBONE + MIDDLE)
    assert not torch.equal(ckpt[10]["layers.6.weight"], init["layers.6.weight"])
    # Epoch 1: the middle block trains (its statistics move), the backbone stays as it was.
    assert _same(ckpt[20], init, BACKBONE)
    for key in ("layers.3.weight", "layers.4.weight", "layers.4.running_mean"):
        assert not torch.equal(ckpt[20][key], init[key]), key
    final = weights(ref / "model.safetensors")
    for key in ("layers.0.weight", "layers.1.bias", "layers.1.running_var"):
        assert not torch.equal(final[key], init[key]), key  # epoch 2: everything trains

    # Rank 1 dies as the save of step 16 begins: the newest complete checkpoint is step 12
    # (epoch 1, after the first switch), so the resume sets that epoch's trainable set and
    # then crosses the second switch at step 20.
    run = tmp_path / "run"
    args = ["train", str(recipe), "-o", str(run)]
    r = cli(*args, nproc=2, DIST_TRAIN_FAULT="before-write@16", DIST_TRAIN_FAULT_RANK="1")
    assert r.returncode != 0 and not (run / "model.safetensors").exists()
    r = cli(*args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-000012" in r.stdout
    assert run_info(run)["world_size"] == 2
    assert bitwise_equal(weights(run / "model.safetensors"), final)
