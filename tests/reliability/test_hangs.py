# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Hangs: a rank that dies or stalls must not freeze the others. The survivor exits 4 within
`train.collective_timeout_s` (+ slack) and says which rank stopped answering and during which
operation.

The two ranks are plain processes (MASTER_ADDR/RANK/WORLD_SIZE set by hand): torchrun would
kill the survivor itself as soon as one rank dies, hiding what we want to see.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from rel_helpers import Ranks, logged_steps, rel_data, rel_recipe  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TIMEOUT_S = 10  # the smallest train.collective_timeout_s the recipe accepts
SLACK_S = 15  # start-up of the report, process exit; generous for a loaded 2-core CI runner
PHASE = re.compile(
    r"during (gradient all-reduce \(backward\)|train-loss reduce|stop-request all-reduce|"
    r"checkpoint save|evaluation gather) at step (\d+)"
)


def _start(recipe, tmp_path, **extra_env: str) -> tuple[Ranks, object]:
    run = tmp_path / "run"
    # Long enough that it cannot finish before the fault (1000 steps, ~10+ s on 2 CPU ranks).
    args = [
        "train",
        str(recipe),
        "-o",
        str(run),
        "train.epochs=50",
        f"train.collective_timeout_s={TIMEOUT_S}",
        "checkpoint.every_steps=10",
    ]
    ranks = Ranks(args, tmp_path / "logs", **extra_env)
    deadline = time.monotonic() + 120
    while (
        not extra_env and logged_steps(run) < 25
    ):  # mid-training: some heartbeats (every 10 steps) recorded
        assert time.monotonic() < deadline, "training did not start:\n" + ranks.err(0)
        assert all(p.poll() is None for p in ranks.procs), ranks.err(0) + ranks.err(1)
        time.sleep(0.02)
    return ranks, run


def _assert_report(text: str, dead: int) -> None:
    assert "error: rank " in text and "lost the other ranks during" in text, text
    assert PHASE.search(text), text
    assert re.search(rf"rank {dead} last seen at step \d+, \d+ s ago", text), text
    assert f"train.collective_timeout_s={TIMEOUT_S}" in text
    assert "last complete checkpoint" in text
    assert "Traceback" not in text, text


@pytest.mark.timeout(240)
def test_killed_rank_makes_the_survivor_exit_with_a_report(rel_recipe, tmp_path):
    # Rank 1 SIGKILLs itself inside the save of step 30, after writing its files: rank 0 is
    # then waiting for it in the save's all-reduce (no race with a kill from outside).
    fault = {"DIST_TRAIN_FAULT": "after-weights@30", "DIST_TRAIN_FAULT_RANK": "1"}
    ranks, run = _start(rel_recipe, tmp_path, **fault)
    try:
        died, t0 = ranks.wait(1, 60)
        assert died == -9, ranks.err(1)
        code, ended = ranks.wait(0, TIMEOUT_S + SLACK_S)
        assert code is not None, f"rank 0 still running {TIMEOUT_S + SLACK_S} s after rank 1 died"
        assert code == 4, ranks.err(0)
        assert ended - t0 < TIMEOUT_S + SLACK_S
        _assert_report(ranks.err(0), dead=1)
        assert "during checkpoint save at step 30" in ranks.err(0)
        # The survivor left the run resumable: its checkpoints are all complete.
        assert all((p / "COMPLETE").is_file() for p in (run / "checkpoints").glob("step-*"))
    finally:
        ranks.kill_all()


@pytest.mark.timeout(240)
def test_stalled_rank_makes_the_survivor_time_out_with_a_report(rel_recipe, tmp_path):
    ranks, _ = _start(rel_recipe, tmp_path)
    try:
        os.kill(ranks.procs[1].pid, signal.SIGSTOP)  # alive, holding its sockets, silent
        t0 = time.monotonic()
        code, ended = ranks.wait(0, TIMEOUT_S + SLACK_S)
        waited = ended - t0
        assert code is not None, f"rank 0 still waiting {TIMEOUT_S + SLACK_S} s after the stall"
        assert code == 4, ranks.err(0)
        # It waited for the timeout (a stall is not an error by itself), then gave up.
        assert TIMEOUT_S - 1 <= waited < TIMEOUT_S + SLACK_S, waited
        _assert_report(ranks.err(0), dead=1)
    finally:
        ranks.kill_all()  # SIGCONT + SIGKILL the stopped rank
