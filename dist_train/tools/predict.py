"""`dist-train eval` and `dist-train predict`: a trained model on the validation split or a file.

Both run on 1 or N processes (the rows are sharded, then gathered in order with the padding
dropped), so row counts are exact and predictions come out in the input's row order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from dist_train.build import build_components, data_config
from dist_train.config.recipe import load_recipe
from dist_train.data.loaders import make_loader
from dist_train.data.sources import Table, load_table
from dist_train.errors import UserError
from dist_train.model.finetune import load_weights
from dist_train.training.distributed import eval_per_device, make_accelerator
from dist_train.training.evaluate import evaluate, gathered_outputs


def _setup(args, require_target: bool):
    recipe = load_recipe(args.recipe, args.overrides)
    accelerator = make_accelerator(recipe)
    built = build_components(recipe, accelerator, finetune=False, optimizer=False)
    data, head, model = built.data, built.head, built.model
    load_into(model, args.checkpoint)
    table, has_target = data.valid, True
    if args.data:
        table, has_target = load_table(
            args.data,
            data_config(recipe),
            data.classes,
            data.feature_names,
            require_target=require_target,
        )
    if table is None:
        raise UserError(
            "eval: the recipe has no validation split (data.valid_fraction is 0); pass --data FILE."
        )
    batch = eval_per_device(recipe, accelerator.num_processes)
    workers = data.workers  # lazy tables: fetched by the same worker pool as in training
    loader = make_loader(table, batch, shuffle=False, drop_last=False, workers=workers)
    loader = accelerator.prepare(loader)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    return recipe, data, head, model, loader, accelerator, table, has_target


def load_into(model: torch.nn.Module, path: str) -> None:
    """Strict load; a different architecture is reported tensor by tensor."""
    state = load_weights(path, key="--checkpoint")
    own = model.state_dict()
    problems = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems += [f"{k}: missing from the file" for k in own if k not in state]
    problems += [f"{k}: in the file, not in the model" for k in state if k not in own]
    if problems:
        raise UserError(
            f"--checkpoint {path}: does not fit this recipe's model "
            f"({len(problems)} differences):\n    "
            + "\n    ".join(problems[:12])
            + "\n  use the recipe the checkpoint was trained with."
        )
    model.load_state_dict(state)


def run_eval(args) -> int:
    recipe, data, head, model, loader, accelerator, _, _ = _setup(args, require_target=True)
    from dist_train.training.metrics import MetricSet

    metrics = (
        MetricSet(
            recipe.metrics,
            recipe.data.task,
            data.num_classes,
            accelerator.device,
            recipe.data.threshold,
        )
        if recipe.metrics
        else None
    )
    result = evaluate(model, loader, head, metrics, accelerator)
    if accelerator.is_main_process:
        text = json.dumps(result, indent=2)
        print(text)
        out = Path(args.output) if args.output else _default_out(args.checkpoint, "eval.json")
        out.write_text(text + "\n")
        print(f"wrote {out}")
    accelerator.wait_for_everyone()  # collective: every rank leaves the process group together
    return 0


def run_predict(args) -> int:
    recipe, data, head, model, loader, accelerator, _table, has_target = _setup(args, False)
    rows: list[list] = []
    for out, y, idx in gathered_outputs(model, loader, accelerator):
        scores = head.scores(out).cpu()
        target = y.cpu() if has_target else None
        preds = _rows(recipe.data.task, data.classes, scores, target, recipe.data.threshold)
        rows += [[int(i), *r] for i, r in zip(idx.tolist(), preds, strict=False)]
    if accelerator.is_main_process:
        header = _header(recipe.data.task, data.classes, has_target)
        out = Path(args.output) if args.output else _default_out(args.checkpoint, "preds.csv")
        with open(out, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(sorted(rows))  # gathered in input order already; sort is a guard
        print(f"wrote {len(rows)} predictions to {out}")
    accelerator.wait_for_everyone()  # collective: every rank leaves the process group together
    return 0


def _header(task: str, classes, has_target: bool) -> list[str]:
    """multilabel: a 0/1 column and a probability per label (and the 0/1 targets)."""
    if task == "multilabel":
        header = ["row", *[f"pred_{c}" for c in classes], *[f"prob_{c}" for c in classes]]
        return header + ([f"target_{c}" for c in classes] if has_target else [])
    header = ["row", "prediction"]
    if classes:
        header += [f"prob_{c}" for c in classes] if task == "multiclass" else [f"prob_{classes[1]}"]
    return header + (["target"] if has_target else [])


def _rows(task: str, classes, scores: torch.Tensor, y, threshold: float = 0.5) -> list[list]:
    """Predictions as the metrics count them: binary/multilabel probabilities above
    `data.threshold` are 1 (torchmetrics' `preds > threshold`)."""
    out = []
    for i in range(len(scores)):
        if task == "multilabel":
            probs = scores[i].tolist()
            row = [int(p > threshold) for p in probs] + [round(p, 6) for p in probs]
            out.append(row + (y[i].tolist() if y is not None else []))
            continue
        if task == "multiclass":
            probs = scores[i].tolist()
            row = [classes[int(scores[i].argmax())], *[round(p, 6) for p in probs]]
        elif task == "binary":
            p = float(scores[i])
            row = [classes[int(p > threshold)], round(p, 6)]
        else:
            row = [float(scores[i])]
        if y is not None:
            row.append(classes[int(y[i])] if classes else float(y[i]))
        out.append(row)
    return out


def _default_out(checkpoint: str, name: str) -> Path:
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / name


__all__ = ["Table", "load_into", "run_eval", "run_predict"]
