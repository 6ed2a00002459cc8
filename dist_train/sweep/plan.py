"""Hyperparameter sweeps: sample every trial up front and write it down (results: results.py).

The driver (never a rank) turns a recipe's `sweep:` section into trials:

* grid params form a cartesian product (first listed key varies slowest);
* at every grid point, `sweep.trials` random draws of the other params; trial i draws, in the
  order the params are listed, from `numpy.random.default_rng([sweep.seed, i])`, so the same
  seed gives the same trials and raising `trials` (without a grid) keeps the earlier ones;
* sampled floats are rounded to 4 significant digits (readable recipes and tables).

Each trial becomes a fully resolved recipe `SWEEP_DIR/trial-NNN/recipe.yaml` (no `sweep:`
section, name `<name>-trial-NNN`) and `SWEEP_DIR/sweep.json` records every trial's values and
recipe hash, all before anything is launched. Every rank of a trial reads that one file, so
they cannot disagree; `run.json`'s `recipe_hash` equals the one in sweep.json. A re-run with a
different sampled plan is refused (growing it, same prefix, is allowed). No torch import.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_train.config.recipe import apply_override, dump_yaml, recipe_hash, resolved, validate
from dist_train.config.schema import Recipe, SweepConfig
from dist_train.errors import UserError

PLAN_FILE, RESULTS_FILE, BEST_FILE, LAUNCHES = (
    "sweep.json",
    "results.csv",
    "best.yaml",
    "launches.jsonl",
)
SIGNIFICANT = 4


@dataclass
class Trial:
    index: int
    values: dict[str, Any]
    recipe: Recipe | None = field(default=None, repr=False)
    hash: str = ""

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"


# ---------------------------------------------------------------------------- sampling


def sample(param, rng) -> Any:
    """One draw of a non-grid distribution (floats rounded to SIGNIFICANT digits)."""
    kind = param.kind
    if kind == "log_uniform":
        lo, hi = param.log_uniform
        return _round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if kind == "uniform":
        return _round(float(rng.uniform(*param.uniform)))
    if kind == "int_uniform":
        lo, hi = param.int_uniform
        return int(rng.integers(lo, hi, endpoint=True))
    if kind == "choice":
        return copy.deepcopy(param.choice[int(rng.integers(len(param.choice)))])
    raise ValueError(f"{kind} is not sampled")  # grid: enumerated, never drawn


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def sample_values(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every trial's values, in trial order (see the module doc for the semantics)."""
    import numpy as np

    grid_keys = [k for k, p in sweep.params.items() if p.kind == "grid"]
    points = list(itertools.product(*(sweep.params[k].grid for k in grid_keys)))
    out = []
    for point in points:
        for _ in range(sweep.trials):
            rng = np.random.default_rng([sweep.seed, len(out)])
            values = {}
            for key, param in sweep.params.items():
                if param.kind == "grid":
                    values[key] = copy.deepcopy(point[grid_keys.index(key)])
                else:
                    values[key] = sample(param, rng)
            out.append(values)
    return out


# ---------------------------------------------------------------------------- planning


def _set(raw: dict, key: str, value: Any) -> None:
    apply_override(raw, f"{key}={json.dumps(value)}")  # JSON is YAML: the value round-trips


def _base(recipe: Recipe, source: str) -> tuple[dict, SweepConfig]:
    if recipe.sweep is None:
        raise UserError(
            f"{source}: no `sweep:` section; add one, e.g.\n  sweep:\n    trials: 10\n    "
            "metric: valid/accuracy\n    params:\n      optimizer.lr: {log_uniform: [1.0e-4, "
            "1.0e-2]}\n(recipes/wine_sweep.yaml is a complete example)"
        )
    base = resolved(recipe)
    base.pop("sweep")
    return base, recipe.sweep


def check_params(base: dict, sweep: SweepConfig, source: str) -> None:
    """Each param alone, at its bounds / every listed value, must give a valid recipe: an
    unknown key or a value of the wrong kind fails here, naming the key, before any launch."""
    for key, param in sweep.params.items():
        kind = param.kind
        values = getattr(param, kind)
        for value in values:
            raw = copy.deepcopy(base)
            try:
                _set(raw, key, value)
                validate(raw, source="trial")
            except UserError as err:
                why = str(err).split("\n", 1)[-1]  # without "trial: invalid recipe:"
                raise UserError(
                    f"{source}: sweep.params.{key}: {kind} value {json.dumps(value)} gives an "
                    f"invalid recipe:\n{why}"
                ) from None


def plan_trials(recipe: Recipe, source: str = "recipe") -> tuple[list[Trial], SweepConfig]:
    """Validate the sweep and build every trial's resolved recipe (raises UserError)."""
    base, sweep = _base(recipe, source)
    check_params(base, sweep, source)
    trials = []
    for i, values in enumerate(sample_values(sweep)):
        trial = Trial(i, values)
        raw = copy.deepcopy(base)
        for key, value in values.items():
            _set(raw, key, value)
        raw["name"] = f"{recipe.name}-{trial.name}"
        wandb = raw.get("tracking", {}).get("wandb")
        if isinstance(wandb, dict) and not wandb.get("group"):
            wandb["group"] = group_name(recipe.name)  # trials side by side in one wandb group
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
        trial.recipe = validate(raw, source=f"{source}: sweep {trial.name} ({shown})")
        trial.hash = recipe_hash(trial.recipe)
        _check_metric(trial.recipe, sweep, source, trial.name)
        trials.append(trial)
    return trials, sweep


def group_name(name: str) -> str:
    """The sweep's name for wandb groups and SLURM jobs: `wine` -> `wine-sweep`."""
    return name if "sweep" in name else f"{name}-sweep"


def _check_metric(recipe: Recipe, sweep: SweepConfig, source: str, name: str) -> None:
    known = {"valid/loss"} | {f"valid/{m}" for m in recipe.metrics if m != "confusion_matrix"}
    if sweep.metric not in known:
        raise UserError(
            f"{source}: sweep.metric: `{sweep.metric}` is not computed by {name}; choose from "
            f"{', '.join(sorted(known))} (add the metric to `metrics` first)"
        )


# ---------------------------------------------------------------------------- sweep directory


def _entries(trials: list[Trial]) -> list[dict]:
    return [{"trial": t.name, "values": t.values, "recipe_hash": t.hash} for t in trials]


def write_plan(sweep_dir: Path, trials: list[Trial], sweep: SweepConfig, meta: dict) -> str:
    """Write sweep.json and every trial-NNN/recipe.yaml, or check they match a previous run.
    Returns a one-line notice (new / resumed / grown). Refuses a changed sweep."""
    plan_path = sweep_dir / PLAN_FILE
    entries, notice = _entries(trials), f"new sweep: {len(trials)} trials in {sweep_dir}"
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if plan_path.is_file():
        old = read_plan(sweep_dir)
        created = old.get("created", created)
        old_entries = old.get("trials", [])
        if entries[: len(old_entries)] != old_entries:
            raise UserError(_changed_message(sweep_dir, old_entries, entries))
        grown = len(entries) - len(old_entries)
        notice = f"resuming the sweep in {sweep_dir} ({len(trials)} trials" + (
            f", {grown} new)" if grown else ")"
        )
    elif sweep_dir.is_dir() and any(sweep_dir.iterdir()):
        raise UserError(
            f"-o {sweep_dir}: exists and is not a sweep directory (no {PLAN_FILE}); choose an "
            "empty or new directory."
        )
    for trial in trials:
        _write_trial_recipe(sweep_dir / trial.name, trial)
    plan = {
        "format": 1,
        **meta,
        "created": created,
        "seed": sweep.seed,
        "trials_per_point": sweep.trials,
        "metric": sweep.metric,
        "direction": sweep.direction,
        "params": {k: p.model_dump(exclude_none=True) for k, p in sweep.params.items()},
        "trials": entries,
    }
    write_atomic(plan_path, json.dumps(plan, indent=2) + "\n")
    return notice


def _write_trial_recipe(trial_dir: Path, trial: Trial) -> None:
    path, text = trial_dir / "recipe.yaml", dump_yaml(trial.recipe)
    trial_dir.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_atomic(path, text)
    elif path.read_text() != text:
        # The trainer rewrites this same text; anything else is a hand edit that would make
        # the trial differ from sweep.json (and hide the change from the trainer's resume check).
        raise UserError(
            f"{path}: differs from the sweep's trial recipe (edited by hand?); restore it or "
            "delete the trial directory to retrain that trial."
        )


def _changed_message(sweep_dir: Path, old: list[dict], new: list[dict]) -> str:
    for o, n in itertools.zip_longest(old, new):
        if o != n:
            break
    name = (o or n or {}).get("trial", "?")
    was = json.dumps((o or {}).get("values")) if o else "(absent)"
    now = json.dumps((n or {}).get("values")) if n else "(absent)"
    return (
        f"-o {sweep_dir} holds a different sweep ({PLAN_FILE}: {len(old)} trials, now "
        f"{len(new)}; {name} was {was}, now {now}). The recipe, overrides or sweep seed "
        "changed; use another -o directory (or delete this one) to start a new sweep."
    )


def read_plan(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / PLAN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{sweep_dir}: no {PLAN_FILE}; not a sweep directory.") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err}); delete the sweep directory.") from None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
