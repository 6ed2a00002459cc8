# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Exact resume with evaluations inside the epoch and weight averaging (one process, in the
fast loop; two processes: tests/dist/test_eval_steps.py).

Evaluations every 5 steps feed a plateau schedule (they change the lr, hence the weights),
early stopping and the best checkpoint; the average (EMA every 2nd step, or SWA every 3rd) is
what is evaluated and exported. A run killed mid-epoch resumes from a checkpoint written after
a mid-epoch evaluation and must give the uninterrupted run's evaluations, averaged export,
raw weights and best step, bitwise: a plateau counter, early-stopping state or average that
was not checkpointed (or an evaluation repeated at the resumed step) changes them."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from procs import cli_forked, cli_here
from rel_helpers import bitwise_equal, events, rel_data, rel_recipe, weights  # noqa: F401

ARGS = [
    "checkpoint.every_steps=7",
    "checkpoint.keep=2",
    "checkpoint.best.monitor=valid/loss",
    "model.layers.3=dropout",  # random numbers drawn: the RNG streams must be restored too
    "train.eval_every_steps=5",
    "scheduler={name: plateau, monitor: valid/accuracy, patience: 0, factor: 0.5}",
    "train.early_stopping={monitor: valid/loss, patience: 6}",
]
AVERAGES = {
    "ema": "train.ema={decay: 0.9, every_steps: 2}",
    "swa": "train.swa={start_epoch: 1, every_steps: 3}",
}


def _final_checkpoint(run: Path) -> Path:
    return max((run / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("kind", list(AVERAGES))
def test_mid_epoch_eval_and_average_resume_bitwise(rel_recipe, reference_run, tmp_path, kind):
    args = [*ARGS, AVERAGES[kind]]
    ref = reference_run(rel_recipe, *args)
    ref_evals = events(ref, "eval")
    assert [e["step"] for e in ref_evals][:5] == [5, 10, 15, 20, 25]
    assert {e["weights"] for e in ref_evals} == {kind}
    lrs = {e["lr"] for e in events(ref, "train")}
    assert len(lrs) > 1  # the plateau schedule acted on the evaluations

    run = tmp_path / "run"
    train = ["train", str(rel_recipe), "-o", str(run), *args]
    log = tmp_path / "killed.log"
    code = cli_forked(log, *train, DIST_TRAIN_FAULT="before-write@28")
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    r = cli_here(*train)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = int(r.stdout.split("checkpoints/step-")[1][:6])
    assert 20 < resumed_at < 28  # inside epoch 2, after the evaluation at step 25 or 20
    assert [(e["step"], e["valid/loss"], e["weights"]) for e in events(run, "eval")] == [
        (e["step"], e["valid/loss"], e["weights"]) for e in ref_evals
    ]
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
    mine, theirs = _final_checkpoint(run), _final_checkpoint(ref)
    assert mine.name == theirs.name
    for name in ("model.safetensors", "averaged.safetensors"):  # raw and averaged weights
        assert bitwise_equal(weights(mine / name), weights(theirs / name)), name
    info, ref_info = (json.loads((d / "run.json").read_text()) for d in (run, ref))
    keys = ("steps", "best_step", "best_value")
    assert {k: info[k] for k in keys} == {k: ref_info[k] for k in keys}
