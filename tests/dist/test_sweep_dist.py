"""Real sweeps (issue 6): `--parallel 2` runs two 2-process torchrun trials at once without port
clashes; a killed sweep resumes without redoing finished trials; the same seed gives byte-equal
trial recipes; every trial trains exactly the recipe the driver hashed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import events, run_info
from procs import ROOT, env, run_until_then_kill

from dist_train.config.recipe import load_recipe, recipe_hash
from dist_train.run.checkpoint import latest_complete

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WINE_SWEEP = str(ROOT / "recipes" / "wine_sweep.yaml")


def sweep_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_train", "sweep", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def launches(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "launches.jsonl").read_text().splitlines()]


def interval(trial: Path) -> tuple[float, float]:
    start, end = launches(trial)
    return start["time"], end["time"]


def test_parallel_sweep_two_concurrent_2process_trials(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [WINE_SWEEP, "train.epochs=2", "sweep.trials=3", "-o", str(out)]
    r = sweep_cli(*args, "--parallel", "2", "--nproc", "2", "--launcher", "torchrun")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = json.loads((out / "sweep.json").read_text())
    assert [t["trial"] for t in plan["trials"]] == ["trial-000", "trial-001", "trial-002"]
    for entry in plan["trials"]:
        trial = out / entry["trial"]
        info = run_info(trial)
        assert (info["status"], info["world_size"]) == ("finished", 2), info
        # every rank read this one file; the trainer's hash is the driver's hash
        assert info["recipe_hash"] == entry["recipe_hash"]
        assert info["rank_recipe_hashes"] == [entry["recipe_hash"]] * 2  # logged by each rank
        assert recipe_hash(load_recipe(trial / "recipe.yaml")) == entry["recipe_hash"]
        assert load_recipe(trial / "recipe.yaml").optimizer.lr == entry["values"]["optimizer.lr"]
    # trial-000 and trial-001 ran at the same time, on different rendezvous ports
    (a0, a1), (b0, b1) = interval(out / "trial-000"), interval(out / "trial-001")
    assert a0 < b1 and b0 < a1, ((a0, a1), (b0, b1))
    ports = {launches(out / t)[0]["port"] for t in ("trial-000", "trial-001")}
    assert len(ports) == 2
    # ... and trained at the same time (run.json has whole seconds: overlap allows equality)
    s0, e0, s1, e1 = (run_info(out / t)[k] for t in ("trial-000", "trial-001")
                      for k in ("start_time", "end_time"))  # fmt: skip
    assert s0 <= e1 and s1 <= e0, (s0, e0, s1, e1)
    # results: one row per trial, leaderboard printed best first, best.yaml from the best trial
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and all(row.endswith(",finished") for row in rows[1:])
    assert "3/3 trials finished; valid/accuracy (higher is better)" in r.stdout
    best = r.stdout.split("best: ")[1].split()[0]
    assert load_recipe(out / "best.yaml").name == f"wine-sweep-{best}"


def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", WINE_SWEEP, "train.epochs=6", "sweep.trials=2", "-o", str(out)]
    first, second = out / "trial-000", out / "trial-001"

    def first_done_second_checkpointed() -> bool:
        done = (first / "run.json").is_file() and run_info(first)["status"] == "finished"
        return done and latest_complete(second, notice=lambda _: None) is not None

    # kill_tree: the driver AND the running trial (its own session), as a crash would
    assert run_until_then_kill(args, first_done_second_checkpointed, timeout=300)
    assert run_info(second)["status"] == "running"
    kept = {f: (first / f).stat().st_mtime_ns for f in ("run.json", "model.safetensors")}
    r = sweep_cli(*args[1:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming the sweep" in r.stdout and "skipping 1 finished trial(s)" in r.stdout
    assert {f: (first / f).stat().st_mtime_ns for f in kept} == kept  # not retrained
    assert len([e for e in launches(first) if e["event"] == "start"]) == 1
    assert run_info(second)["status"] == "finished"
    resumed = events(second, "resume")
    assert resumed and resumed[0]["step"] > 0  # continued from its checkpoint, not from zero
    # a changed sweep is refused, naming what changed
    r = sweep_cli(*args[1:], "sweep.seed=5")
    assert r.returncode == 2 and "holds a different sweep" in r.stderr, r.stderr


def test_same_seed_gives_byte_equal_trial_recipes(tmp_path: Path) -> None:
    """Two driver processes (hash randomisation differs) plan the same trials; no training:
    `--slurm --dry-run` only writes the plan and the job script."""
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for d, seed in zip(dirs, ("0", "0", "1"), strict=True):
        r = sweep_cli(WINE_SWEEP, f"sweep.seed={seed}", "-o", str(d), "--slurm", "--dry-run")
        assert r.returncode == 0, r.stderr
    a, b, c = ([(d / f"trial-{i:03d}" / "recipe.yaml").read_text() for i in range(10)]
               for d in dirs)  # fmt: skip
    assert a == b and a != c
    assert len(set(a)) == 10
