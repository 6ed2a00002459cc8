"""`dist-train lr-find`: the learning-rate range test (Leslie Smith; fastai's lr_find).

The recipe's own build (`build_components`: data, model, optimizer) and step (`Stepper`) run
for up to `steps` optimizer steps on the global batch, the lr growing exponentially from
`start` to `end` (every `optimizer.param_groups` override scaled by the same factor; the
recipe's schedule is not used), until the smoothed loss exceeds 4x its minimum. Nothing of the
run is kept: the model is a fresh build, no run directory is created, and only the plot and
`lr_find.json` are written (main process, to --out or a new directory under the system temp).

Same decisions on every rank: each step's loss is the mean over all ranks' micro-batches (one
all-reduce), so the smoothing, the stop and the suggestion are computed from identical numbers
everywhere.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dist_train.config.schema import Recipe
from dist_train.errors import UserError

BETA = 0.98  # the loss's exponential smoothing (fastai's value)
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


@dataclass
class LrFind:
    lrs: list[float] = field(default_factory=list)  # the main group's lr at each step
    losses: list[float] = field(default_factory=list)  # mean over ranks, before the update
    smoothed: list[float] = field(default_factory=list)  # bias-corrected moving average
    median: list[float] = field(default_factory=list)  # centred running median (suggestion)
    stopped: str = "steps"  # steps | diverged | nonfinite
    world_size: int = 1
    key: str = "optimizer.lr"  # the recipe key the swept lr stands for
    steepest: float | None = None  # lr where the median curve falls fastest
    min_over_10: float | None = None  # lr of the median curve's minimum, divided by 10
    suggestion: float | None = None  # = min_over_10 (see `suggest`)

    def override(self) -> str:
        return f"{self.key}={self.suggestion:.3g}"


def lr_find(recipe: Recipe, start: float, end: float, steps: int) -> LrFind:
    """The sweep itself, on every process of the launch (collectives inside); no file I/O."""
    if not 0 < start < end or steps < 2:
        raise UserError(
            f"lr-find: need 0 < --start < --end and --steps >= 2 (got start {start}, end {end}, "
            f"steps {steps})."
        )
    from accelerate.utils import set_seed

    from dist_train.build import build_components
    from dist_train.data.augment import augment_batch, augment_generator
    from dist_train.data.loaders import fast_batches, make_loader
    from dist_train.data.mix import make_mixer
    from dist_train.training.distributed import make_accelerator, plan_batches
    from dist_train.training.step import Stepper

    acc = make_accelerator(recipe)
    set_seed(recipe.seed, device_specific=True)  # dropout as in training
    plan = plan_batches(recipe, acc.num_processes)
    built = build_components(recipe, acc)  # collective inside: rank 0 loads data first
    loader = make_loader(built.data.train, plan.per_device, True, True, seed=recipe.seed)
    model, optimizer, loader = acc.prepare(built.model, built.optimizer, loader)
    # Each group's peak lr relative to the recipe's (param_groups overrides keep their ratio);
    # onecycle with max_lr peaks at max_lr, so that is the key the sweep tunes there.
    result = LrFind(world_size=acc.num_processes)
    peak = recipe.optimizer.lr
    if recipe.scheduler.name == "onecycle" and recipe.scheduler.max_lr:
        result.key, peak = "scheduler.max_lr", recipe.scheduler.max_lr
    ratio = [g["initial_lr"] / peak for g in optimizer.param_groups]
    stepper = Stepper(acc, model, optimizer, built.head, recipe.train)
    mixer = make_mixer(recipe, loader.dataset, built.data.num_classes)
    accum, aug, rank = recipe.train.grad_accum, recipe.data.augment, acc.process_index
    grow = (end / start) ** (1 / (steps - 1))
    avg, best = 0.0, math.inf
    step, epoch = 0, 0
    while step < steps:
        loader.set_epoch(epoch)
        if mixer is not None:  # lazy rows: the workers fetch this epoch's partners
            mixer.start_epoch(epoch)
        batches = fast_batches(loader) or loader
        total = torch.zeros((), device=acc.device)
        for micro, (x, y, idx, *partners) in enumerate(batches):
            if micro >= built.steps_per_epoch * accum:
                break
            lr = start * grow**step
            for g, r in zip(optimizer.param_groups, ratio, strict=True):
                g["lr"] = lr * r
            if mixer is not None:
                x, y = mixer(x, y, idx, epoch, partners)
            if aug:
                x = augment_batch(x, aug, augment_generator(recipe.seed, step, micro % accum, rank))
            boundary = (micro + 1) % accum == 0
            out = stepper(x, y, boundary, step)  # collective on a boundary (DDP)
            total += out.loss
            if not boundary:
                continue
            # Collective: the step's loss averaged over ranks and micro-batches, the same
            # number on every rank, so every rank takes the same stop decision below.
            loss = float(acc.reduce(total / accum, reduction="mean"))
            total.zero_()
            step += 1
            if not math.isfinite(loss) or out.applied is False:
                result.stopped = "nonfinite"
                break
            avg = BETA * avg + (1 - BETA) * loss
            smooth = avg / (1 - BETA**step)
            result.lrs.append(lr)
            result.losses.append(loss)
            result.smoothed.append(smooth)
            best = min(best, smooth)
            if smooth > DIVERGE * best:
                result.stopped = "diverged"
                break
            if step >= steps:
                break
        if result.stopped != "steps":
            break
        epoch += 1
    suggest(result)
    return result


def suggest(result: LrFind) -> None:
    """Read the curve once the sweep is over. The running average that decides the stop lags:
    with BETA 0.98 it spans ~50 steps, 4 decades of lr at the default 100 steps over 8
    decades, which drags its minimum far to the right. The suggestion reads a zero-lag curve
    instead, the running median of the raw losses over a centred window of ~1/10 of the steps
    (robust to single noisy batches and to the blow-up at the end). On it:

    - `min_over_10`: the lr of the lowest loss divided by 10, the suggestion: the loss still
      falls there, an order of magnitude below where it stops improving;
    - `steepest`: where the loss falls fastest (most negative slope against log lr) before the
      minimum. Printed too, but noisier: on the wine MLP (batch 16) it moved between 2e-4 and
      1.6e-3 across seeds, while min/10 stayed within 2.6e-3..8e-3.
    """
    lrs, raw = np.array(result.lrs), np.array(result.losses)
    if len(lrs) == 0:
        return
    result.median = median_curve(raw).tolist()
    curve = np.array(result.median)
    low = int(np.argmin(curve))
    result.min_over_10 = float(lrs[low] / 10)
    if low >= 2:
        slope = np.gradient(curve[: low + 1], np.log10(lrs[: low + 1]))
        result.steepest = float(lrs[int(np.argmin(slope))])
    result.suggestion = result.min_over_10


def median_curve(losses: np.ndarray) -> np.ndarray:
    half = max(2, len(losses) // 20)  # a window of ~1/10 of the points: 11 of 100
    return np.array(
        [np.median(losses[max(0, i - half) : i + half + 1]) for i in range(len(losses))]
    )


def write(result: LrFind, out: Path, recipe: Recipe, write_override: bool) -> list[Path]:
    """lr_find.json, lr_find.png (when matplotlib is installed) and, asked for, override.txt."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "lr_find.json"]
    (out / "lr_find.json").write_text(
        json.dumps({"recipe": recipe.name, **asdict(result)}, indent=2) + "\n"
    )
    if write_override and result.suggestion:
        (out / "override.txt").write_text(result.override() + "\n")
        written.append(out / "override.txt")
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=1, label="running average (stop rule)")
    ax.plot(result.lrs, result.median, color="C3", label="running median (suggestion)")
    for value, name, color in (
        (result.steepest, "steepest", "C1"),
        (result.min_over_10, "min/10", "C2"),
    ):
        if value:
            ax.axvline(value, color=color, ls="--", label=f"{name} {value:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=recipe.name)
    if result.median:  # up to 1.5x the start: the blow-up would flatten the interesting part
        lowest = int(np.argmin(result.median))
        ax.set_ylim(min(0.0, *result.losses), 1.5 * max(result.median[: lowest + 1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr_find.png", dpi=100)
    plt.close(fig)
    return [*written, out / "lr_find.png"]


def default_out(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"dist-train-lr-find-{name}-"))


def report(result: LrFind, recipe_path: str, overrides: list[str], files: list[Path]) -> str:
    def fmt(v: float | None) -> str:
        return f"{v:.3g}" if v else "n/a"

    if result.suggestion is None:
        return (
            f"lr-find: no usable loss ({result.stopped} at the first step); lower --start.\n"
            + "\n".join(f"wrote {f}" for f in files)
        )
    why = {
        "steps": "all steps ran",
        "diverged": f"stopped: smoothed loss > {DIVERGE:g}x its minimum",
        "nonfinite": "stopped: non-finite loss",
    }[result.stopped]
    rest = " ".join(o for o in overrides if not o.startswith(f"{result.key}="))
    lines = [
        f"lr-find: {len(result.lrs)} steps on {result.world_size} process(es), lr "
        f"{result.lrs[0]:.2g} .. {result.lrs[-1]:.2g} ({why})",
        f"  min/10 (lr of the lowest median-smoothed loss, / 10): {fmt(result.min_over_10)}",
        f"  steepest descent of the median-smoothed loss:        {fmt(result.steepest)}",
        f"suggested lr (min/10): {fmt(result.suggestion)}",
        f"override: {result.override()}",
        f"  dist-train train {recipe_path} {(rest + ' ') if rest else ''}{result.override()}",
        *[f"wrote {f}" for f in files],
    ]
    if not any(f.suffix == ".png" for f in files):
        lines.append("no plot: matplotlib is not installed (pip install 'dist-train[report]')")
    return "\n".join(lines)
