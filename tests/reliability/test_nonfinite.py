# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Numerical faults: a non-finite loss/gradient is never applied; `train.on_nonfinite` chooses
stop (diagnostic file, exit 3, last good checkpoint kept) or skip (logged, with a limit on
consecutive skips); every rank takes the same decision at the same step.

The fault is made deterministic with the data: feature f0 of one training row is `inf` (with
standardization off, so only that row is affected). The step whose batch holds that row gets an
infinite activation, a NaN loss and NaN gradients; the audit log (DIST_TRAIN_AUDIT_SAMPLES=1)
says which step that is, so the tests do not depend on the shuffle order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from procs import cli_here
from rel_helpers import (
    TRAIN_ROWS,
    Ranks,
    events,
    poison,
    rel_data,  # noqa: F401 (fixture)
    table_lines,
    weights,
    write_recipe,
    write_table,
)

BAD_ROW = 100  # in the 8th batch of epoch 0 with seed 3: after the checkpoints at steps 3 and 6
EVERY = 3
COMMON = ["data.standardize=false", f"checkpoint.every_steps={EVERY}"]
AUDIT = {"DIST_TRAIN_AUDIT_SAMPLES": "1"}


def _recipe(tmp_path: Path, rel_data, bad_rows: list[int]) -> Path:
    train = write_table(tmp_path / "train.csv", poison(table_lines(TRAIN_ROWS, 0), bad_rows))
    return write_recipe(tmp_path / "r.yaml", train, rel_data["valid"])


def _first_step_with(run: Path, row: int) -> tuple[int, set[int]]:
    """(1-based optimizer step of epoch 0 whose batch holds `row`, all rows of that step)."""
    rows: dict[int, set[int]] = {}
    for log in sorted((run / "samples").glob("rank-*.log")):
        for line in log.read_text().splitlines():
            epoch, step, ids = line.split()
            if epoch == "0":
                rows.setdefault(int(step) + 1, set()).update(map(int, ids.split(",")))
    step = min(s for s, r in rows.items() if row in r)
    return step, rows[step]


def _complete(run: Path) -> list[str]:
    return sorted(
        p.name for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()
    )


def _check_stop(run: Path, err: str, nproc: int) -> int:
    """The stop diagnostics; returns the step that stopped."""
    step, rows = _first_step_with(run, BAD_ROW)
    assert step > EVERY, "the bad row must come after a checkpoint; pick another BAD_ROW"
    assert f"step {step}: non-finite loss/gradient (train.on_nonfinite is stop)" in err, err
    assert "layers.0.weight" in err and "The last good checkpoint is untouched" in err
    assert "Traceback" not in err
    diag = json.loads((run / f"nonfinite-step-{step:06d}.json").read_text())
    assert diag["step"] == step and diag["epoch"] == 0 and diag["consecutive"] == 1
    assert not math.isfinite(diag["loss"]) and not math.isfinite(diag["grad_norm"])
    names = {n.removeprefix("module.") for n in diag["params_with_nonfinite_grad"]}
    assert {"layers.0.weight", "layers.0.bias"} <= names
    # every row of the global batch, from every rank, and the bad one among them
    assert len(diag["batch_rows"]) == 24 and set(diag["batch_rows"]) == rows
    assert BAD_ROW in diag["batch_rows"]
    # the last good checkpoint is the latest; nothing after the bad step was saved or exported
    last_good = (step - 1) // EVERY * EVERY
    assert _complete(run)[-1] == f"step-{last_good:06d}"
    assert not list((run / "checkpoints").glob(".tmp-step-*"))
    assert not (run / "model.safetensors").exists()
    return step


def test_stop_writes_a_diagnostic_and_keeps_the_last_good_checkpoint(rel_data, tmp_path):
    recipe, run = _recipe(tmp_path, rel_data, [BAD_ROW]), tmp_path / "run"
    r = cli_here("train", str(recipe), "-o", str(run), *COMMON, **AUDIT)
    assert r.returncode == 3, r.stderr[-3000:]
    step = _check_stop(run, r.stderr, nproc=1)
    # Fix the data, run the same command: it resumes from the last good checkpoint.
    write_table(tmp_path / "train.csv", table_lines(TRAIN_ROWS, 0))
    r = cli_here("train", str(recipe), "-o", str(run), *COMMON)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-{(step - 1) // EVERY * EVERY:06d}" in r.stdout
    assert all(
        math.isfinite(float(v.abs().max())) for v in weights(run / "model.safetensors").values()
    )


def test_skip_logs_each_bad_step_and_training_goes_on(rel_data, tmp_path):
    recipe, run = _recipe(tmp_path, rel_data, [BAD_ROW]), tmp_path / "run"
    r = cli_here("train", str(recipe), "-o", str(run), *COMMON, "train.on_nonfinite=skip")
    assert r.returncode == 0, r.stderr[-3000:]
    bad = events(run, "nonfinite")
    assert len(bad) == 3, bad  # the bad row comes once per epoch, 3 epochs
    assert [e["epoch"] for e in bad] == [0, 1, 2] and all(e["streak"] == 1 for e in bad)
    assert "non-finite gradient, step skipped (1/10 in a row)" in r.stdout
    assert len({e["step"] for e in events(run, "train")}) == 60  # the schedule went on
    final = weights(run / "model.safetensors")
    assert all(bool(v.isfinite().all()) for v in final.values())  # nothing bad was applied


def test_too_many_consecutive_skips_stop(rel_data, tmp_path):
    # Every 4th row bad: (almost) every batch of 24 holds one, so skips come in a row.
    recipe = _recipe(tmp_path, rel_data, list(range(0, TRAIN_ROWS, 4)))
    run = tmp_path / "run"
    r = cli_here(
        "train",
        str(recipe),
        "-o",
        str(run),
        *COMMON,
        "train.on_nonfinite=skip",
        "train.max_nonfinite_skips=2",
    )
    assert r.returncode == 3, r.stderr[-3000:]
    assert "3 consecutive skips > train.max_nonfinite_skips" in r.stderr
    assert "Traceback" not in r.stderr
    streaks = [e["streak"] for e in events(run, "nonfinite")]
    assert streaks[-3:] == [1, 2, 3]
    (diag,) = run.glob("nonfinite-step-*.json")
    assert json.loads(diag.read_text())["consecutive"] == 3


@pytest.fixture(scope="module")
def two_rank_stop(rel_data, tmp_path_factory):
    """One 2-rank run (both ranks plain processes, so each rank's exit code is seen)."""
    tmp = tmp_path_factory.mktemp("two_rank_stop")
    recipe, run = _recipe(tmp, rel_data, [BAD_ROW]), tmp / "run"
    ranks = Ranks(["train", str(recipe), "-o", str(run), *COMMON], tmp / "logs", **AUDIT)
    try:
        codes = [ranks.wait(rank, 180)[0] for rank in (0, 1)]
    finally:
        ranks.kill_all()
    return run, ranks, codes


@pytest.mark.dist
def test_two_ranks_stop_at_the_same_step_with_rows_of_both(two_rank_stop):
    run, ranks, codes = two_rank_stop
    assert codes == [3, 3], ranks.err(0) + ranks.err(1)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    step = _check_stop(run, ranks.err(0), nproc=2)
    # Both ranks stopped at that step: neither trained past it.
    for rank in (0, 1):
        steps = [
            int(ln.split()[1])
            for ln in (run / "samples" / f"rank-{rank}.log").read_text().splitlines()
        ]
        assert max(steps) + 1 == step
    assert "error:" not in ranks.err(1)  # said once, by rank 0


@pytest.mark.dist
def test_two_rank_diagnostic_names_parameters_as_on_one_process(two_rank_stop):
    run, ranks, _ = two_rank_stop
    (diag,) = run.glob("nonfinite-step-*.json")
    names = json.loads(diag.read_text())["params_with_nonfinite_grad"]
    assert "layers.0.weight" in names and not any(n.startswith("module.") for n in names)
    assert "parameters affected: layers.0.weight" in ranks.err(0)
