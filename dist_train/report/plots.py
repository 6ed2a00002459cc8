"""Figures for `dist-train report` (matplotlib, Agg canvas, no pyplot global state).

Every ``plot_*`` function takes the loaded runs and an output path, writes one PNG and returns True,
or returns False (writing nothing) when no run has the data it needs. The x axis of every per-step
figure is the optimizer step, so runs overlay consistently.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Any

from dist_train.numbers import is_metric_value

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from dist_train.report.html import Run

DPI = 110
STEP_LABEL = "optimizer step"
TRAIN_LOSS, VALID_LOSS, CONFUSION_KEY = "train/loss", "valid/loss", "valid/confusion_matrix"


def plot_all(runs: list[Run], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write every applicable figure into ``out_dir``; return the written paths in display order."""
    plots = {
        "loss.png": plot_loss,
        "metrics.png": plot_metrics,
        "lr.png": plot_lr,
        "throughput.png": plot_throughput,
        "confusion_matrix.png": plot_confusion,
    }
    return [out_dir / name for name, plot in plots.items() if plot(runs, out_dir / name)]


# ----------------------------------------------------------------------------- helpers


def _figure(ncols: int, nrows: int = 1, width: float = 6.0, height: float = 4.2, **kw: Any):
    """A Figure on an Agg canvas (no pyplot, no backend switching) and its axes, flattened."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Figure, path: pathlib.Path) -> bool:
    fig.savefig(path, dpi=DPI, facecolor="white")
    return True


def _colour(i: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10"].colors[i % 10]


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    if xlabel == STEP_LABEL:
        from matplotlib.ticker import StrMethodFormatter

        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def _series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    pairs = [
        (r[x], r[key]) for r in rows if is_metric_value(r.get(key)) and is_metric_value(r.get(x))
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _smooth(xs: list, ys: list, median: bool = False) -> tuple[Any, Any] | None:
    """Rolling mean (or median) over ~1/25 of the points (at most 101); None when too few points."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    window = min(len(ys) // 25, 101)
    if window < 3:
        return None
    values = np.asarray(ys, dtype=float)
    if median:
        smooth = np.median(sliding_window_view(values, window), axis=1)
    else:
        cumsum = np.cumsum(np.insert(values, 0, 0.0))
        smooth = (cumsum[window:] - cumsum[:-window]) / window
    return np.asarray(xs)[window - 1 :], smooth


def _maybe_log(ax: Axes, values: list[float]) -> None:
    """Log y when positive values span more than ~1.5 decades (early loss would squash the rest)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _run_legend(fig: Figure, runs: list[Run], extra: list | None = None, suffix=None) -> None:
    """Legend below the axes: one colour per run (+ ``suffix[i]``), then ``extra`` handles."""
    from matplotlib.lines import Line2D

    suffix = suffix or {}
    handles = [
        Line2D([], [], color=_colour(i), lw=3, label=r.label + suffix.get(i, ""))
        for i, r in enumerate(runs)
    ]
    handles += extra or []
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 5 if not suffix else 3),
            frameon=False,
        )


# ----------------------------------------------------------------------------- figures


def _epoch_means(run: Run, key: str) -> tuple[list, list]:
    by_epoch: dict[int, list[float]] = {}
    for r in run.train:
        if is_metric_value(r.get(key)) and is_metric_value(r.get("epoch")):
            by_epoch.setdefault(int(r["epoch"]), []).append(r[key])
    epochs = sorted(by_epoch)
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def _star(ax: Axes, x: float, y: float, colour: str, ms: int = 16) -> None:
    """The best evaluation's marker, the same in every figure."""
    ax.plot(x, y, marker="*", ms=ms, color=colour, mec="black", ls="none", zorder=5)


def _loss_per_step(ax: Axes, run: Run, colour: str) -> list[float]:
    xs, ys = _series(run.train, TRAIN_LOSS)
    smooth = _smooth(xs, ys)
    ax.plot(xs, ys, color=colour, lw=0.8, alpha=0.35 if smooth else 0.9)
    if smooth:
        ax.plot(*smooth, color=colour, lw=1.6)
    vx, vy = _series(run.evals, VALID_LOSS)
    ax.plot(vx, vy, color=colour, lw=1.8, ls="--", marker="o", ms=5)
    best = run.best_of(VALID_LOSS)
    if best:
        _star(ax, best["step"], best[VALID_LOSS], colour)
    return ys + vy


def _loss_per_epoch(ax: Axes, run: Run, colour: str) -> list[float]:
    te, ty = _epoch_means(run, TRAIN_LOSS)
    ax.plot(te, ty, color=colour, lw=1.8, marker="s", ms=4)
    ve, vy = _series(run.evals, VALID_LOSS, x="epoch")
    ax.plot(ve, vy, color=colour, lw=1.8, ls="--", marker="o", ms=5)
    best = run.best_of(VALID_LOSS)
    if best and is_metric_value(best.get("epoch")):
        ax.axvline(best["epoch"], color=colour, ls=":", lw=1.2, alpha=0.8)
        _star(ax, best["epoch"], best[VALID_LOSS], colour)
    return ty + vy


def plot_loss(runs: list[Run], path: pathlib.Path) -> bool:
    """Train loss per step (thin raw + smoothed) and valid loss per eval; right: per-epoch view."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not any(_series(r.train, TRAIN_LOSS)[0] or _series(r.evals, VALID_LOSS)[0] for r in runs):
        return False
    fig, (ax_step, ax_epoch) = _figure(
        2, width=6.6, height=4.6, gridspec_kw={"width_ratios": [3, 2]}
    )
    values_step, values_epoch = [], []
    for i, run in enumerate(runs):
        values_step += _loss_per_step(ax_step, run, _colour(i))
        values_epoch += _loss_per_epoch(ax_epoch, run, _colour(i))
    _style(ax_step, "Loss per optimizer step", STEP_LABEL, "loss")
    _style(ax_epoch, "Loss per epoch (gap = overfitting)", "epoch", "loss")
    ax_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    _maybe_log(ax_step, values_step)
    _maybe_log(ax_epoch, values_epoch)
    grey = "0.3"
    styles = [
        Line2D([], [], color=grey, lw=1.6, label="train (step: smoothed; epoch: mean)"),
        Line2D([], [], color=grey, lw=1.8, ls="--", marker="o", label="valid (per eval)"),
        Line2D(
            [], [], color=grey, marker="*", ms=14, mec="black", ls="none", label="lowest valid loss"
        ),
    ]
    _run_legend(fig, runs, styles)
    return _save(fig, path)


def plot_metrics(runs: list[Run], path: pathlib.Path) -> bool:
    """One subplot per scalar validation metric (valid/loss if it is the only one), per epoch."""
    from matplotlib.ticker import MaxNLocator

    keys = sorted({k for r in runs for k in r.scalar_metrics}, key=lambda k: (k != VALID_LOSS, k))
    if len(keys) > 1 and VALID_LOSS in keys:
        keys.remove(VALID_LOSS)  # already in loss.png
    if not keys:
        return False
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _figure(ncols, nrows, width=5.0, height=3.6)
    for ax, key in zip(axes, keys, strict=False):  # spare axes are hidden
        modes = set()
        for i, run in enumerate(runs):
            xs, ys = _series(run.evals, key, x="epoch")
            ax.plot(xs, ys, color=_colour(i), lw=1.8, marker="o", ms=4)
            best = run.best_of(key)
            if best and is_metric_value(best.get("epoch")):
                _star(ax, best["epoch"], best[key], _colour(i), ms=14)
                modes.add(run.metric_mode(key))
        arrow = {"min": " (lower is better)", "max": " (higher is better)"}.get("".join(modes), "")
        _style(ax, key + arrow, "epoch", key.split("/", 1)[-1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    _run_legend(fig, runs)
    fig.suptitle("Validation metrics per epoch  (★ = best epoch of that metric)", fontsize=12)
    return _save(fig, path)


def plot_lr(runs: list[Run], path: pathlib.Path) -> bool:
    """Learning rate per optimizer step."""
    if not any(_series(r.train, "lr")[0] for r in runs):
        return False
    fig, (ax,) = _figure(1, width=9.0, height=4.2)
    for i, run in enumerate(runs):  # earlier runs drawn wider, so identical schedules stay visible
        width = 1.6 + 3.0 * (len(runs) - 1 - i) / max(len(runs) - 1, 1)
        ax.plot(*_series(run.train, "lr"), color=_colour(i), lw=width, solid_capstyle="butt")
    _style(ax, "Learning rate schedule", STEP_LABEL, "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_ylim(bottom=0)
    _run_legend(fig, runs)
    return _save(fig, path)


def plot_throughput(runs: list[Run], path: pathlib.Path) -> bool:
    """Training throughput (samples/s, all processes) per step: raw thin line + rolling median."""
    import numpy as np

    if not any(_series(r.train, "samples_per_s")[0] for r in runs):
        return False
    fig, (ax,) = _figure(1, width=9.0, height=4.2)
    medians: dict[int, str] = {}
    for i, run in enumerate(runs):
        xs, ys = _series(run.train, "samples_per_s")
        if not ys:
            continue
        smooth = _smooth(xs, ys, median=True)
        ax.plot(xs, ys, color=_colour(i), lw=0.8, alpha=0.35 if smooth else 0.9)
        if smooth:
            ax.plot(*smooth, color=_colour(i), lw=1.8)
        median = float(np.median(ys))
        ax.axhline(median, color=_colour(i), ls=":", lw=1.2)
        medians[i] = f"  (median {median:,.0f} samples/s, dotted)"
    _style(ax, "Training throughput", STEP_LABEL, "samples / s")
    ax.set_ylim(bottom=0)
    _run_legend(fig, runs, suffix=medians)
    return _save(fig, path)


def _confusion_source(run: Run) -> tuple[dict[str, Any], str] | None:
    best = run.best_eval
    if best and best.get(CONFUSION_KEY):
        return best, f"best {run.monitor}={best[run.monitor]:.4g}"
    with_cm = [r for r in run.evals if r.get(CONFUSION_KEY)]
    return (with_cm[-1], "last logged") if with_cm else None


def _draw_confusion(fig: Figure, ax: Axes, matrix: Any, title: str) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    n = counts.shape[0]
    if n <= 15:
        size = 10 if n <= 6 else 7
        for (t, p), c in np.ndenumerate(counts):
            ax.text(
                p,
                t,
                f"{int(c):,}\n{norm[t, p]:.0%}",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if norm[t, p] > 0.55 else "black",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n, 20)))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n, 20)))
    ax.set_title(title, fontsize=10, fontweight="bold")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, shrink=0.85, label="fraction of true class (row-normalised)")


def plot_confusion(runs: list[Run], path: pathlib.Path) -> bool:
    """Per run with a logged confusion matrix: the one at the best eval (counts + row fraction)."""
    sources = [(run, _confusion_source(run)) for run in runs]
    sources = [(run, src) for run, src in sources if src]
    if not sources:
        return False
    ncols = min(3, len(sources))
    nrows = math.ceil(len(sources) / ncols)
    fig, axes = _figure(ncols, nrows, width=5.6, height=4.8)
    for ax, (run, (record, why)) in zip(axes, sources, strict=False):
        title = f"{run.label}\nepoch {record.get('epoch', '?')} ({why})"
        _draw_confusion(fig, ax, record[CONFUSION_KEY], title)
    for ax in axes[len(sources) :]:
        ax.set_visible(False)
    return _save(fig, path)
