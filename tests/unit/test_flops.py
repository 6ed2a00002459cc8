"""Model FLOP counting for the logged achieved TFLOP/s and MFU: the analytic count of layer
lists equals torch's FlopCounterMode, and costs no torch._dynamo import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dist_train import build
from dist_train.config.recipe import load_recipe
from dist_train.training.flops import (
    counted_flops,
    layer_flops,
    peak_tflops,
    train_flops_per_sample,
)
from dist_train.training.trainer import train


def test_counts_three_times_the_forward_matmuls():
    net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    # forward: 2 multiply-adds per weight per sample; training = 3x forward
    assert train_flops_per_sample(net, torch.randn(2, 32)) == 3 * 2 * (32 * 256 + 256 * 10)


def test_counting_leaves_training_state_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    net.train()
    stats = [b.clone() for b in net[1].buffers()]
    example = torch.randn(2, 1, 6, 6)
    rng = torch.get_rng_state()
    flops = train_flops_per_sample(net, example)
    assert flops == 3 * 2 * (9 * 4 * 16)  # 3x3 kernel, 4 channels, 4x4 outputs
    assert net.training and all(m.training for m in net)
    assert all(torch.equal(a, b) for a, b in zip(stats, net[1].buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())  # dropout drew nothing
    assert all(p.grad is None for p in net.parameters())


# The recipes made of the layer vocabulary (the transformers ones count only with
# FlopCounterMode, where a peak is known; their data comes from recipes/make_pretrained.py).
RECIPES = [
    p
    for p in sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    if not {"hf", "factory"} & set(yaml.safe_load(p.read_text())["model"])
]


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_layer_count_equals_flop_counter_mode_on_the_shipped_recipes(recipe_path, tmp_path):
    overrides = []
    if "imagefolder:data/" in recipe_path.read_text():  # the folder its script writes
        script = recipe_path.parent / "make_digits_folder.py"
        spec = importlib.util.spec_from_file_location("make_digits_folder", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write_digits(tmp_path / "digits", limit=60)
        overrides = [f"data.source=imagefolder:{tmp_path / 'digits'}"]
    if "parquet:data/" in recipe_path.read_text():  # the shards its script writes
        script = recipe_path.parent / "make_parquet_shards.py"
        spec = importlib.util.spec_from_file_location("make_parquet_shards", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write_shards(tmp_path / "shards", rows=600, shards=2)
        overrides = [
            f"data.source=parquet:{tmp_path / 'shards'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    recipe = load_recipe(str(recipe_path), overrides)
    data = build.build_data(recipe)
    net = build.build_net(recipe, data, build.make_head(recipe, data)[0])
    example = data.train.head(3)  # uint8 for image folders: the model turns it into floats
    analytic = layer_flops(net, example)
    assert analytic is not None and analytic > 0
    assert analytic == counted_flops(net, example)


def test_layer_count_covers_strides_padding_groups_and_pooling():
    net = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(6),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 5, (3, 1), padding="same", bias=False),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(5, 7),
        nn.GELU(),
        nn.Linear(7, 3),
        nn.Softmax(dim=1),
    )
    example = torch.randn(2, 4, 9, 9)
    assert layer_flops(net, example) == counted_flops(net, example) > 0


class _OwnForward(nn.Module):
    """A user module whose forward does a matmul the layer vocabulary cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        return x @ self.w


def test_other_models_use_the_flop_counter_only_where_mfu_can_be_computed():
    net = nn.Sequential(nn.Linear(3, 4), _OwnForward())
    x = torch.randn(2, 3)
    assert layer_flops(net, x) is None  # unknown forward: not counted analytically
    assert train_flops_per_sample(net, x, counter=True) == 3 * 2 * (3 * 4 + 4 * 5)
    assert train_flops_per_sample(net, x, counter=False) is None
    assert train_flops_per_sample(net, x) is None  # CPU: no known peak, so no counter


def test_counting_a_layer_list_never_imports_torch_dynamo():
    """FlopCounterMode's first use imports torch._dynamo (~1 s, ~70 MiB); a layer-list model
    on a CPU must not pay that (a fresh interpreter: this one may have imported it already)."""
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from dist_train.training.flops import train_flops_per_sample\n"
        "net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))\n"
        "flops = train_flops_per_sample(net, torch.randn(2, 1, 8, 8))\n"
        "print(flops, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    assert out == [str(3.0 * 2 * (9 * 4 * 36 + 144 * 3)), "False"]


def test_peak_comes_from_the_recipe_or_a_known_gpu():
    assert peak_tflops(torch.device("cpu"), None) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5


def test_train_logs_model_tflops_and_mfu(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        """name: flops
data: {source: "sklearn:iris", target: target, task: multiclass}
model: {layers: [{linear: 16}, relu, {linear: out}]}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.1}
train: {epochs: 2, batch_size: 8, log_every_steps: 5, peak_tflops: 0.001}
"""
    )
    train(load_recipe(str(path), []), str(tmp_path / "run"), restart=True)
    per_sample = 3 * 2 * (4 * 16 + 16 * 3)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train_flops_per_sample"] == (
        per_sample
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [r for r in rows if r.get("event") == "train"]
    assert logged
    for r in logged:
        assert abs(r["model_tflops"] - per_sample * r["samples_per_s"] / 1e12) < 1e-12
        assert abs(r["mfu"] - r["model_tflops"] / 0.001) < 1e-9
