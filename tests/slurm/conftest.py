"""Fixtures for the SLURM tests: a real one-node cluster (tests/slurm/cluster.sh) and job helpers.

`slurm_cluster` brings the cluster up once per session. Set DIST_TRAIN_NO_SLURM=1 to
skip the tests marked `slurm`; otherwise a cluster that cannot come up is an ERROR,
so a broken install is never mistaken for a pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/procs.py: real processes, no mocks
CLUSTER_SH = HERE / "cluster.sh"
from slurm_states import FINAL_STATES  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: needs the local SLURM cluster (tests/slurm/cluster.sh)"
    )


def _cluster_running() -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Start the local cluster (installing SLURM on first use); stop it afterwards if we started it.

    Yields the node name. Runs as root only (apt-get, munge key, /etc/slurm).
    """
    if os.environ.get("DIST_TRAIN_NO_SLURM") == "1":
        pytest.skip("DIST_TRAIN_NO_SLURM=1: SLURM tests skipped on request")
    from procs import forbid_in_fast_loop

    forbid_in_fast_loop("the SLURM cluster (installed and started on first use)")
    was_running = _cluster_running()
    proc = subprocess.run(
        ["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(
            f"tests/slurm/cluster.sh up failed (exit {proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    node = subprocess.run(
        ["hostname", "-s"], capture_output=True, text=True, check=True
    ).stdout.strip()
    yield node
    if not was_running:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], capture_output=True, timeout=120)


class SlurmJobs:
    """Helpers for submitting and watching jobs (a fixture, so test files need no imports)."""

    @staticmethod
    def fields(job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once SLURM has forgotten the job)."""
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return {}
        first = proc.stdout.splitlines()[0]
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", first))

    def wait(self, job_id: str, timeout_s: float = 120.0) -> dict[str, str]:
        """Poll until the job reaches a final state; fail the test after timeout_s."""
        deadline = time.monotonic() + timeout_s
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.fields(job_id)
            if fields.get("JobState") in FINAL_STATES:
                return fields
            time.sleep(0.3)
        pytest.fail(
            f"job {job_id} not finished after {timeout_s:.0f}s; "
            f"last state: {fields.get('JobState')}"
        )

    @staticmethod
    def sbatch(*args: str) -> str:
        """Submit and return the job id (fails the test with sbatch's message)."""
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]


@pytest.fixture
def slurm_jobs(slurm_cluster: str) -> SlurmJobs:
    """Job helpers; depends on slurm_cluster so the cluster is up."""
    return SlurmJobs()
