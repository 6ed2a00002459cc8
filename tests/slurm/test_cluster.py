"""Jobs on the real local SLURM cluster (tests/slurm/cluster.sh): submission and the
preemption/requeue contract of the rendered job scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train.launch import slurm

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slurm


def test_trivial_batch_job_completes(slurm_cluster: str, slurm_jobs, tmp_path: Path) -> None:
    out = tmp_path / "job-%j.out"
    job = slurm_jobs.sbatch(
        f"--output={out}",
        "--time=00:02:00",
        f'--wrap={sys.executable} -c \'import os; print("job", os.environ["SLURM_JOB_ID"])\'',
    )
    fields = slurm_jobs.wait(job, timeout_s=60)
    assert fields["JobState"] == "COMPLETED", fields
    assert fields["NodeList"] == slurm_cluster
    assert (tmp_path / f"job-{job}.out").read_text().strip() == f"job {job}"


def test_preempted_cpu_job_is_requeued_and_resumes(slurm_jobs, tmp_path: Path) -> None:
    """cpu.sbatch with 2 ranks: a preemption notice (USR1 to the batch shell, as
    --signal=B:USR1@GRACE sends) reaches both ranks; they "checkpoint" and exit 75; the
    script requeues; the second run (SLURM_RESTART_COUNT=1) resumes and completes."""
    run_dir = tmp_path / "run"
    text = slurm.render_sbatch(
        "cpu",
        job_name="preempt",
        run_dir=run_dir,
        recipe_path="r.yaml",
        num_processes=2,
        time="00:05:00",
        grace_s=60,
        python=sys.executable,
        module="fake_trainer",
        env={"PYTHONPATH": str(HERE), "DIST_TRAIN_REQUEUE_START_NOW": "1"},
    )
    job = slurm.submit(text, run_dir)
    ranks = run_dir / "ranks.jsonl"
    deadline = time.monotonic() + 60
    while not (ranks.exists() and len(ranks.read_text().splitlines()) == 2):
        assert time.monotonic() < deadline, f"ranks did not start: {slurm_jobs.fields(job)}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    fields = slurm_jobs.wait(job, timeout_s=90)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED", log
    assert fields["Restarts"] == "1", log
    rows = [json.loads(s) for s in ranks.read_text().splitlines()]
    assert sorted((r["restart"], r["rank"], r["world"], r["resumed"]) for r in rows) == [
        (0, 0, 2, False),
        (0, 1, 2, False),
        (1, 0, 2, True),
        (1, 1, 2, True),
    ]
    assert "requeueing" in log and (run_dir / "job.sbatch").exists()
