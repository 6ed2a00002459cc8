# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Load: many short trainings in ONE process through the Python API, with no leaked file
handles, threads or growing memory (a bounded stand-in for a multi-hour soak).

Bounds, measured after a warm-up of WARMUP runs (imports, allocator pools, torch's lazy init):
- open file descriptors and threads: back to the warm-up count +-2 (each run opens
  metrics.jsonl, checkpoint files, the export; a leak of one per run would show as +RUNS);
- RSS growth < max(10 MiB, 0.2 MiB per run): a leak of one model/optimizer/loader per run
  (~0.5 MiB here with the datasets tables) exceeds it at any run count, while allocator noise
  stays far below (observed: < 5 MiB).

CI runs RUNS=60 (DIST_TRAIN_STRESS_RUNS=300 for a longer local soak).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import threading
import time

import pytest
import yaml
from rel_helpers import rel_data, rel_recipe  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

RUNS = int(os.environ.get("DIST_TRAIN_STRESS_RUNS", "60"))  # ~0.2 s each on one quiet core
WARMUP = 10


def _usage(proc) -> tuple[float, int, int]:
    gc.collect()
    return proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads()


def test_many_trainings_in_one_process_leak_nothing(rel_recipe, tmp_path, monkeypatch):
    import psutil

    from dist_train import load_recipe, train

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
    for i in range(WARMUP + RUNS):
        if i == WARMUP:
            base = _usage(proc)
            base_threads = {t.name for t in threading.enumerate()}
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(recipe, str(tmp_path / "runs" / f"{i:03d}"))
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
    bound = max(10.0, 0.2 * (done - WARMUP))
    assert rss - base[0] < bound, f"RSS grew {rss - base[0]:.0f} MiB over {done - WARMUP} runs"


def _short(rel_recipe, tmp_path):
    raw = yaml.safe_load(rel_recipe.read_text())
    raw["train"].update(epochs=1, batch_size=240, threads=1)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_api_train_twice_in_one_process_gives_the_same_weights(rel_recipe, tmp_path, monkeypatch):
    """Nothing of the first call (RNG, accelerator state, caches) leaks into the second."""
    from rel_helpers import bitwise_equal, weights

    import dist_train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = _short(rel_recipe, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        a = dist_train.train(str(path), str(tmp_path / "a"))
        b = dist_train.train(str(path), str(tmp_path / "b"))
    assert a["valid/rows"] == b["valid/rows"] == 97
    assert bitwise_equal(
        weights(tmp_path / "a" / "model.safetensors"), weights(tmp_path / "b" / "model.safetensors")
    )


def test_api_train_twice_with_another_precision(rel_recipe, tmp_path, monkeypatch):
    """The second call really runs in bf16 (the first call's accelerator is not reused)."""
    from rel_helpers import max_diff, weights

    from dist_train import load_recipe, train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    path = _short(rel_recipe, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        a = train(load_recipe(str(path)), str(tmp_path / "a"))
        b = train(load_recipe(str(path), ["train.mixed_precision=bf16"]), str(tmp_path / "b"))
    assert a["valid/rows"] == b["valid/rows"] == 97
    fp32, bf16 = (
        weights(tmp_path / "a" / "model.safetensors"),
        weights(tmp_path / "b" / "model.safetensors"),
    )
    assert all(v.dtype == __import__("torch").float32 for v in bf16.values())  # fp32 master
    # bf16 matmuls round to 8 bits of mantissa: the weights move, but stay close
    assert 0 < max_diff(fp32, bf16) < 0.05
