"""Sweep results, read from the trial directories alone: each trial's status, best evaluation
and wall time; the ranking, results.csv, the leaderboard and best.yaml. Works while a sweep
runs (the trials evaluated so far) and after a SLURM array (`sweep --collect`). No torch."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from dist_train.config.base import better
from dist_train.numbers import is_metric_value
from dist_train.report.page import shown_epoch
from dist_train.sweep.plan import BEST_FILE, LAUNCHES, RESULTS_FILE, read_plan, write_atomic


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _launches(trial_dir: Path) -> list[dict]:
    try:
        lines = (trial_dir / LAUNCHES).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out


def _parse_time(text: str | None) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S%z")) if text else None
    except ValueError:
        return None


def trial_status(trial_dir: Path) -> str:
    """finished | failed (exit N) | interrupted | pending, from the files alone."""
    info = _read_json(trial_dir / "run.json")
    if info.get("status") == "finished":
        return "finished"
    ends = [e for e in _launches(trial_dir) if e.get("event") == "end"]
    last = ends[-1].get("rc") if ends else None
    if last not in (None, 0, 75):  # 75: stopped on a signal with a checkpoint (resumable)
        return f"failed (exit {last})"
    if info or _launches(trial_dir):
        return "interrupted"
    return "pending"


def best_eval(trial_dir: Path, metric: str, direction: str) -> dict | None:
    """The eval event with the best `metric` (earliest on ties), or None."""
    try:
        lines = (trial_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        v = e.get(metric)
        if e.get("event") != "eval" or not is_metric_value(v):
            continue
        if better(v, None if best is None else best[metric], direction):
            best = e
    return best


def wall_seconds(trial_dir: Path) -> float | None:
    """Sum of the driver's launches (every attempt), else run.json's start..end (SLURM)."""
    spans, start = [], None
    for e in _launches(trial_dir):
        if e.get("event") == "start":
            start = e.get("time")
        elif e.get("event") == "end" and start is not None:
            spans.append(e["time"] - start)
            start = None
    if spans:
        return round(sum(spans), 1)
    info = _read_json(trial_dir / "run.json")
    t0, t1 = _parse_time(info.get("start_time")), _parse_time(info.get("end_time"))
    return round(t1 - t0, 1) if t0 is not None and t1 is not None else None


def collect(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """(plan, rows): one row per trial, in trial order, from the trial directories."""
    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    metric, direction = plan["metric"], plan["direction"]
    rows = []
    for entry in plan["trials"]:
        trial_dir = sweep_dir / entry["trial"]
        best = best_eval(trial_dir, metric, direction)
        rows.append(
            {
                "trial": entry["trial"],
                **entry["values"],
                metric: best[metric] if best else None,
                "best_epoch": shown_epoch(best["epoch"]) if best and "epoch" in best else None,
                "best_step": best.get("step") if best else None,
                "wall_s": wall_seconds(trial_dir),
                "status": trial_status(trial_dir),
            }
        )
    return plan, rows


def ranked(plan: dict, rows: list[dict]) -> list[dict]:
    """Best first: trials with a value by the metric, then the rest in trial order."""
    metric, sign = plan["metric"], (-1 if plan["direction"] == "max" else 1)
    scored = sorted((r for r in rows if r[metric] is not None), key=lambda r: sign * r[metric])
    return scored + [r for r in rows if r[metric] is None]


def results_csv(plan: dict, rows: list[dict]) -> str:
    buf = io.StringIO()
    columns = list(rows[0]) if rows else ["trial"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
        )
    return buf.getvalue()


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def leaderboard(plan: dict, rows: list[dict]) -> str:
    """A plain-text table, best trial first."""
    metric = plan["metric"]
    arrow = "higher" if plan["direction"] == "max" else "lower"
    columns = ["rank", *rows[0].keys()] if rows else ["rank", "trial"]
    table = [columns]
    for i, row in enumerate(ranked(plan, rows), 1):
        table.append([str(i) if row[metric] is not None else "-", *map(cell, row.values())])
    widths = [max(len(r[c]) for r in table) for c in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    done = sum(r["status"] == "finished" for r in rows)
    head = f"sweep {plan.get('name', '')}: {done}/{len(rows)} trials finished"
    head += f"; {metric} ({arrow} is better)"
    return "\n".join([head, *lines])


def write_results(sweep_dir: Path) -> tuple[dict, list[dict], str | None]:
    """results.csv, and best.yaml from the best finished trial; returns (plan, rows, best)."""
    sweep_dir = Path(sweep_dir)
    plan, rows = collect(sweep_dir)
    write_atomic(sweep_dir / RESULTS_FILE, results_csv(plan, rows))
    metric = plan["metric"]
    done = [r for r in ranked(plan, rows) if r["status"] == "finished" and r[metric] is not None]
    if not done:
        return plan, rows, None
    best = done[0]
    text = (sweep_dir / best["trial"] / "recipe.yaml").read_text()
    header = (
        f"# Best trial of the sweep in {sweep_dir}: {best['trial']}, {metric} "
        f"{best[metric]:.6g} at epoch {best['best_epoch']}.\n"
        f"# Train it again: dist-train train {sweep_dir / BEST_FILE}\n"
    )
    write_atomic(sweep_dir / BEST_FILE, header + text)
    return plan, rows, best["trial"]
