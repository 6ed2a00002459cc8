# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Promises 3 and 4 in the fast loop, with deterministic faults instead of timed kills: the
process SIGKILLs itself at a named point of a checkpoint save (`DIST_TRAIN_FAULT`, see
dist_train/run/checkpoint.py), in a fork of the test process (no seconds of imports).

- a run killed mid-epoch resumes to weights bitwise equal to an uninterrupted run (a batch
  skipped or repeated on resume, a step counter off by one, an RNG stream not restored: all
  change the weights);
- a save killed at each of its stages never leaves a COMPLETE checkpoint that fails to load,
  and the previous checkpoint stays the latest until the new one is sealed.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from procs import cli_forked, cli_here
from rel_helpers import (  # noqa: F401
    assert_checkpoint_loads,
    bitwise_equal,
    events,
    rel_data,
    rel_recipe,
    weights,
)

from dist_train.run.checkpoint import FAULT_POINTS

# 20 optimizer steps per epoch, 60 in all; dropout and input noise draw random numbers, so the
# RNG streams must be restored exactly; a checkpoint every 7 steps lands mid-epoch.
ARGS = [
    "checkpoint.every_steps=7",
    "checkpoint.keep=2",
    "model.layers.3=dropout",
    "data.augment.noise=0.05",
]
TOTAL = 60
KILLED = -signal.SIGKILL


def _train(recipe: Path, run: Path) -> list[str]:
    return ["train", str(recipe), "-o", str(run), *ARGS]


def _complete(run: Path) -> list[str]:
    ckpts = (run / "checkpoints").glob("step-*")
    return sorted(p.name for p in ckpts if (p / "COMPLETE").is_file())


def test_killed_mid_epoch_then_resumed_is_bitwise_exact(rel_recipe, reference_run, tmp_path):
    ref = reference_run(rel_recipe, *ARGS)
    run = tmp_path / "run"
    # Killed as the save of step 28 begins: steps 22-28 (epoch 2) are lost, step 21 is latest.
    log = tmp_path / "killed.log"
    code = cli_forked(log, *_train(rel_recipe, run), DIST_TRAIN_FAULT="before-write@28")
    assert code == KILLED, log.read_text()[-3000:]
    assert not (run / "model.safetensors").exists()
    assert _complete(run) == ["step-000020", "step-000021"]  # keep=2 (every epoch too)
    assert max(e["step"] for e in events(run, "train")) == 28

    r = cli_here(*_train(rel_recipe, run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-000021" in r.stdout
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
    # metrics.jsonl was rewound to step 21: every step once, in order, the redone ones included
    assert [e["step"] for e in events(run, "train")] == list(range(1, TOTAL + 1))


# What a save of step 14 killed at each point leaves behind, besides the sealed step-000007.
LEFT = {
    "before-write": set(),
    "after-weights": {".tmp-step-000014"},
    "before-fsync": {".tmp-step-000014"},
    "before-rename": {".tmp-step-000014"},
    "before-marker": {"step-000014"},
    "after-marker": {"step-000014"},
}


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_save_killed_at_any_stage_leaves_a_loadable_latest(
    point, rel_recipe, reference_run, tmp_path
):
    ref = reference_run(rel_recipe, *ARGS)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    log = tmp_path / "killed.log"
    code = cli_forked(log, *_train(rel_recipe, run), DIST_TRAIN_FAULT=f"{point}@14")
    assert code == KILLED, log.read_text()[-3000:]
    # The kill happened where it was asked to (the points are in the order a save passes them).
    assert {p.name for p in ckpts.iterdir()} == {"step-000007"} | LEFT[point]
    tmp = ckpts / ".tmp-step-000014"
    if point in ("after-weights", "before-fsync", "before-rename"):
        assert (tmp / "model.safetensors").is_file()
        assert (tmp / "train_state.json").is_file() == (point != "after-weights")
    sealed = point == "after-marker"
    assert _complete(run) == ["step-000007", "step-000014"][: 2 if sealed else 1]
    for name in _complete(run):
        assert_checkpoint_loads(ckpts / name)

    r = cli_here(*_train(rel_recipe, run))
    assert r.returncode == 0, r.stderr[-3000:]
    latest = "step-000014" if sealed else "step-000007"
    assert f"resuming from {ckpts}/{latest}" in r.stdout
    skipped = f"skipping incomplete checkpoint {ckpts}/step-000014" in r.stdout
    assert skipped == (point == "before-marker")
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
    assert not list(ckpts.glob(".tmp-*"))  # the next save cleaned the leftovers up


def test_unknown_fault_point_is_a_user_error(rel_recipe, tmp_path):
    r = cli_here(*_train(rel_recipe, tmp_path / "run"), DIST_TRAIN_FAULT="after-everything")
    assert r.returncode == 2, r.stderr
    assert "DIST_TRAIN_FAULT=after-everything" in r.stderr and "before-rename" in r.stderr


def test_a_save_fsyncs_every_file_before_the_rename_and_marks_it_after(
    rel_recipe, tmp_path, monkeypatch
):
    """What a kill cannot show, a power cut would: the order of durable writes. Every file of a
    checkpoint (and its directory) is fsynced before the rename that publishes it, and the
    COMPLETE marker is written and fsynced only after it."""
    import os

    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def spy_replace(src, dst, **kw):
        calls.append(("rename", f"{src} -> {dst}"))
        return replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    run = tmp_path / "run"
    r = cli_here("train", str(rel_recipe), "-o", str(run), "train.epochs=1", "checkpoint.keep=5")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run / "checkpoints"
    (final,) = ckpts.glob("step-*")  # every_epochs=1: one save, step 20
    tmp = ckpts / f".tmp-{final.name}"
    renamed = calls.index(("rename", f"{tmp} -> {final}"))
    before = {path for kind, path in calls[:renamed] if kind == "fsync"}
    after = {path for kind, path in calls[renamed:] if kind == "fsync"}
    files = {p.name for p in final.iterdir()} - {"COMPLETE"}
    assert {"model.safetensors", "train_state.json", "optimizer.bin"} <= files
    assert {str(tmp / name) for name in files} | {str(tmp)} <= before
    assert str(ckpts) in after  # the rename itself made durable
    assert {str(final / "COMPLETE"), str(final)} <= after
