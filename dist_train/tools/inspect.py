"""`check` and `summary`: build everything a run would build, on the CPU, without training."""

from __future__ import annotations

from dist_train import build
from dist_train.config.recipe import dump_yaml, load_recipe
from dist_train.model.finetune import prepare_finetune


def _build(path: str, overrides: list[str]):
    recipe = load_recipe(path, overrides)
    data = build.build_data(recipe)
    head = build.make_head(recipe)
    model = build.build_net(recipe, data, head)
    notes = prepare_finetune(model, recipe.finetune, True)
    return recipe, data, head, model, notes


def check(path: str, overrides: list[str]) -> str:
    """Validate, load the data, build model, optimizer and schedule; the resolved recipe."""
    recipe, data, _, model, notes = _build(path, overrides)
    optimizer = build.build_optimizer(model, recipe.optimizer)
    total = build.total_steps(recipe, len(data.train.y))
    build.build_scheduler(optimizer, recipe.scheduler, total, recipe.optimizer.lr)
    n_valid = len(data.valid.y) if data.valid is not None else 0
    params = sum(p.numel() for p in model.parameters())
    lines = [
        "# resolved recipe",
        dump_yaml(recipe).rstrip(),
        f"# ok: {len(data.train.y)} train / {n_valid} valid rows, input {list(data.input_shape)}"
        f"{f', {data.num_classes} classes' if data.classes else ''}; {params:,} parameters; "
        f"{total} optimizer steps",
        *[f"# {n}" for n in notes],
    ]
    return "\n".join(lines)


def summary(path: str, overrides: list[str]) -> str:
    from dist_train.model.net import format_summary

    recipe, data, _, model, notes = _build(path, overrides)
    return "\n".join([f"{recipe.name}", format_summary(model, data.input_shape), *notes])
