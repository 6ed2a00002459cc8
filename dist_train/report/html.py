"""`dist-train report`: turn one or more run directories into PNG figures and a self-contained HTML.

A run directory holds ``metrics.jsonl`` (one JSON object per line, written by the trainer),
``recipe.yaml`` (its ``name:`` labels the run) and optionally ``run.json`` (``monitor``/``mode``
select the best evaluation; default: lowest ``valid/loss``).

Public API: :func:`load_run`, :func:`write_report`; the subcommand is in
:mod:`dist_train.report.cli`, plotting in :mod:`dist_train.report.plots` (matplotlib is imported
only when figures are drawn, so importing this module stays cheap).
"""

from __future__ import annotations

import html
import json
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any

from dist_train.config.base import better, default_mode
from dist_train.errors import UserError
from dist_train.numbers import is_metric_value
from dist_train.report import page

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAIN_LOSS = "train/loss"
VALID_PREFIX = "valid/"
CONFUSION_KEY = "valid/confusion_matrix"
DEFAULT_MONITOR = "valid/loss"
DEFAULT_MODE = default_mode(DEFAULT_MONITOR)
# Figure file name -> section title in the HTML, in display order.
FIGURES = {
    "loss.png": "Loss (train vs. validation)",
    "metrics.png": "Validation metrics per epoch",
    "lr.png": "Learning rate",
    "throughput.png": "Throughput",
    "confusion_matrix.png": "Confusion matrix at the best evaluation",
}


@dataclass
class Run:
    """Everything the report needs from one run directory (records sorted by step, deduplicated)."""

    path: pathlib.Path
    name: str
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    monitor: str = DEFAULT_MONITOR
    mode: str = DEFAULT_MODE
    notes: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def scalar_metrics(self) -> list[str]:
        """``valid/*`` keys holding numbers, ``valid/loss`` first then alphabetical."""
        keys = {k for r in self.evals for k, v in r.items() if k.startswith(VALID_PREFIX)}
        keys = {k for k in keys if any(is_metric_value(r.get(k)) for r in self.evals)}
        keys = {k for k in keys if not k.endswith("/rows")}  # a row count, not a metric
        return sorted(keys, key=lambda k: (k != DEFAULT_MONITOR, k))

    def metric_mode(self, key: str) -> str:
        """``"min"`` or ``"max"``: the run's mode for its monitor, else the trainer's default
        for that metric name (the rule that picks the best checkpoint)."""
        return self.mode if key == self.monitor else default_mode(key)

    def best_of(self, key: str) -> dict[str, Any] | None:
        """The eval record with the best value of ``key`` (earliest on ties), or None."""
        best, mode = None, self.metric_mode(key)
        for r in self.evals:
            if is_metric_value(r.get(key)) and better(
                r[key], None if best is None else best[key], mode
            ):
                best = r
        return best

    @property
    def best_eval(self) -> dict[str, Any] | None:
        """The eval record selected by ``monitor``/``mode`` (run.json), or None without evals."""
        return self.best_of(self.monitor)

    @property
    def num_epochs(self) -> int:
        epochs = [r["epoch"] for r in self.train + self.evals if is_metric_value(r.get("epoch"))]
        return int(max(epochs)) if epochs else 0

    @property
    def num_steps(self) -> int:
        steps = [r["step"] for r in self.train + self.evals]
        return int(max(steps)) if steps else 0


def _read_metrics(path: pathlib.Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse metrics.jsonl; a truncated final line is skipped with a note, other bad lines raise."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}).") from exc
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records, notes = [], []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(numbered) - 1 and records:
                note = f"{path}:{lineno}: truncated last line skipped (run killed mid-write?)."
                log.warning(note)
                notes.append(note)
                continue
            raise UserError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}). Fix or delete that line; "
                "every line must be one JSON object written by the trainer."
            ) from exc
        if not isinstance(record, dict) or not is_metric_value(record.get("step")):
            raise UserError(
                f"{path}:{lineno}: expected a JSON object with a numeric 'step', got {line[:80]!r}."
            )
        records.append(record)
    if not records:
        raise UserError(f"{path} is empty: the run logged nothing yet. Train at least one epoch.")
    return records, notes


def _dedup_by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort by step; when a step repeats (e.g. after a resume) the LAST occurrence wins."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _recipe_name(run_dir: pathlib.Path) -> str:
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        import yaml  # lazy: keep `import dist_train.report.html` cheap

        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        except (yaml.YAMLError, OSError):
            data = None
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return run_dir.resolve().name


def _read_run_json(run_dir: pathlib.Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}). Fix or delete the file.") from exc
    return data if isinstance(data, dict) else {}


def load_run(run_dir: pathlib.Path) -> Run:
    """Read one run directory; raises UserError when it is not a readable run."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir}: no such directory. Pass a run directory (holds {METRICS_FILE})."
        )
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        hint = (
            " It is a sweep directory: pass its trial-NNN/ dirs." if _is_sweep_dir(run_dir) else ""
        )
        raise UserError(f"{run_dir}: no {METRICS_FILE}; not a run directory.{hint}")
    records, notes = _read_metrics(metrics)
    records = [  # from here on, epochs as shown (page.EPOCH_NOTE)
        {**r, "epoch": page.shown_epoch(r["epoch"])} if is_metric_value(r.get("epoch")) else r
        for r in records
    ]
    train = _dedup_by_step([r for r in records if r.get("event") == "train"])
    evals = _dedup_by_step([r for r in records if r.get("event") == "eval"])
    if not train and not evals:
        raise UserError(f"{metrics}: no 'train' or 'eval' lines yet; nothing to report.")
    meta = _read_run_json(run_dir)
    monitor = str(meta.get("monitor") or DEFAULT_MONITOR)
    mode = str(meta.get("mode") or DEFAULT_MODE).lower()
    if mode not in ("min", "max"):
        raise UserError(f"{run_dir / 'run.json'}: mode must be 'min' or 'max', got {mode!r}.")
    run = Run(run_dir, _recipe_name(run_dir), train, evals, monitor, mode, notes)
    if evals and run.best_eval is None and monitor != DEFAULT_MONITOR:
        run.notes.append(f"monitor {monitor!r} never logged; best eval = lowest {DEFAULT_MONITOR}.")
        run.monitor, run.mode = DEFAULT_MONITOR, DEFAULT_MODE
    return run


def _is_sweep_dir(path: pathlib.Path) -> bool:
    """A sweep directory: results.csv plus trial-NNN/ subdirs (a sweep report can hook in here)."""
    return (path / "results.csv").is_file() and any(path.glob("trial-*/"))


def _assign_labels(runs: list[Run]) -> None:
    """Label = recipe name; runs sharing a name get 'name (dir)' and, if still equal, '#i'."""
    for run in runs:
        same = [r for r in runs if r.name == run.name]
        run.label = run.name if len(same) == 1 else f"{run.name} ({run.path.resolve().name})"
    for i, run in enumerate(runs):
        if sum(r.label == run.label for r in runs) > 1:
            run.label = f"{run.label} #{i + 1}"


def _fmt(value: Any) -> str:
    if not is_metric_value(value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def _overview_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        best = run.best_eval
        arrow = "↓" if run.mode == "min" else "↑"
        best_txt = f"{_fmt(best[run.monitor])} @ epoch {best.get('epoch', '?')}" if best else "–"
        cells = [
            html.escape(run.label),
            f"<code>{html.escape(str(run.path))}</code>",
            f'<td class="num">{run.num_epochs}',
            f'<td class="num">{run.num_steps:,}',
            f"{html.escape(run.monitor)} {arrow}",
            f'<td class="num">{best_txt}',
        ]
        rows.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}" for c in cells))
    head = "<tr><th>run<th>directory<th>epochs<th>steps<th>monitor<th>best"
    return f"<table>{head}{''.join(rows)}</table>"


def _run_table(run: Run) -> str:
    """Per-run table: final and best value of every scalar metric, and the epoch of the best."""
    rows = []
    last_train = run.train[-1].get(TRAIN_LOSS) if run.train else None
    if is_metric_value(last_train):
        rows.append(f'<tr><td>{TRAIN_LOSS} (last logged)<td class="num">{_fmt(last_train)}<td><td>')
    final = run.evals[-1] if run.evals else {}
    for key in run.scalar_metrics:
        best = run.best_of(key)
        arrow = "↓" if run.metric_mode(key) == "min" else "↑"
        star = " ★" if key == run.monitor else ""
        rows.append(
            f"<tr><td>{html.escape(key)} {arrow}{star}"
            f'<td class="num">{_fmt(final.get(key))}'
            f'<td class="num">{_fmt(best[key]) if best else "–"}'
            f'<td class="num">{best.get("epoch", "?") if best else "–"}'
        )
    head = "<tr><th>metric<th>final<th>best<th>best at epoch"
    return f"<table>{head}{''.join(rows)}</table>"


def _page_parts(runs: list[Run], figures: list[pathlib.Path]) -> list[str]:
    parts = [
        "<p>★ = monitored metric (selects the best evaluation); ↓ lower / ↑ higher is better.</p>",
        "<h2>Runs</h2>",
        _overview_table(runs),
    ]
    for run in runs:
        parts.append(f"<h3>{html.escape(run.label)}</h3>")
        parts.extend(f"<p class='note'>⚠ {html.escape(n)}</p>" for n in run.notes)
        parts.append(_run_table(run))
    parts.extend(page.png(p, FIGURES.get(p.name, p.stem)) for p in figures)
    return parts


def _default_out_dir(run_dirs: list[pathlib.Path]) -> pathlib.Path:
    if len(run_dirs) == 1:
        return run_dirs[0]
    return run_dirs[0].resolve().parent / "report"


def write_report(run_dirs: list[pathlib.Path], out_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Write the figures and ``report.html`` for ``run_dirs`` into ``out_dir``; return its path.

    ``out_dir`` defaults to the run directory itself (one run) or ``<first run's parent>/report``.
    Figures that do not apply (e.g. no confusion matrix logged) are left out.
    """
    from dist_train.extras import require

    require("matplotlib", "`dist-train report`")  # an optional extra: exit 2 with the fix
    from dist_train.report import plots  # lazy: pulls in matplotlib

    run_dirs = [pathlib.Path(d) for d in run_dirs]
    if len(run_dirs) == 1 and _is_sweep_dir(run_dirs[0]):  # metric vs each swept parameter
        from dist_train.report.sweep import write_sweep_report

        return write_sweep_report(run_dirs[0], out_dir)
    if not run_dirs:
        raise UserError("report: pass at least one run directory.")
    runs = [load_run(d) for d in run_dirs]
    _assign_labels(runs)
    out = pathlib.Path(out_dir) if out_dir is not None else _default_out_dir(run_dirs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the output directory ({exc.strerror}).") from exc
    figures = plots.plot_all(runs, out)
    title = f"dist-train report: {', '.join(r.label for r in runs)}"
    return page.write_page(
        out / "report.html", title, "Training report", _page_parts(runs, figures)
    )
