"""Evaluation every N optimizer steps and weight averaging on 2 real gloo ranks: the same
evaluations (steps, exact row counts, values), decisions and averaged weights as on 1 process,
and a rank killed mid-epoch resumes to the uninterrupted 2-process run bitwise."""

from __future__ import annotations

import json

import pytest
from dist_helpers import events, run_info
from procs import bitwise_equal, cli, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# No dropout: 1 and 2 processes then differ only in the all-reduce summation order (1e-5).
# Evaluations every 5 steps drive a plateau schedule, early stopping and the best checkpoint;
# the EMA is what they evaluate and what is exported.
ARGS = [
    "train.epochs=2",  # 40 steps: the kill at 28 is mid-epoch 2
    "train.eval_every_steps=5",
    "scheduler={name: plateau, monitor: valid/accuracy, patience: 0, factor: 0.5}",
    "train.early_stopping={monitor: valid/loss, patience: 6}",
    "checkpoint.best.monitor=valid/loss",
    "checkpoint.every_steps=7",
    "train.ema={decay: 0.9, every_steps: 2}",
]


def _evals(run):
    return [(e["step"], e["valid/rows"], e["weights"]) for e in events(run, "eval")]


def test_step_evaluation_on_two_processes_equals_one_and_resumes_bitwise(
    tiny_recipe, reference_run, tmp_path
):
    one = reference_run(tiny_recipe, *ARGS)
    two = reference_run(tiny_recipe, *ARGS, nproc=2)
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    assert _evals(two) == _evals(one)
    assert _evals(one)[:4] == [(5, 97, "ema"), (10, 97, "ema"), (15, 97, "ema"), (20, 97, "ema")]
    for a, b in zip(events(one, "eval"), events(two, "eval"), strict=True):
        assert abs(a["valid/loss"] - b["valid/loss"]) < 1e-5, (a, b)
        assert a["valid/accuracy"] == b["valid/accuracy"]
    lrs = [e["lr"] for e in events(two, "train")]
    assert lrs == [e["lr"] for e in events(one, "train")] and len(set(lrs)) > 1  # plateau acted
    assert run_info(two)["best_step"] == run_info(one)["best_step"]
    assert max_diff(weights(two / "model.safetensors"), weights(one / "model.safetensors")) < 1e-5

    # Rank 1 dies as the save of step 28 begins; the resume starts after a mid-epoch evaluation.
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), *ARGS]
    r = cli(*args, nproc=2, DIST_TRAIN_FAULT="before-write@28", DIST_TRAIN_FAULT_RANK="1")
    assert r.returncode != 0 and not (run / "model.safetensors").exists(), r.stdout[-2000:]
    r = cli(*args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = int(r.stdout.split("checkpoints/step-")[1][:6])
    assert 20 < resumed_at < 28, resumed_at  # mid-epoch 2, the evaluation at 25 or 21 saved
    assert run_info(run)["world_size"] == 2
    got = [(e["step"], e["valid/loss"]) for e in events(run, "eval")]
    assert got == [(e["step"], e["valid/loss"]) for e in events(two, "eval")]
    assert bitwise_equal(weights(run / "model.safetensors"), weights(two / "model.safetensors"))
    info = json.loads((run / "run.json").read_text())
    assert (info["best_step"], info["best_value"]) == (
        run_info(two)["best_step"],
        run_info(two)["best_value"],
    )
