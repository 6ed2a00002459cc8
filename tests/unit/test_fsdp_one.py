"""train.strategy fsdp on one process: nothing to shard, the same training as ddp, bf16
included (the forward gets the autocast accelerate's prepare() gives a DDP model)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dist_train.config.recipe import load_recipe
from dist_train.training.trainer import train
from tests.procs import ROOT, cli_here


def test_one_process_fsdp_trains_like_ddp_in_bf16(tmp_path):
    common = ["train.max_steps=4", "train.epochs=1", "tracking.wandb.mode=disabled"]
    out = {}
    for name, extra in {
        "ddp16": ["train.mixed_precision=bf16"],
        "fsdp16": ["train.mixed_precision=bf16", "train.strategy=fsdp"],
        "fsdp32": ["train.strategy=fsdp"],
    }.items():
        recipe = load_recipe(str(ROOT / "recipes/wine_mlp.yaml"), [*common, *extra])
        train(recipe, str(tmp_path / name))
        out[name] = load_file(tmp_path / name / "model.safetensors")
    for key, value in out["ddp16"].items():
        assert value.dtype == torch.float32  # fp32 master weights in the export
        assert torch.equal(out["fsdp16"][key], value), key
    assert any(not torch.equal(out["fsdp32"][k], v) for k, v in out["ddp16"].items())
    assert list((tmp_path / "fsdp16" / "checkpoints").glob("step-*/sharded/.metadata"))  # DCP


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.ema={decay: 0.99}"], "train.ema"),
        (["freeze={params: ['layers.0.*'], unfreeze_at_epoch: 1}"], "freeze.schedule"),
    ],
)
def test_what_fsdp_does_not_support_exits_2_naming_the_key(overrides, key):
    """Weight averaging copies the unsharded module and a freeze schedule needs DDP's
    unused-parameter search: with strategy fsdp both are refused before anything runs."""
    wine = str(ROOT / "recipes" / "wine_mlp.yaml")
    r = cli_here("check", wine, "train.strategy=fsdp", "train.epochs=2", *overrides)
    assert r.returncode == 2, r.stdout[-2000:]
    assert key in r.stderr and "fsdp" in r.stderr and "Traceback" not in r.stderr
