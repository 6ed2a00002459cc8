"""Mixup + CutMix keep the global-batch promise: 1 and 2 processes train the same weights."""

from __future__ import annotations

import pytest
from dist_helpers import run_info
from procs import cli, cli_here, max_diff, weights

pytestmark = pytest.mark.dist

# digits as 8x8 images; no batch norm or dropout (their per-rank statistics / masks are not
# the subject here); both mixers on, each row picking one of them.
ARGS = (
    "recipes/digits_cnn.yaml",
    "model.layers=[flatten, {linear: 32}, relu, {linear: out}]",
    "data.augment={mixup: 0.4, cutmix: 1.0, mix_prob: 0.8}",
    "train.batch_size=32",
    "train.max_steps=12",
    "checkpoint.every_epochs=0",
    "~metrics",
)


def test_mixup_cutmix_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = cli_here("train", *ARGS, "-o", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("train", *ARGS, "-o", str(two), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
