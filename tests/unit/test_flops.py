"""Model FLOP counting for the logged achieved TFLOP/s and MFU."""

from __future__ import annotations

import json

import torch
from torch import nn

from dist_train.config.recipe import load_recipe
from dist_train.training.flops import peak_tflops, train_flops_per_sample
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
