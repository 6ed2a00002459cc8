"""Early stopping and `checkpoint.best` decided once and obeyed by every rank: on 2 processes
they trigger at the same evaluations as on 1, over many evaluations, and the best checkpoint
kept holds the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import events, run_info
from procs import cli, cli_here, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PATIENCE = 3
EPOCHS = 30  # 20 steps each, an evaluation per epoch
# A constant lr high enough to overfit: valid/loss falls for ~9 evaluations, then rises.
ES = [
    f"train.epochs={EPOCHS}",
    "scheduler.name=constant",
    "optimizer.lr=0.05",
    f"train.early_stopping={{monitor: valid/loss, patience: {PATIENCE}}}",
    "checkpoint.best.monitor=valid/loss",
    "checkpoint.keep=1",
]
AUDIT = {"DIST_TRAIN_AUDIT_SAMPLES": "1"}


def _last_step_per_rank(run: Path) -> dict[str, int]:
    """The last optimizer step each rank trained, from its own audit log."""
    last = {}
    for log in sorted((run / "samples").glob("rank-*.log")):
        last[log.stem] = max(int(line.split()[1]) for line in log.read_text().splitlines()) + 1
    return last


def _check(run: Path, stdout: str, world: int) -> tuple[int, int]:
    """(stop step, best step) of a run, checked against its own evaluations."""
    evals = events(run, "eval")
    steps = [e["step"] for e in evals]
    best = min(evals, key=lambda e: (e["valid/loss"], e["step"]))["step"]
    assert steps == list(range(20, steps[-1] + 1, 20))  # one evaluation per epoch, none lost
    assert len(evals) >= 6 and steps[-1] < EPOCHS * 20, steps  # stopped early, not at once
    assert steps[-1] == best + PATIENCE * 20  # exactly PATIENCE evaluations without improvement
    assert f"early stopping: valid/loss did not improve for {PATIENCE} evaluations" in stdout
    assert run_info(run)["best_step"] == best and run_info(run)["world_size"] == world
    # every rank left the loop at the stop step (a rank deciding alone would train on or hang)
    assert _last_step_per_rank(run) == {f"rank-{r}": steps[-1] for r in range(world)}
    kept = {p.name for p in (run / "checkpoints").glob("step-*")}
    assert kept == {f"step-{best:06d}", f"step-{steps[-1]:06d}"}  # keep=1, plus the best
    assert all((run / "checkpoints" / k / "COMPLETE").is_file() for k in kept)
    return steps[-1], best


def test_early_stop_and_best_checkpoint_match_on_one_and_two_processes(tiny_recipe, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = cli_here("train", str(tiny_recipe), "-o", str(one), *ES, **AUDIT)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = cli("train", str(tiny_recipe), "-o", str(two), *ES, nproc=2, **AUDIT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    stop, best = _check(one, r1.stdout, 1)
    assert _check(two, r2.stdout, 2) == (stop, best)
    ckpt = f"checkpoints/step-{best:06d}/model.safetensors"
    best_one, best_two = weights(one / ckpt), weights(two / ckpt)
    assert max_diff(best_one, best_two) < 1e-5  # the same best weights on either world size
    # and they are the weights of the best step, not of the last one
    assert max_diff(best_two, weights(two / "model.safetensors")) > 1e-3
