# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""`data.sampler: balanced` resumes exactly: its draw is a function of (seed, epoch), so a
run killed mid-epoch and resumed trains on the rows of the uninterrupted run, step by step,
and ends with bitwise-equal weights (the fast loop's fault injection, in a fork)."""

from __future__ import annotations

import signal
from pathlib import Path

from procs import cli_forked, cli_here
from rel_helpers import bitwise_equal, rel_data, rel_recipe, weights  # noqa: F401

# 20 steps per epoch, 40 in all; a save every 7 steps lands mid-epoch; dropout needs the RNG
# streams restored too.
ARGS = [
    "data.sampler=balanced",
    "train.epochs=2",
    "checkpoint.every_steps=7",
    "checkpoint.keep=2",
    "model.layers.3=dropout",
]
AUDIT = {"DIST_TRAIN_AUDIT_SAMPLES": "1"}


def _rows_by_step(run: Path) -> dict[int, str]:
    """Step -> the rows it trained on; a step redone after the resume keeps its last rows."""
    out: dict[int, str] = {}
    for line in (run / "samples" / "rank-0.log").read_text().splitlines():
        _epoch, step, ids = line.split()
        out[int(step)] = ids
    return out


def test_balanced_sampler_killed_mid_epoch_resumes_bitwise(rel_recipe, reference_run, tmp_path):
    ref = reference_run(rel_recipe, *ARGS, **AUDIT)
    run, log = tmp_path / "run", tmp_path / "killed.log"
    args = ["train", str(rel_recipe), "-o", str(run), *ARGS]
    # Killed as the save of step 28 begins: step 21 (1 step into epoch 2) is the latest.
    code = cli_forked(log, *args, DIST_TRAIN_FAULT="before-write@28", **AUDIT)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    r = cli_here(*args, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-000021" in r.stdout
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
    got, want = _rows_by_step(run), _rows_by_step(ref)
    assert sorted(got) == list(range(40)) and got == want
