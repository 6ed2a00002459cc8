"""The Python API: what `import dist_train` offers besides the CLI."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.config.recipe import apply_override, load_recipe, read_yaml, resolved, validate
from dist_train.config.schema import Recipe
from dist_train.errors import UserError


def train(
    recipe: Recipe | str | Path,
    output_dir: str | None = None,
    *,
    restart: bool = False,
    allow_changed: bool = False,
) -> dict:
    """Train a `Recipe` (or a recipe path); returns the final validation metrics.

    The same run as `dist-train train`: under `accelerate launch`/`torchrun` every process calls
    it. A stop signal (Ctrl-C) saves a checkpoint and raises
    `dist_train.training.trainer.Preempted`; calling it again with the same `output_dir`
    resumes. Signal handlers are restored when it returns."""
    from dist_train.training.trainer import train as _train

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return _train(recipe, output_dir, restart=restart, allow_changed=allow_changed)


@dataclass
class FitResult:
    """What `fit` returns (the same on every rank)."""

    run_dir: Path
    metrics: dict  # the last validation: valid/loss, valid/<metric>, valid/rows
    best_step: int | None  # the step of the best value of `monitor` (checkpoint.best's metric)
    best_value: float | None
    monitor: str
    model: Any  # the trained nn.Module (yours, copied: the object passed in is unchanged)

    @property
    def best_metrics(self) -> dict:
        """The validation at `best_step`, from RUN_DIR/metrics.jsonl (written by rank 0)."""
        path = self.run_dir / "metrics.jsonl"
        if self.best_step is None or not path.is_file():
            return {}
        evals = [json.loads(line) for line in path.read_text().splitlines()]
        found = [e for e in evals if e.get("event") == "eval" and e["step"] == self.best_step]
        return {k: v for k, v in found[-1].items() if k.startswith("valid/")} if found else {}


def fit(
    recipe: Recipe | str | Path | Mapping,
    *,
    model: Any = None,
    train_data: Any = None,
    valid_data: Any = None,
    metrics: Mapping[str, Any] | Sequence[Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    output_dir: str | None = None,
    restart: bool = False,
    allow_changed: bool = False,
) -> FitResult:
    """Train your own objects with a recipe's optimizer, loss, schedule and training settings.

    `recipe`: a path, a dict (as the YAML would load) or a `Recipe`. `overrides`: CLI-style
    `["optimizer.lr=0.01", "~train.early_stopping"]` or `{"optimizer.lr": 0.01}`.
    `model`: an `nn.Module` (copied; it must return one score per class, or 1); it replaces
    the recipe's `model` section, which may then be left out. `train_data` / `valid_data`: a
    torch map-style `Dataset` whose items are `(x, y)` pairs, or a Hugging Face
    `datasets.Dataset` (columns chosen by `data.features` / `data.target`); they replace
    `data.source` / `data.valid_source`. The `data` section may be left out (the task then
    follows the loss: cross_entropy -> multiclass, bce* -> binary, else regression); without
    `valid_data`, `data.valid_fraction` of `train_data` is held out. Datasets are read once
    into memory (datasets larger than memory are not supported here). `metrics`: torchmetrics
    `Metric` objects by name (a list is named by class), cloned for every run and computed
    on the exactly gathered validation rows (class probabilities for classification).

    Every promise of `dist-train train` holds: the global batch, exact metrics, resume (call
    again with the same `output_dir`), signals (a stop signal saves and raises `Preempted`;
    handlers are restored after each call). Under `torchrun` / `accelerate launch`, every
    process of your script calls `fit` with the same arguments."""
    from dist_train.build import Supplied
    from dist_train.training.trainer import Trainer, run

    named = _named_metrics(metrics)
    raw = _raw(recipe)
    for item in _override_items(overrides):
        apply_override(raw, item)
    _substitute(raw, model, train_data, valid_data)
    context = {"model_supplied": model is not None, "metric_names": list(named)}
    checked = validate(raw, source="fit() recipe", context=context)
    supplied = Supplied(model, train_data, valid_data, named)
    trainer = Trainer(
        checked, output_dir, restart=restart, allow_changed=allow_changed, supplied=supplied
    )
    run(trainer)
    best = checked.checkpoint.best
    return FitResult(
        run_dir=trainer.run_dir,
        metrics=trainer.result,
        best_step=trainer.state.best_step,
        best_value=trainer.state.best_value,
        monitor=best.monitor if best else "valid/loss",
        model=trainer.accelerator.unwrap_model(trainer.model),
    )


def _raw(recipe) -> dict:
    if isinstance(recipe, Recipe):
        return resolved(recipe)
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe))
    return read_yaml(Path(recipe))


def _override_items(overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):  # JSON is YAML: apply_override parses it back
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


TASK_OF_LOSS = {"cross_entropy": "multiclass", "bce_with_logits": "binary", "bce": "binary"}


def _substitute(raw: dict, model, train_data, valid_data) -> None:
    """fit()'s objects in place of the recipe sections they replace; recorded as
    `python:<type>` so the run's recipe.yaml says where the data came from."""
    if model is not None:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise UserError(f"fit(model=...): expected a torch nn.Module, got {type(model)}.")
        raw.pop("model", None)
    if valid_data is not None and train_data is None:
        raise UserError("fit(valid_data=...): give train_data too (or neither).")
    if train_data is None:
        return
    data = raw.get("data")
    if not isinstance(data, dict):
        data = raw["data"] = {}
    loss = raw.get("loss")
    name = loss.get("name") if isinstance(loss, dict) else loss
    data.setdefault("task", TASK_OF_LOSS.get(name, "regression"))
    data["source"] = f"python:{type(train_data).__name__}"
    if valid_data is not None:
        data["valid_source"] = f"python:{type(valid_data).__name__}"
    else:
        data.pop("valid_source", None)


def _named_metrics(metrics) -> dict[str, Any]:
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        named = dict(metrics)
    else:
        named = {_snake(type(m).__name__): m for m in metrics}
        if len(named) != len(metrics):
            raise UserError("fit(metrics=[...]): two metrics of one class; pass a dict of names.")
    for name, m in named.items():
        if not (isinstance(name, str) and hasattr(m, "update") and hasattr(m, "compute")):
            raise UserError(
                f"fit(metrics=...): {name!r} is not a torchmetrics Metric ({type(m).__name__})."
            )
    return named


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
