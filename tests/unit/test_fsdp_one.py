"""train.strategy fsdp on one process: nothing to shard, the same training as ddp, bf16
included (the forward gets the autocast accelerate's prepare() gives a DDP model)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dist_train.config.recipe import load_recipe
from dist_train.training.trainer import train
from tests.procs import ROOT


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
