"""`dist-train report SWEEP_DIR`: the sweep's metric against each searched parameter.

One panel per parameter (log x axis for log_uniform params such as the learning rate, category
positions for choice/grid values that are not numbers); the best trial is starred, unfinished
trials are hollow. Written as SWEEP_DIR/sweep.png and a self-contained SWEEP_DIR/report.html with
the leaderboard. The numbers come from the trial directories (results.collect), so a report taken
while the sweep runs shows the trials evaluated so far.
"""

from __future__ import annotations

import html
import json
import math
import pathlib

from dist_train.errors import UserError
from dist_train.numbers import is_metric_value
from dist_train.report import page
from dist_train.sweep import plan as sweep
from dist_train.sweep import results

DPI = 110
FIGURE = "sweep.png"


def plot_sweep(plan: dict, rows: list[dict], path: pathlib.Path) -> bool:
    """Metric vs each parameter, one panel each; False (nothing written) without any metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, params = plan["metric"], list(plan["params"])
    scored = [r for r in rows if is_metric_value(r.get(metric))]
    if not scored or not params:
        return False
    best = results.ranked(plan, scored)[0]
    cols = min(3, len(params))
    nrows = math.ceil(len(params) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.9 * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, params, strict=False):
        _panel(ax, plan, key, scored, best)
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    arrow = "higher" if plan["direction"] == "max" else "lower"
    fig.suptitle(f"sweep {plan.get('name', '')}: {metric} per trial ({arrow} is better)")
    fig.savefig(path, dpi=DPI, facecolor="white")
    return True


def _panel(ax, plan: dict, key: str, scored: list[dict], best: dict) -> None:
    """The metric against parameter `key` for the trials that have it, the best one starred."""
    metric = plan["metric"]
    kind = next(iter(plan["params"][key]), "")
    values = [r.get(key) for r in scored]
    numeric = all(is_metric_value(v) for v in values)
    if numeric:
        xs = values
    else:  # choice/grid of strings, lists, mappings: one position per distinct value
        labels = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
        xs = [labels.index(json.dumps(v, sort_keys=True)) for v in values]
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    done = [r["status"] == "finished" for r in scored]
    ys = [r[metric] for r in scored]
    for flag, face in ((True, "tab:blue"), (False, "none")):
        pick = [i for i, d in enumerate(done) if d is flag]
        ax.scatter(
            [xs[i] for i in pick],
            [ys[i] for i in pick],
            s=36,
            facecolors=face,
            edgecolors="tab:blue",
            label="finished" if flag else "not finished",
        )
    b = scored.index(best)
    ax.scatter(
        [xs[b]],
        [ys[b]],
        marker="*",
        s=260,
        color="tab:orange",
        zorder=3,
        label=f"best ({best['trial']})",
    )
    if numeric and kind == "log_uniform" and all(v > 0 for v in xs):
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: readable
    if numeric and kind in ("log_uniform", "uniform", "int_uniform"):
        lo, hi = plan["params"][key][kind]  # the whole search range, not just the draws
        if kind == "log_uniform":
            pad = (hi / lo) ** 0.03
            ax.set_xlim(lo / pad, hi * pad)
        else:
            pad = (hi - lo) * 0.03
            ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(f"{key} ({kind})")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def _table(plan: dict, rows: list[dict]) -> str:
    metric = plan["metric"]
    ordered = results.ranked(plan, rows)
    cols = ["rank", *rows[0]] if rows else ["rank"]
    head = "<tr>" + "".join(f"<th>{html.escape(c)}" for c in cols)
    body = []
    for i, row in enumerate(ordered, 1):
        rank = str(i) if row[metric] is not None else "–"
        css = " class='best'" if i == 1 and row[metric] is not None else ""
        cells = [rank, *(results.cell(v) for v in row.values())]
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}" for c in cells))
    return f"<table>{head}{''.join(body)}</table>"


def write_sweep_report(
    sweep_dir: pathlib.Path, out_dir: pathlib.Path | None = None
) -> pathlib.Path:
    """Write sweep.png and report.html for a sweep directory; return the HTML path."""
    sweep_dir = pathlib.Path(sweep_dir)
    plan, rows = results.collect(sweep_dir)
    out = pathlib.Path(out_dir) if out_dir is not None else sweep_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output directory ({exc.strerror}).") from exc
    png = out / FIGURE
    drawn = plot_sweep(plan, rows, png)
    done = sum(r["status"] == "finished" for r in rows)
    name = str(plan.get("name", ""))
    parts = [
        f"<p><code>{html.escape(str(sweep_dir))}</code>: {done}/{len(rows)} trials finished; "
        f"metric <code>{html.escape(plan['metric'])}</code> ({plan['direction']}), sweep seed "
        f"{plan.get('seed')}. Trial recipes: <code>trial-NNN/recipe.yaml</code>; the best one "
        f"is copied to <code>{sweep.BEST_FILE}</code>.</p>",
        "<h2>Leaderboard</h2>",
        _table(plan, rows),
        page.png(png, "Metric vs parameters")
        if drawn
        else "<p>No trial has logged the metric yet; nothing to plot.</p>",
    ]
    return page.write_page(
        out / "report.html", f"dist-train sweep report: {name}", f"Sweep {name}", parts
    )
