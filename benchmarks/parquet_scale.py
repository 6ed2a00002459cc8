"""Lazy parquet at scale: peak memory flat in dataset size, time to first step, and training
throughput of `data.mode: lazy` against `memory` on the same rows.

    python benchmarks/parquet_scale.py                 # 0.5 GB and 5 GB shard directories
    python benchmarks/parquet_scale.py --quick         # 8 MB and 80 MB (a smoke test)
    python benchmarks/parquet_scale.py --sizes 0.5,5,10 --features 256 --steps 400

Each size is a directory of parquet shards (float32 features from a seeded generator, an int64
class column drawn from a linear teacher) that one recipe trains on (an MLP, batch 256, and
`data.num_workers` as it defaults: no worker for a table with 2 cores a process). Every run
is a fresh `dist-train train` process, stopped by a global optimizer-step hook after `--steps`
steps (no epoch of millions of rows needed to see the steady state); the harness samples /proc
of the training process and its DataLoader workers every 50 ms.

Reported per size:
- time to first step, cold (the Arrow cache is built: one pass over the parquet) and warm (the
  cache of an earlier run reused: nothing read but the metadata and the class column);
- peak RSS of the training process (VmHWM, which counts memory-mapped file pages it touched)
  and its peak anonymous memory (RssAnon: what the process itself holds; mapped file pages are
  page cache that the kernel drops under pressure), and the proportional anonymous memory of
  the whole tree with the workers (Pss_Anon: pages a worker shares copy-on-write with its
  parent count once);
- steady training throughput (samples/s between step `--steps // 4` and the last).
On the smallest size the same recipe also runs with `data.mode: memory` (its rows in the page
cache, as the lazy runs' are): the throughput ratio lazy / memory. The footprint the lazy runs
are compared with: a plain process that imports torch, builds the same model and optimizer and
takes one step (its VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 512
BATCH = 256

HOOK = """import json, os, sys, time, torch.optim.optimizer as o
mark, stop, warm = {mark!r}, {stop!r}, {warm!r}
marks, n = {{}}, [0]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def on_step(*a):
    n[0] += 1
    if n[0] in (1, warm, stop):
        marks[n[0]] = time.time()
    if n[0] == stop:
        open(mark, "w").write(json.dumps({{"marks": marks, "vmhwm_mib": hwm()}}))
        import multiprocessing
        for child in multiprocessing.active_children():  # the DataLoader workers
            child.kill()
        os._exit(0)
o.register_optimizer_step_post_hook(on_step)
from dist_train.cli import entry  # as `dist-train` runs it
sys.exit(entry())
"""

FOOTPRINT = """import torch
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(
    nn.Linear({f}, {h}), nn.ReLU(), nn.Linear({h}, {h}), nn.ReLU(), nn.Linear({h}, 10)
)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x, y = torch.randn({b}, {f}), torch.randint(0, 10, ({b},))
nn.functional.cross_entropy(net(x), y).backward()
opt.step()
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) / 1024)
"""


def make_shards(folder: Path, gib: float, features: int, shard_mib: int = 256) -> dict:
    """`gib` GiB of float32 feature rows (+ an int64 class) in parquet shards; reused when
    the folder is complete (a DONE file with the row count)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    row_bytes = features * 4 + 8
    rows = int(gib * 2**30 // row_bytes)
    per_shard = max(1, shard_mib * 2**20 // row_bytes)
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((features, 10)).astype(np.float32)
    names = [f"f{i}" for i in range(features)]
    t = time.perf_counter()
    for k, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        x = rng.standard_normal((n, features), dtype=np.float32)
        y = np.argmax(x @ teacher, axis=1).astype(np.int64)
        table = pa.table({**{c: x[:, i] for i, c in enumerate(names)}, "target": y})
        pq.write_table(
            table, folder / f"part-{k:05d}.parquet", row_group_size=65536, use_dictionary=False
        )  # random floats: a dictionary would only bloat the file (1.5x)
    size = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    info = {"rows": rows, "features": features, "bytes": size}
    done.write_text(json.dumps(info))
    print(f"  wrote {folder.name}: {rows:,} rows, {size / 2**30:.2f} GiB on disk "
          f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    return info


def recipe(folder: Path, features: int, mode: str) -> str:
    return (
        f"name: parquet-scale\nseed: 0\n"
        f"data: {{source: 'parquet:{folder}', target: target, task: multiclass, "
        f"num_classes: 10, valid_fraction: 0.001, mode: {mode}}}\n"
        f"model: {{layers: [{{linear: {HIDDEN}}}, relu, {{linear: {HIDDEN}}}, relu, "
        "{linear: out}]}\n"
        "loss: cross_entropy\noptimizer: {name: adamw, lr: 1.0e-3}\n"
        f"train: {{epochs: 1, batch_size: {BATCH}, log_every_steps: 100}}\n"
        "checkpoint: {every_epochs: 0}\n"
    )


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _pss_anon(pid: int) -> float:
    """Proportional anonymous memory (MiB): a forked worker's copy-on-write pages that it
    still shares with the training process count half to each, not twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class TreeSampler(threading.Thread):
    """Peaks of the training process's RssAnon and RssFile, and of the proportional anonymous
    memory (Pss_Anon) summed over it and its DataLoader workers, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.peak = {"anon_main": 0.0, "anon_tree": 0.0, "file_main": 0.0, "workers": 0}

    def run(self) -> None:
        while not self.done.is_set():
            main = _status(self.pid)
            kids = _children(self.pid)
            tree = _pss_anon(self.pid) + sum(_pss_anon(k) for k in kids)
            p = self.peak
            p["anon_main"] = max(p["anon_main"], main.get("RssAnon", 0))
            p["file_main"] = max(p["file_main"], main.get("RssFile", 0))
            p["anon_tree"] = max(p["anon_tree"], tree)
            p["workers"] = max(p["workers"], len(kids))
            self.done.wait(0.05)


def run_once(
    folder: Path, info: dict, mode: str, work: Path, steps: int, cold: bool, overrides=()
) -> dict:
    """One fresh `dist-train train` process on `folder`, stopped after `steps` steps."""
    cache = work / f"cache-{folder.name}"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    path = work / f"{folder.name}-{mode}.yaml"
    path.write_text(recipe(folder, info["features"], mode))
    mark = work / "mark.json"
    mark.unlink(missing_ok=True)
    warm = max(2, steps // 4)
    cmd = [
        sys.executable, "-c", HOOK.format(mark=str(mark), stop=steps, warm=warm),
        "train", str(path), f"data.cache_dir={cache}", "-o", str(work / "runs" / mode),
        "--restart", *overrides,
    ]  # fmt: skip
    env = os.environ | {"WANDB_MODE": "disabled"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0 or not mark.exists():
        raise RuntimeError(f"{mode} run on {folder} failed: {err.decode()[-3000:]}")
    rec = json.loads(mark.read_text())
    marks = {int(k): v for k, v in rec["marks"].items()}
    rate = (steps - warm) * BATCH / (marks[steps] - marks[warm])
    return {
        "mode": mode,
        "cold": cold,
        "first_step_s": marks[1] - t0,
        "samples_per_s": rate,
        "vmhwm_mib": rec["vmhwm_mib"],
        "peak_anon_main_mib": sampler.peak["anon_main"],
        "peak_anon_tree_mib": sampler.peak["anon_tree"],
        "peak_file_main_mib": sampler.peak["file_main"],
        "workers": sampler.peak["workers"],
    }


def footprint(features: int) -> float:
    code = FOOTPRINT.format(f=features, h=HIDDEN, b=BATCH)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 MB and 80 MB, 20 steps")
    ap.add_argument("--sizes", default="0.5,5", help="GiB per shard directory, comma-separated")
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="warm lazy/memory pairs per size")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "parquet_scale"))
    ap.add_argument("--out", default=None, help="JSON results (default: WORK/results.json)")
    args = ap.parse_args(argv)
    sizes = [0.0078125, 0.078125] if args.quick else [float(s) for s in args.sizes.split(",")]
    steps = 20 if args.quick else args.steps
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = footprint(args.features)
    print(f"model + optimizer footprint (plain process, one step): {base:.0f} MiB", flush=True)
    results = {"footprint_mib": base, "features": args.features, "batch": BATCH, "sizes": []}
    for gib in sizes:
        folder = work / f"shards-{gib:g}g-{args.features}f"
        info = make_shards(folder, gib, args.features)
        runs = [run_once(folder, info, "lazy", work, steps, cold=True)]
        for r in range(args.rounds):  # warm: the cache of the cold run, files in page cache
            order = ("lazy", "memory") if r % 2 == 0 else ("memory", "lazy")
            for mode in order:
                if mode == "memory" and gib != sizes[0]:
                    continue  # memory is the throughput reference on the smallest size only
                runs.append(run_once(folder, info, mode, work, steps, cold=False))
        lazy = [r for r in runs if r["mode"] == "lazy" and not r["cold"]]
        mem = [r for r in runs if r["mode"] == "memory"]
        cold = runs[0]
        entry = info | {
            "gib": gib,
            "runs": runs,
            "first_step_cold_s": cold["first_step_s"],
            "first_step_warm_s": statistics.median(r["first_step_s"] for r in lazy),
            # The cold run converts the shards (a row group in memory at a time); the warm
            # runs are what every later run of the recipe costs.
            "cold_vmhwm_mib": cold["vmhwm_mib"],
            "cold_anon_mib": cold["peak_anon_main_mib"],
            "vmhwm_mib": max(r["vmhwm_mib"] for r in lazy),
            "peak_anon_main_mib": max(r["peak_anon_main_mib"] for r in lazy),
            "peak_anon_tree_mib": max(r["peak_anon_tree_mib"] for r in lazy),
            "lazy_samples_per_s": statistics.median(r["samples_per_s"] for r in lazy),
        }
        if mem:
            entry["memory_samples_per_s"] = statistics.median(r["samples_per_s"] for r in mem)
            entry["lazy_over_memory"] = entry["lazy_samples_per_s"] / entry["memory_samples_per_s"]
        results["sizes"].append(entry)
        print(
            f"{gib:g} GiB ({info['rows']:,} rows x {args.features}): first step cold "
            f"{entry['first_step_cold_s']:.1f} s, warm {entry['first_step_warm_s']:.1f} s; "
            f"peak RSS warm {entry['vmhwm_mib']:.0f} MiB (anon {entry['peak_anon_main_mib']:.0f}, "
            f"tree with workers {entry['peak_anon_tree_mib']:.0f}), cold "
            f"{entry['cold_vmhwm_mib']:.0f} (anon {entry['cold_anon_mib']:.0f}); lazy "
            f"{entry['lazy_samples_per_s']:,.0f} samples/s"
            + (
                f", memory {entry['memory_samples_per_s']:,.0f} (ratio "
                f"{entry['lazy_over_memory']:.2f})"
                if mem
                else ""
            ),
            flush=True,
        )
    small, large = results["sizes"][0], results["sizes"][-1]
    results["rss_growth_mib"] = large["vmhwm_mib"] - small["vmhwm_mib"]
    results["cold_rss_growth_mib"] = large["cold_vmhwm_mib"] - small["cold_vmhwm_mib"]
    results["anon_growth_mib"] = large["peak_anon_main_mib"] - small["peak_anon_main_mib"]
    results["over_footprint_mib"] = large["peak_anon_main_mib"] - base
    print(
        f"growth {small['gib']:g} -> {large['gib']:g} GiB (warm runs): peak RSS "
        f"{results['rss_growth_mib']:+.0f} MiB, anonymous {results['anon_growth_mib']:+.0f} MiB "
        f"(first runs, converting: {results['cold_rss_growth_mib']:+.0f}) "
        f"(target < 100); largest run's anonymous peak {results['over_footprint_mib']:+.0f} MiB "
        f"over the footprint (target <= 300)"
    )
    out = Path(args.out) if args.out else work / "results.json"
    out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
