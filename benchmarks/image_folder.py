"""Image folder throughput: dist_train's lazy image path against a hand-written PyTorch loop.

    .venv/bin/python benchmarks/image_folder.py              # 20,000 64x64 JPEGs, 1 epoch each
    .venv/bin/python benchmarks/image_folder.py --quick      # 320 32x32 JPEGs: a smoke test

Both sides train the same CNN on the same JPEG folder with the same number W of DataLoader
workers, batch size and resolution, one epoch each, in one process:

- reference: `DataLoader(dataset, batch_size, shuffle, num_workers=W, persistent_workers)`
  whose dataset decodes one file per item with Pillow (open, JPEG draft, convert, resize) into
  a uint8 CHW tensor, default collate, then `x.float() / 255` and the training step;
- dist_train: `dist_train.train` on a recipe with `data.mode: lazy` and `data.num_workers: W`.

`--rounds N` repeats the pair with the order alternating and reports medians. Images/s are
steady-state: samples over the time of every log interval after the first (the
first holds worker start-up and the first prefetch), as the trainer's own `samples_per_s`
reports them. Also measured: the single-core decode limit (files decoded per second by one
process, no model) and images/s per worker. The folder is built once (digits from
scikit-learn, upscaled, tinted and noised, so each JPEG is a distinct picture) into
`--work` (default benchmarks/results/image_folder, git-ignored) and reused.
Results: printed, and written as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def sizes(quick: bool) -> dict:
    if quick:
        return {"n": 320, "side": 32, "batch": 32, "log_every": 2, "workers": 1}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"n": 20_000, "side": 64, "batch": 128, "log_every": 10, "workers": max(cores - 1, 1)}


def build_folder(root: Path, n: int, side: int) -> Path:
    """n distinct RGB JPEGs of side x side in root/<digit>/ (reused when already there)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    marker = root / f".built-{n}-{side}"
    if marker.exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(digits.target)
        grey = Image.fromarray(np.round(digits.images[k] * 255 / 16).astype(np.uint8))
        big = np.asarray(grey.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
        tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
        noise = rng.normal(0, 12, (side, side, 3)).astype(np.float32)
        rgb = np.clip(big[..., None] * tint + noise, 0, 255).astype(np.uint8)
        path = root / str(digits.target[k]) / f"{i:06d}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
    marker.write_text("")
    return root


# -- the hand-written reference ---------------------------------------------------------------


def pil_decode(path: str, side: int) -> np.ndarray:
    """What a careful engineer writes: draft for large JPEGs, RGB, resize, HWC -> CHW."""
    from PIL import Image

    with Image.open(path) as img:
        if img.format == "JPEG" and min(img.size) >= 2 * side:
            img.draft("RGB", (side, side))
        img = img.convert("RGB")
        if img.size != (side, side):
            img = img.resize((side, side))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


class Files(torch.utils.data.Dataset):
    def __init__(self, root: Path, side: int) -> None:
        self.side = side
        self.items = [(str(p), int(p.parent.name)) for p in sorted(root.glob("*/*.jpg"), key=str)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return torch.from_numpy(pil_decode(path, self.side).copy()), label


def cnn(side: int) -> nn.Sequential:
    """The model both sides train (dist_train builds the same from LAYERS)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * (side // 8) ** 2, 10),
    )


LAYERS = (
    "[{conv2d: {out: 16, kernel: 3, padding: 1}}, relu, {max_pool2d: 2}, "
    "{conv2d: {out: 32, kernel: 3, padding: 1}}, relu, {max_pool2d: 4}, flatten, "
    "{linear: out}]"
)


def reference(root: Path, s: dict) -> dict:
    torch.manual_seed(0)
    data = Files(root, s["side"])
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=s["batch"],
        shuffle=True,
        drop_last=True,
        num_workers=s["workers"],
        persistent_workers=True,
        prefetch_factor=2,
        generator=torch.Generator().manual_seed(0),
    )
    model = cnn(s["side"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    marks = [time.perf_counter()]
    for steps, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x.float() / 255), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if steps % s["log_every"] == 0:
            loss.item()  # as dist_train's log line: the interval ends when its work is done
            marks.append(time.perf_counter())
    return _steady(marks, s)


def _steady(marks: list[float], s: dict) -> dict:
    """images/s over the log intervals after the first."""
    spans = np.diff(marks)[1:]
    rate = s["log_every"] * s["batch"] * len(spans) / float(spans.sum())
    return {"images_per_s": rate, "intervals": len(spans)}


# -- dist_train --------------------------------------------------------------------------------


def dist_train_run(root: Path, s: dict, work: Path) -> dict:
    from dist_train.config.recipe import load_recipe
    from dist_train.training.trainer import train

    recipe_path = work / "image_folder.yaml"
    recipe_path.write_text(
        "name: image-folder-bench\nseed: 0\n"
        "data: {source: imagefolder:ROOT, target: label, task: multiclass, mode: lazy,\n"
        "       num_workers: W, persistent_workers: true, prefetch_factor: 2,\n"
        "       channels: 3, image_size: [S, S], valid_fraction: 0}\n"
        f"model: {{layers: {LAYERS}}}\n"
        "loss: cross_entropy\noptimizer: {name: adamw, lr: 1.0e-3}\n"
        "train: {epochs: 1, batch_size: B, log_every_steps: L}\n"
        "metrics: [accuracy]\n".replace("ROOT", str(root))
        .replace("W,", f"{s['workers']},")
        .replace("S, S", f"{s['side']}, {s['side']}")
        .replace("B,", f"{s['batch']},")
        .replace("L}", f"{s['log_every']}}}")
    )
    run_dir = work / "run"
    train(load_recipe(str(recipe_path), []), str(run_dir), restart=True)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [
        r["samples_per_s"]
        for r in log
        if r.get("event") == "train" and r["step"] % s["log_every"] == 0
    ][1:]  # the first interval holds worker start-up, as the reference's
    # intervals have equal sample counts: the steady rate is the harmonic mean of their rates
    rate = len(rates) / sum(1 / r for r in rates)
    return {"images_per_s": rate, "intervals": len(rates)}


def decode_limit(root: Path, side: int, count: int) -> float:
    """Files decoded per second by this one process (no model, no workers)."""
    files = sorted(str(p) for p in root.glob("*/*.jpg"))[:count]
    t = time.perf_counter()
    for f in files:
        pil_decode(f, side)
    return len(files) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="320 32x32 images (smoke test)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "image_folder"))
    ap.add_argument("--out", default=None, help="JSON results (default: WORK/results.json)")
    ap.add_argument("--workers", type=int, default=None, help="W (default: cores - 1)")
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds, order alternating")
    args = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    s = sizes(args.quick)
    if args.workers is not None:
        s["workers"] = args.workers
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    root = build_folder(work / f"jpegs-{s['n']}-{s['side']}", s["n"], s["side"])
    print(f"folder: {s['n']} JPEGs {s['side']}x{s['side']} ({time.perf_counter() - t:.1f} s)")
    limit = decode_limit(root, s["side"], min(s["n"], 3000))
    rounds = []
    for r in range(args.rounds):  # A B, then B A: a drift in machine load hits both sides
        pair = {}
        for side in ("reference", "dist_train") if r % 2 == 0 else ("dist_train", "reference"):
            run = reference(root, s) if side == "reference" else dist_train_run(root, s, work)
            pair[side] = run["images_per_s"]
        pair["ratio"] = pair["dist_train"] / pair["reference"]
        print(f"round {r + 1}/{args.rounds}: {json.dumps(pair)}", flush=True)
        rounds.append(pair)
    ref = {"images_per_s": statistics.median(p["reference"] for p in rounds)}
    ours = {"images_per_s": statistics.median(p["dist_train"] for p in rounds)}
    ratio = statistics.median(p["ratio"] for p in rounds)
    result = {
        "rounds": rounds,
        "images": s["n"],
        "side": s["side"],
        "batch_size": s["batch"],
        "workers": s["workers"],
        "cores": os.cpu_count(),
        "decode_limit_images_per_s": limit,
        "reference_images_per_s": ref["images_per_s"],
        "dist_train_images_per_s": ours["images_per_s"],
        "ratio": ratio,
        "reference_per_worker": ref["images_per_s"] / s["workers"],
        "dist_train_per_worker": ours["images_per_s"] / s["workers"],
    }
    out = Path(args.out) if args.out else work / "results.json"
    out.write_text(json.dumps(result, indent=1))
    w = s["workers"]
    print(f"single-core decode limit: {limit:,.0f} images/s (one process, no model)")
    print(f"reference loop (W={w}):  {ref['images_per_s']:,.0f} images/s (median of rounds)")
    print(f"dist_train lazy (W={w}): {ours['images_per_s']:,.0f} images/s (median of rounds)")
    print(f"ratio dist_train / reference: {ratio:.3f} (median of the per-round ratios)")
    print(
        f"per worker: reference {result['reference_per_worker']:,.0f}, dist_train "
        f"{result['dist_train_per_worker']:,.0f} images/s (decode limit {limit:,.0f})"
    )
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
