"""Shared pieces of the multi-process tests (a plain module: `conftest` is ambiguous to import
once several test folders' conftest files are loaded in one session)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from procs import ROOT, env, kill_tree

RECIPE = {
    "name": "tiny",
    "seed": 3,
    "data": {
        "source": None,
        "valid_source": None,
        "target": "label",
        "task": "multiclass",
        "standardize": True,
    },
    "model": {"layers": [{"linear": 32}, "relu", {"linear": 16}, "tanh", {"linear": "out"}]},
    "loss": "cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "scheduler": {"name": "cosine", "warmup_steps": 5},
    "train": {"epochs": 3, "batch_size": 24, "log_every_steps": 1},
    "metrics": ["accuracy", "f1", "auroc", "precision", "recall", "confusion_matrix"],
    "checkpoint": {"every_epochs": 1, "keep": 3},
}


def make_table(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    cols = {f"f{i}": x[:, i] for i in range(6)} | {"label": label}
    header = ",".join(cols)
    lines = [
        ",".join(f"{cols[c][r]:.6f}" if c != "label" else str(cols[c][r]) for c in cols)
        for r in range(rows)
    ]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def make_multilabel_table(path: Path, rows: int, seed: int) -> None:
    """The same 6 features with three 0/1 label columns a, b, c (c is the hard one)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6))
    labels = {"a": x[:, 0] > 0, "b": x[:, 1] + x[:, 2] > 0.5, "c": x[:, 3] * x[:, 4] > 0}
    header = ",".join([*(f"f{i}" for i in range(6)), *labels])
    lines = [
        ",".join([*(f"{v:.6f}" for v in x[r]), *(str(int(labels[k][r])) for k in labels)])
        for r in range(rows)
    ]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")


def audit_rows(run_dir: Path) -> dict[int, list[int]]:
    """DIST_TRAIN_AUDIT_SAMPLES logs -> the rows each optimizer step trained on (all ranks)."""
    rows: dict[int, list[int]] = {}
    for log in sorted((run_dir / "samples").glob("rank-*.log")):
        for line in log.read_text().splitlines():
            _epoch, step, ids = line.split()
            rows.setdefault(int(step), []).extend(int(i) for i in ids.split(","))
    return {step: sorted(ids) for step, ids in rows.items()}


def logged_step(run: Path, step: int):
    def reached() -> bool:
        path = run / "metrics.jsonl"
        return path.exists() and f'"step": {step},' in path.read_text()

    return reached


def preempt(args: list[str], run: Path, nproc: int, at_step: int) -> None:
    """SIGTERM every rank once `at_step` is logged: a clean, synchronized stop (exit 75)."""
    from procs import LAUNCHER_ENV, Ranks, free_port

    reached = logged_step(run, at_step)
    if os.environ.get(LAUNCHER_ENV, "fork") == "fork":  # ranks forked from this process
        ranks = Ranks(args, nproc, DIST_TRAIN_AUDIT_SAMPLES="1")
        try:
            deadline = time.monotonic() + 120
            while not reached() and not ranks.poll() and time.monotonic() < deadline:
                time.sleep(0.01)
            ranks.signal(signal.SIGTERM)
            ranks.wait(120)
            out = ranks.stdout() + ranks.stderr()
        finally:
            shutil.rmtree(ranks.logs, ignore_errors=True)
        assert "stopped by a signal" in out, out[-3000:]
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "dist_train",
        *args,
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "dist_train", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(DIST_TRAIN_AUDIT_SAMPLES="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stopped by a signal" in out, out[-3000:]
