"""Task-specific recipe rules: multi-label targets, class imbalance options and top-k metric
names (`accuracy@5`), checked before anything is built (no torch import).

Rules that need the data (how many classes there are) run again in `check_against_data`,
once the training split is loaded: a recipe can leave `data.num_classes` to the labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dist_train.errors import UserError

if TYPE_CHECKING:
    from dist_train.config.schema import Recipe

# Metrics that make sense for several independent 0/1 labels (a confusion matrix per label
# would not fit the report's one matrix).
MULTILABEL_METRICS = {"accuracy", "precision", "recall", "f1", "auroc"}


def split_metric(name: str) -> tuple[str, int | None]:
    """`accuracy@5` -> ("accuracy", 5); `f1` -> ("f1", None); a bad k -> ("accuracy@x", None),
    which no metric list contains, so the caller's unknown-metric message names it."""
    base, at, k = name.partition("@")
    if not at:
        return name, None
    return (base, int(k)) if k.isdigit() and int(k) >= 1 else (name, None)


def task_defaults(raw: object) -> object:
    """A multilabel recipe without `loss` gets bce_with_logits (one sigmoid per label)."""
    if isinstance(raw, dict) and "loss" not in raw:
        data = raw.get("data")
        if isinstance(data, dict) and data.get("task") == "multilabel":
            return raw | {"loss": "bce_with_logits"}
    return raw


def known_classes(r: Recipe) -> int | None:
    """Classes (labels, for multilabel) the recipe fixes without looking at the data."""
    d = r.data
    if d.task == "multilabel":
        if isinstance(d.target, list):
            return len(d.target)
        return len(d.classes) if d.classes else None
    if d.task == "binary":
        return 2
    return len(d.classes) if d.classes else d.num_classes


def check_task_options(r: Recipe) -> None:
    """The recipe-only rules (ValueError("<key>: ..."), turned into exit 2 by recipe.py)."""
    _check_multilabel(r)
    _check_weights(r, known_classes(r))
    if r.data.sampler == "balanced" and r.data.task not in ("binary", "multiclass"):
        raise ValueError(
            f"data.sampler: balanced draws rows by class frequency, which data.task "
            f"{r.data.task} does not have; use data.sampler: shuffle (or loss.pos_weight for "
            "multilabel imbalance)"
        )
    _check_top_k(r, known_classes(r))


def check_against_data(r: Recipe, num_classes: int) -> None:
    """The same rules once the labels are known (UserError: exit 2, naming the key)."""
    try:
        _check_weights(r, num_classes)
        _check_top_k(r, num_classes)
    except ValueError as err:
        raise UserError(f"{err}.") from None


def _check_multilabel(r: Recipe) -> None:
    d, loss = r.data, r.loss.name
    if isinstance(d.target, list) and d.task != "multilabel":
        raise ValueError(
            f"data.target: a list of columns is for data.task multilabel (here {d.task}); "
            "name one target column"
        )
    if d.task != "multilabel":
        return
    if any(src and src.startswith("imagefolder:") for src in (d.source, d.valid_source)):
        raise ValueError(
            "data.source: imagefolder labels are folder names (one class per image); "
            "multilabel needs a table with 0/1 label columns or a list column"
        )
    if d.num_classes is not None:
        raise ValueError(
            "data.num_classes: multilabel takes its labels from data.target (or data.classes "
            "for a column of label names); remove data.num_classes"
        )
    if isinstance(d.target, list) and len(d.target) < 2:
        raise ValueError("data.target: multilabel needs at least 2 label columns")
    if isinstance(d.target, list) and d.classes is not None:
        raise ValueError(
            "data.classes: with a list of label columns the labels are the columns; remove "
            "data.classes (it orders the labels of one list-valued column)"
        )
    if loss not in ("bce_with_logits", "bce"):
        raise ValueError(
            f"loss: `{loss}` does not fit data.task multilabel (independent 0/1 labels); use "
            "bce_with_logits (the default for multilabel)"
        )


def _check_weights(r: Recipe, n: int | None) -> None:
    lo, task = r.loss, r.data.task
    for key in ("class_weights", "pos_weight"):
        value = getattr(lo, key)
        values = value if isinstance(value, list) else [value]
        if value not in (None, "balanced") and not all(v > 0 for v in values):
            raise ValueError(
                f"loss.{key}: {value} has a weight <= 0; weights must be positive numbers "
                "(or `balanced`)"
            )
    if lo.class_weights is not None:
        if lo.name != "cross_entropy":
            bce = lo.name.startswith("bce")
            other = " (for bce_with_logits use loss.pos_weight)" if bce else ""
            raise ValueError(
                f"loss.class_weights: only for loss cross_entropy (this recipe uses "
                f"{lo.name}){other}; remove it"
            )
        if isinstance(lo.class_weights, list) and n and len(lo.class_weights) != n:
            raise ValueError(
                f"loss.class_weights: {len(lo.class_weights)} weights for {n} classes; give "
                f"one positive weight per class (in class-index order) or `balanced`"
            )
    if lo.pos_weight is not None:
        if lo.name != "bce_with_logits":
            raise ValueError(
                f"loss.pos_weight: only for loss bce_with_logits (this recipe uses {lo.name}); "
                "use loss.class_weights with cross_entropy"
            )
        if isinstance(lo.pos_weight, list):
            if task != "multilabel":
                raise ValueError(
                    "loss.pos_weight: a list (one weight per label) is for data.task "
                    "multilabel; give one number or `balanced`"
                )
            if n and len(lo.pos_weight) != n:
                raise ValueError(
                    f"loss.pos_weight: {len(lo.pos_weight)} weights for {n} labels; give one "
                    "per label, one number for all, or `balanced`"
                )


def _check_top_k(r: Recipe, n: int | None) -> None:
    for i, name in enumerate(r.metrics):
        base, k = split_metric(name)
        if k is None:
            continue
        if base != "accuracy" or r.data.task != "multiclass":
            raise ValueError(
                f"metrics[{i}]: `{name}`: top-k is accuracy@k for data.task multiclass only "
                f"(here {base} on {r.data.task}); use `accuracy`"
            )
        if n and k >= n:
            raise ValueError(
                f"metrics[{i}]: `{name}`: k={k} must be below the {n} classes (top-{n} accuracy "
                "is always 1); use a smaller k"
            )
