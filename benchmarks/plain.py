"""The hand-tuned PyTorch loop that dist_train is measured against (imports only torch, numpy,
pyarrow / scikit-learn for the data). What a careful engineer writes for data that fits in memory:

- the whole table is two tensors; each epoch draws one permutation and slices batches from it
  (`x[idx]`), no Dataset/DataLoader/collate per sample;
- `foreach` optimizer kernels, `zero_grad(set_to_none=True)`, no `.item()` per step;
- augmentation vectorised per batch (one `affine_grid` + `grid_sample`);
- per-epoch validation (loss + accuracy by argmax) and an atomic `torch.save` checkpoint.

The shuffle uses the same (seed + epoch) permutation as dist_train's seedable sampler and the
initial weights are loaded from the same file, so with the same math the weights must match.

Usage (fresh process, as the benchmark's startup/RSS case runs it):
    python benchmarks/plain.py WORKDIR CASE [--first-step-file F] [--result F]
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dropout: float) -> nn.Sequential:
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(
        nn.Linear(32, 256),
        nn.ReLU(),
        *drop,
        nn.Linear(256, 256),
        nn.ReLU(),
        *drop,
        nn.Linear(256, 10),
    )


class DigitsCNN(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.1),
            nn.Flatten(),
            nn.Linear(512, 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def load_parquet(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    feats = [c for c in table.column_names if c != "target"]
    x = np.stack([table[c].to_numpy() for c in feats], axis=1).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(table["target"].to_numpy().astype(np.int64))


def load_digits_split(seed: int = 0):
    """scikit-learn digits, 20% seeded validation split, per-channel standardisation stats."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_valid = round(len(y) * 0.2)
    v, t = perm[:n_valid], perm[n_valid:]
    mean = x[t].mean((0, 2, 3), keepdim=True)[0]
    std = x[t].std((0, 2, 3), keepdim=True)[0]
    return (x[t], y[t]), (x[v], y[v]), mean, std


def shift_batch(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random whole-pixel translation of every image in the batch, one grid_sample call."""
    n, _, h, w = x.shape
    tx = torch.randint(-shift, shift + 1, (n,), generator=gen) * 2.0 / w
    ty = torch.randint(-shift, shift + 1, (n,), generator=gen) * 2.0 / h
    one, zero = torch.ones(n), torch.zeros(n)
    theta = torch.stack([torch.stack([one, zero, tx], 1), torch.stack([zero, one, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.inference_mode()
def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> dict:
    model.eval()
    loss, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    for i in range(0, len(y), bs):
        out = model(x[i : i + bs])
        yb = y[i : i + bs]
        loss += F.cross_entropy(out, yb, reduction="sum").double()
        correct += (out.argmax(1) == yb).sum()
    model.train()
    return {"loss": float(loss) / len(y), "accuracy": int(correct) / len(y)}


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "rng": torch.get_rng_state(),
    }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill never leaves a torn checkpoint


def warm_up() -> None:
    """One throwaway step of each optimizer and a save: the first `optimizer.step()` imports
    parts of torch (dynamo/distributed helpers, ~1-2 s here) that a timed loop must not count.
    Both sides of every training case call this before their clock starts."""
    import io

    model = nn.Linear(2, 2)
    for opt in (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True),
        torch.optim.AdamW(model.parameters(), foreach=True),
    ):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, io.BytesIO())


def train(case: dict, work: Path, on_first_step=None) -> dict:
    """One training run; returns timing (data loading excluded) and the final state dict."""
    t_load = time.perf_counter()
    torch.manual_seed(case["seed"])
    if case["kind"] == "mlp":
        (xt, yt) = load_parquet(work / "train.parquet")
        (xv, yv) = load_parquet(work / "valid.parquet")
        model = mlp(case["dropout"])
    else:
        (xt, yt), (xv, yv), mean, std = load_digits_split(case["seed"])
        model = DigitsCNN(mean, std)
    t0, c0 = time.perf_counter(), time.process_time()
    init = torch.load(case["init"])
    model.load_state_dict(dict(zip(model.state_dict(), init.values(), strict=True)))
    bs, epochs, n = case["batch_size"], case["epochs"], len(yt)
    if case["kind"] == "mlp":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.95, foreach=True)
        sched = None
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4, foreach=True)
        total, warm = epochs * (n // bs), 20

        def cosine(k: int) -> float:
            if k < warm:
                return (k + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min((k - warm) / (total - warm), 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    model.train()
    step, loss_sum, first = 0, torch.zeros(()), None
    intervals, tick = [], time.perf_counter()  # seconds per step, per log interval
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(case["seed"] + epoch))
        for i in range(n // bs):
            idx = perm[i * bs : (i + 1) * bs]
            xb, yb = xt[idx], yt[idx]
            if case.get("shift"):
                xb = shift_batch(xb, case["shift"], torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            loss_sum += loss.detach()
            step += 1
            if first is None:
                first = time.time()
                if on_first_step:
                    on_first_step(first)
            if step % case["log_every"] == 0:  # read the loss once per log interval
                now = time.perf_counter()
                intervals.append((now - tick) / case["log_every"])
                tick = now
                print(f"step {step} loss {float(loss_sum) / case['log_every']:.4f}", flush=True)
                loss_sum.zero_()
        result = validate(model, xv, yv, case["eval_batch_size"])
        print(
            f"epoch {epoch + 1} valid loss {result['loss']:.4f} acc {result['accuracy']:.4f}",
            flush=True,
        )
        save_checkpoint(work / "plain-ckpt.pt", model, opt, sched, epoch)
        tick = time.perf_counter()  # like dist_train's samples/s: eval/save pauses excluded
    torch.save(model.state_dict(), work / "plain-model.pt")
    t1 = time.perf_counter()
    return {
        "seconds": t1 - t0,
        "cpu_seconds": time.process_time() - c0,
        "step_times": intervals,
        "load_seconds": t0 - t_load,
        "steps": step,
        "samples": step * bs,
        "valid": result,
        "state": model.state_dict(),
    }


def evaluate(case: dict, work: Path) -> dict:
    """Evaluation with exact metrics (loss, accuracy) over every row, batch by batch."""
    x, y = load_parquet(work / "train.parquet")
    model = mlp(0.1)
    init = torch.load(case["init"])
    model.load_state_dict(dict(zip(model.state_dict(), init.values(), strict=True)))
    validate(model, x[:64], y[:64], case["batch_size"])  # warm-up pass (both sides have one)
    t0, c0 = time.perf_counter(), time.process_time()
    result = validate(model, x, y, case["batch_size"])
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "rows": len(y),
        **result,
    }


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the
    parent's image across fork + exec, so a child of a big process would report the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> None:
    work, name = Path(argv[0]), argv[1]
    case = json.loads((work / "cases.json").read_text())[name]
    first_file = argv[argv.index("--first-step-file") + 1] if "--first-step-file" in argv else None
    quit_early = "--exit-after-first-step" in argv

    def hook(t: float) -> None:
        rec = {"t": t, "cpu": time.process_time(), "rss": peak_rss_mib()}
        Path(first_file).write_text(json.dumps(rec))
        if quit_early:
            os._exit(0)

    out = train(case, work, hook if first_file else None)
    out.pop("state")
    out["peak_rss_mib"] = peak_rss_mib()
    Path(first_file).write_text(
        json.dumps(json.loads(Path(first_file).read_text()) | {"rss": out["peak_rss_mib"]})
    )
    if "--result" in argv:
        Path(argv[argv.index("--result") + 1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
