"""Promises 3 and 4: kill anywhere, resume, same result; elastic resume; atomic checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import audit_rows, events, preempt, run_info
from procs import bitwise_equal, cli, cli_here, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# dropout + augmentation noise exercise the restored RNG streams; every_steps=7 puts
# checkpoints mid-epoch (20 steps per epoch).
EXACT = ["checkpoint.every_steps=7", "data.augment.noise=0.05"]


def _complete(run: Path) -> list[str]:
    ckpts = (run / "checkpoints").glob("step-*")
    return sorted(p.name for p in ckpts if (p / "COMPLETE").is_file())


# One process, and a save killed at each of its stages: tests/reliability/test_faults.py (in
# the fast loop). Here: two ranks, the non-main one SIGKILLed.
def test_sigkill_of_one_rank_mid_epoch_then_resume_is_bitwise_exact(
    tiny_recipe, reference_run, tmp_path
):
    dropout = ["model.layers.3=dropout"]  # tanh -> dropout: the RNG must be restored exactly
    ref = reference_run(tiny_recipe, *EXACT, *dropout, nproc=2)
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), *EXACT, *dropout]
    # Rank 1 dies as the save of step 28 begins (steps 22-28 are lost; torchrun then stops
    # rank 0, which cannot seal a save without rank 1).
    r = cli(*args, nproc=2, DIST_TRAIN_FAULT="before-write@28", DIST_TRAIN_FAULT_RANK="1")
    assert r.returncode != 0, r.stdout[-2000:]
    assert not (run / "model.safetensors").exists()
    assert _complete(run) == ["step-000014", "step-000020", "step-000021"]  # keep: 3
    # each rank saved its own RNG streams, and they differ (seeded per rank: distinct dropout
    # masks; the same seed on every rank would make these equal)
    from accelerate.utils import load

    rng = [load(run / f"checkpoints/step-000021/random_states_{r}.pkl") for r in (0, 1)]
    assert not (rng[0]["torch_manual_seed"] == rng[1]["torch_manual_seed"]).all()
    r = cli(*args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-000021" in r.stdout
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
    steps = [e["step"] for e in events(run, "train")]
    assert steps == list(range(1, 61))  # every step once, in order: redone ones rewound


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_elastic_resume_repeats_and_skips_no_sample(
    tiny_recipe, reference_run, tmp_path, before, after
):
    """Resume on another world size: the global sample count carries over, so every step trains
    on exactly the rows the uninterrupted run used (audited), and weights agree to 1e-5 (no
    dropout here; only the all-reduce summation order differs between world sizes)."""
    ref_dir = reference_run(tiny_recipe, DIST_TRAIN_AUDIT_SAMPLES="1")
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run)]
    preempt(args, run, before, at_step=27)
    r = cli(*args, nproc=after, DIST_TRAIN_AUDIT_SAMPLES="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "elastic resume" in r.stdout
    assert run_info(run)["world_size"] == after
    got, want = audit_rows(run), audit_rows(ref_dir)
    assert sorted(got) == sorted(want) == list(range(60))
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), step  # same rows, none twice
    for epoch in range(3):
        seen = [i for s in range(epoch * 20, epoch * 20 + 20) for i in got[s]]
        assert sorted(seen) == list(range(480))  # each row exactly once per epoch
    assert (
        max_diff(weights(run / "model.safetensors"), weights(ref_dir / "model.safetensors")) < 1e-5
    )
    resume = events(run, "resume")
    assert resume and resume[-1]["world_size"] == after


def test_finished_run_is_not_overwritten_and_changed_recipe_is_refused(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), "train.epochs=1"]
    assert cli_here(*args).returncode == 0
    r = cli_here(*args)
    assert r.returncode == 2 and "holds a finished run" in r.stderr and "--restart" in r.stderr
    # An unfinished run whose recipe changed: refused, naming the field.
    (run / "run.json").write_text('{"status": "running"}')
    r = cli_here("train", str(tiny_recipe), "-o", str(run), "train.epochs=1", "optimizer.lr=0.5")
    assert r.returncode == 2 and "optimizer.lr" in r.stderr and "--allow-changed" in r.stderr
    r = cli_here("train", str(tiny_recipe), "-o", str(run), "train.epochs=2", "--allow-changed")
    assert r.returncode == 0 and "resuming from" in r.stdout
    r = cli_here(*args, "--restart")
    assert r.returncode == 0 and "--restart" in r.stdout


def test_keep_last_k_plus_the_best(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    r = cli_here(
        "train",
        str(tiny_recipe),
        "-o",
        str(run),
        "train.epochs=6",
        "checkpoint.keep=1",
        "checkpoint.best.monitor=valid/accuracy",
        "optimizer.lr=0.3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    evals = events(run, "eval")
    best = max(evals, key=lambda e: (e["valid/accuracy"], -e["step"]))
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    expected = {f"step-{best['step']:06d}", f"step-{evals[-1]['step']:06d}"}
    assert set(kept) == expected
    assert all((run / "checkpoints" / k / "COMPLETE").is_file() for k in kept)
    assert run_info(run)["best_step"] == best["step"]
