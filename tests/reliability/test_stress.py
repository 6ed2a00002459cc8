# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Load: many short trainings in ONE process through the Python API, with no leaked file
handles, threads or growing memory (a bounded stand-in for a multi-hour soak).

Bounds, measured after a warm-up of WARMUP runs (imports, allocator pools, torch's lazy init):
- open file descriptors and threads: back to the warm-up count +-2 (each run opens
  metrics.jsonl, checkpoint files, the export; a leak of one per run would show as +RUNS);
- RSS growth < 50 MiB over RUNS runs: a leak of one model/optimizer/loader per run (~0.5 MiB
  here with the datasets tables) would exceed it well before the end, while allocator noise
  stays far below (observed: < 5 MiB).
"""

from __future__ import annotations

import contextlib
import gc
import io
import threading
import time

import pytest
import yaml
from rel_helpers import rel_data, rel_recipe  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

RUNS = 300  # at most; ~0.2 s each on one quiet core
BUDGET_S = 60  # stop earlier on a slow machine, but only after MIN_RUNS
MIN_RUNS = 100
WARMUP = 10


def _api_train():
    """The train function behind `dist_train.train` (which another test in this process may
    already have replaced by the submodule: see test_api_train_survives_a_call)."""
    import importlib

    return importlib.import_module("dist_train.training.trainer").train


def _usage(proc) -> tuple[float, int, int]:
    gc.collect()
    return proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads()


def test_many_trainings_in_one_process_leak_nothing(rel_recipe, tmp_path, monkeypatch):
    import psutil

    from dist_train import load_recipe

    api_train = _api_train()

    monkeypatch.setenv("WANDB_MODE", "disabled")
    raw = yaml.safe_load(rel_recipe.read_text())
    raw["train"].update(epochs=1, batch_size=48, log_every_steps=5, threads=1)  # 10 steps
    raw["checkpoint"] = {"every_epochs": 1, "keep": 1}
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(str(path))
    proc = psutil.Process()
    threads_before = __import__("torch").get_num_threads()
    t0 = time.monotonic()
    done = 0
    for i in range(RUNS):
        if i >= MIN_RUNS and time.monotonic() - t0 > BUDGET_S:
            break
        if i == WARMUP:
            base = _usage(proc)
            base_threads = {t.name for t in threading.enumerate()}
        with contextlib.redirect_stdout(io.StringIO()):
            result = api_train(recipe, str(tmp_path / "runs" / f"{i:03d}"))
        assert result["valid/rows"] == 97
        done += 1
    __import__("torch").set_num_threads(threads_before)
    rss, fds, threads = _usage(proc)
    elapsed = time.monotonic() - t0
    print(
        f"\n  {done} trainings in {elapsed:.0f} s; after warm-up: RSS {base[0]:.0f} -> "
        f"{rss:.0f} MiB, fds {base[1]} -> {fds}, threads {base[2]} -> {threads}"
    )
    assert abs(fds - base[1]) <= 2, f"file descriptors {base[1]} -> {fds}"
    assert abs(threads - base[2]) <= 2, (
        f"threads {base[2]} -> {threads}: "
        f"{sorted({t.name for t in threading.enumerate()} - base_threads)}"
    )
    assert rss - base[0] < 50, f"RSS grew {rss - base[0]:.0f} MiB over {done - WARMUP} runs"


def test_api_train_survives_a_call(rel_recipe, tmp_path, monkeypatch):
    import dist_train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    raw = yaml.safe_load(rel_recipe.read_text())
    raw["train"].update(epochs=1, batch_size=240)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    with contextlib.redirect_stdout(io.StringIO()):
        dist_train.train(str(path), str(tmp_path / "a"))
        dist_train.train(str(path), str(tmp_path / "b"))


def test_api_train_twice_with_another_precision(rel_recipe, tmp_path, monkeypatch):
    from dist_train import load_recipe

    api_train = _api_train()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    raw = yaml.safe_load(rel_recipe.read_text())
    raw["train"].update(epochs=1, batch_size=240)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    with contextlib.redirect_stdout(io.StringIO()):
        api_train(load_recipe(str(path)), str(tmp_path / "a"))
        api_train(load_recipe(str(path), ["train.mixed_precision=bf16"]), str(tmp_path / "b"))
