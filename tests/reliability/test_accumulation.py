# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Promise 1 in the fast loop, on one process: gradient accumulation is derived math, not a
different schedule. Batch 24 as 2 accumulated micro-batches of 12 gives the lr of every
optimizer step and (to float summation order) the weights of batch 24 in one go; the 2-process
version is tests/dist/test_world_size.py."""

from __future__ import annotations

from procs import cli_here
from rel_helpers import events, max_diff, rel_data, rel_recipe, weights  # noqa: F401


def test_grad_accum_gives_the_same_schedule_and_weights(rel_recipe, reference_run, tmp_path):
    one = reference_run(rel_recipe, "train.epochs=1")
    acc = tmp_path / "acc"
    r = cli_here("train", str(rel_recipe), "-o", str(acc), "train.epochs=1", "train.grad_accum=2")
    assert r.returncode == 0, r.stderr[-3000:]
    lr_one = [(e["step"], e["lr"]) for e in events(one, "train")]
    lr_acc = [(e["step"], e["lr"]) for e in events(acc, "train")]
    assert lr_one == lr_acc and len(lr_one) == 20  # one schedule step per optimizer step
    diff = max_diff(weights(one / "model.safetensors"), weights(acc / "model.safetensors"))
    assert diff < 1e-5, diff
