"""`dist-train sweep --slurm` on the real local SLURM: one job array, one task per trial, at most
`--max-concurrent` at once; every trial trains into its trial-NNN directory; a re-run submits
only what is unfinished (here: nothing)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import ROOT, env
from slurm_states import FINAL_STATES

pytestmark = pytest.mark.slurm

WINE_SWEEP = str(ROOT / "recipes" / "wine_sweep.yaml")


def sweep_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dist_train", "sweep", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)


def array_states(job: str) -> dict[str, str]:
    """{ArrayTaskId: JobState} for every task SLURM still lists."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    out = {}
    for line in proc.stdout.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        out[fields.get("ArrayTaskId", "?")] = fields.get("JobState", "?")
    return out


def wait_array(job: str, tasks: int, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = array_states(job)
        if len(states) == tasks and set(states.values()) <= FINAL_STATES:
            return states
        time.sleep(0.5)
    pytest.fail(f"job array {job} not finished after {timeout_s:.0f}s: {array_states(job)}")


def test_sweep_job_array_trains_every_trial(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = [WINE_SWEEP, "train.epochs=2", "sweep.trials=3", "-o", str(out)]
    r = sweep_cli(*args, "--slurm", "--max-concurrent", "2", "--time", "00:05:00",
                  "--grace", "30")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"submitted job array (\d+)", r.stdout).group(1)
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script
    states = wait_array(job, 3, timeout_s=240)
    logs = "\n".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert set(states.values()) == {"COMPLETED"}, (states, logs[-3000:])
    plan = json.loads((out / "sweep.json").read_text())
    for entry in plan["trials"]:
        info = json.loads((out / entry["trial"] / "run.json").read_text())
        assert info["status"] == "finished" and info["recipe_hash"] == entry["recipe_hash"]
    assert sorted(p.name for p in out.glob("slurm-*_*.out")) == [
        f"slurm-{job}_{i}.out" for i in range(3)
    ]
    r = sweep_cli("--collect", "-o", str(out))
    assert r.returncode == 0 and "3/3 trials finished" in r.stdout, r.stdout + r.stderr
    assert (out / "best.yaml").is_file()
    # the same command again: all finished, nothing queued
    r = sweep_cli(*args, "--slurm", "--max-concurrent", "2", "--time", "00:05:00",
                  "--grace", "30")  # fmt: skip
    assert r.returncode == 0 and "nothing to submit" in r.stdout, r.stdout + r.stderr
