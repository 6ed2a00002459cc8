"""The real trainer under the real local SLURM, submitted by `dist-train submit`.

(a) a 2-process CPU job trains (world size 2) and completes; (b) a preemption notice
(USR1 to the batch shell, exactly what `--signal=B:USR1@GRACE` sends) mid-training leads
to a synchronized save, a requeue and a resume into the same run directory, and the final
weights are bitwise equal to an uninterrupted 2-process run; (c) a recipe that fails at
run time exits with an error and is NOT requeued; (d) the real thing: a job with
`--time 00:02:00` gets SLURM's own warning signal, saves, requeues and resumes until it
COMPLETES, with the same final weights (slow: slurmctld checks time limits every 30 s).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from procs import ROOT, bitwise_equal, cli, env, weights

pytestmark = pytest.mark.slurm

WINE = str(ROOT / "recipes" / "wine_mlp.yaml")


def submit(*args: str, **extra_env: str) -> str:
    """`dist-train submit ...` as a user runs it; returns the job id it prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train", "submit", *args],
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    assert "tail -f" in proc.stdout
    return m.group(1)


def events(run_dir: Path, kind: str) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [e for e in rows if e["event"] == kind]


def wait_for(condition, timeout_s: float, what: str, job: str, slurm_jobs) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        fields = slurm_jobs.fields(job)
        assert time.monotonic() < deadline, f"{what} not seen after {timeout_s}s: {fields}"
        assert fields.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), fields
        time.sleep(0.1)


def test_submitted_cpu_job_trains_with_world_size_2(slurm_jobs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = submit(WINE, "train.epochs=2", "--processes", "2", "-o", str(run_dir),
                 "--time", "00:05:00", "--grace", "30")  # fmt: skip
    fields = slurm_jobs.wait(job, timeout_s=150)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["Restarts"] == "0", log
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["world_size"], info["status"]) == (2, "finished"), info
    assert (run_dir / "model.safetensors").is_file()
    assert "#SBATCH --signal=B:USR1@30" in (run_dir / "job.sbatch").read_text()


def test_preempted_job_saves_requeues_resumes_and_matches_uninterrupted(
    slurm_jobs, tmp_path: Path
) -> None:
    overrides = ["train.epochs=80", "checkpoint.every_steps=20", "train.eval_every_epochs=20"]
    run_dir = tmp_path / "run"
    job = submit(WINE, *overrides, "--processes", "2", "-o", str(run_dir),
                 "--time", "00:10:00", "--grace", "60",
                 DIST_TRAIN_REQUEUE_START_NOW="1")  # fmt: skip
    ckpts = run_dir / "checkpoints"
    wait_for(lambda: any(ckpts.glob("step-*/COMPLETE")), 120, "a checkpoint", job, slurm_jobs)
    # The preemption notice, as --signal=B:USR1@GRACE delivers it: to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    fields = slurm_jobs.wait(job, timeout_s=150)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["Restarts"] == "1", log
    assert "requeueing" in log and "resuming from" in log, log
    total = 80 * (142 // 16)
    [resume] = events(run_dir, "resume")
    assert 0 < resume["step"] < total, resume
    assert resume["world_size"] == 2
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"

    ref = tmp_path / "reference"
    proc = cli("train", WINE, "-o", str(ref), *overrides, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(run_dir / "model.safetensors"), weights(ref / "model.safetensors")
    assert bitwise_equal(a, b), "resumed run's final weights differ from the uninterrupted run"


def test_failing_recipe_is_not_requeued(slurm_jobs, tmp_path: Path) -> None:
    """Valid at submit time, fails in the job (missing data file): error exit, no requeue."""
    run_dir = tmp_path / "run"
    job = submit(WINE, "data.source=csv:/nonexistent/wine.csv", "--processes", "2",
                 "-o", str(run_dir), "--time", "00:05:00", "--grace", "30",
                 DIST_TRAIN_REQUEUE_START_NOW="1")  # fmt: skip
    fields = slurm_jobs.wait(job, timeout_s=120)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert fields["JobState"] == "FAILED", log
    assert fields["Restarts"] == "0", log
    assert fields["ExitCode"] != "0:0", fields
    assert "error: data.source" in log and "trainer exited with" in log, log
    assert "requeueing" not in log
    assert not list(run_dir.glob(".requeue-*"))


def _glue_times(log: str) -> list[tuple[str, float]]:
    """(what, seconds since that run's start) for each run start and forwarded signal."""
    out, start = [], None
    for hms, text in re.findall(r"\[dist_train/slurm (\d\d:\d\d:\d\d)\] (.*)", log):
        at = datetime.strptime(hms, "%H:%M:%S")
        if text.startswith("job "):
            start = at
            out.append((text.split(":")[1].strip().split(",")[0], 0.0))  # "restart K"
        elif start is not None and text.startswith("got SIG"):
            out.append((text.split(":")[0][4:], (at - start).total_seconds()))
    return out


# Training time the time-limit test asks for, measured on this machine when the test runs:
# more than the 1-minute limit leaves after start-up, so the job cannot finish before SLURM's
# warning (a fixed epoch count finishes in the first run on an idle machine and takes many
# minutes on a loaded one: the 2-process speed varied 60-120 steps/s here).
TIME_LIMIT_LOOP_S = 60


def _steps_per_s(run_dir: Path) -> float:
    """2-process training speed of the wine recipe now (a short run, start-up excluded)."""
    proc = cli("train", WINE, "-o", str(run_dir), "train.epochs=40", "train.eval_every_epochs=40",
               nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = events(run_dir, "train")
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["time"] - rows[0]["time"])


def _time_limited_job(slurm_jobs, run_dir: Path, overrides: list[str]) -> tuple[str, dict, str]:
    job = submit(WINE, *overrides, "--processes", "2", "-o", str(run_dir),
                 "--time", "00:02:00", "--grace", "61",
                 DIST_TRAIN_REQUEUE_START_NOW="1")  # fmt: skip
    assert "#SBATCH --signal=B:USR1@61" in (run_dir / "job.sbatch").read_text()
    fields = slurm_jobs.wait(job, timeout_s=480)
    return job, fields, (run_dir / f"slurm-{job}.out").read_text()


@pytest.mark.slow
def test_time_limit_warning_saves_requeues_resumes_and_matches_uninterrupted(
    slurm_jobs, tmp_path: Path
) -> None:
    """`--time 00:02:00 --grace 61` on a run whose training loop alone needs ~60 s here.
    slurmctld sends the warning at its first 30-s check with <= GRACE + 30 s left, so USR1
    comes 29-59 s after each run's start (after the ~10-20 s start-up) and the time limit
    61-91 s after USR1: room for a start-up slowed by a loaded machine (`make test` runs
    another worker beside this one) to finish and save. Every run that cannot finish in time
    is warned, saves, requeues (started at once) and resumes, until one completes. The final
    weights equal an uninterrupted 2-process run bit for bit."""
    t0 = time.monotonic()
    rate = _steps_per_s(tmp_path / "calibrate")
    epochs = max(100, math.ceil(TIME_LIMIT_LOOP_S * rate / (142 // 16)))
    for attempt in (1, 2):
        overrides = [f"train.epochs={epochs}", f"train.eval_every_epochs={epochs}"]
        run_dir = tmp_path / f"run{attempt}"
        t1 = time.monotonic()
        job, fields, log = _time_limited_job(slurm_jobs, run_dir, overrides)
        print(f"{rate:.0f} steps/s -> train.epochs={epochs}; calibration {t1 - t0:.0f} s, "
              f"job {job} {time.monotonic() - t1:.0f} s; runs and signals (s since the run's "
              f"start): {_glue_times(log)}")  # fmt: skip
        if fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0" and attempt == 1:
            # Precondition, not the behaviour under test: the machine sped up after the
            # calibration and the run finished before the warning. Once more, twice as long.
            epochs *= 2
            continue
        break
    assert fields["JobState"] == "COMPLETED", log
    assert int(fields["Restarts"]) >= 1, log
    assert "TIME LIMIT" not in log and "TIMEOUT" not in log, log
    assert "got SIGUSR1: forwarding" in log and "got SIGTERM" not in log, log
    assert "requeueing" in log and "resuming from" in log, log
    resumes = events(run_dir, "resume")
    assert len(resumes) == int(fields["Restarts"]), resumes
    total = epochs * (142 // 16)
    assert all(0 < r["step"] < total and r["world_size"] == 2 for r in resumes), resumes
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"

    ref = tmp_path / "reference"
    proc = cli("train", WINE, "-o", str(ref), *overrides, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"total {time.monotonic() - t0:.0f} s")
    a, b = weights(run_dir / "model.safetensors"), weights(ref / "model.safetensors")
    assert bitwise_equal(a, b), "resumed run's final weights differ from the uninterrupted run"
