"""`check` and `summary`: build everything a run would build, on the CPU, without training."""

from __future__ import annotations

from dist_train.build import build_components
from dist_train.config.recipe import dump_yaml, load_recipe


def check(path: str, overrides: list[str]) -> str:
    """Validate, load the data, build model, optimizer and schedule (train's own build, on
    this process's CPU); the resolved recipe."""
    recipe = load_recipe(path, overrides)
    built = build_components(recipe)
    data, model, notes, total = built.data, built.model, built.notes, built.total_steps
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
    """The layer table (a layer list: output shapes) and, for any model, trainable/frozen
    parameters per group (top-level module; a top-level layer list one row per layer)."""
    from torch import nn

    from dist_train.model.freeze import format_groups
    from dist_train.model.net import Net, format_summary

    recipe = load_recipe(path, overrides)
    built = build_components(recipe, optimizer=False)
    model = built.model
    parts = [recipe.name]
    # Layer lists and backbones: a row per layer / backbone part (a model.module is one module
    # of the user's, whose children need not run in sequence: its groups below say enough).
    if isinstance(model, Net) and (model.has_backbone or isinstance(model.layers, nn.Sequential)):
        parts.append(format_summary(model, built.data.input_shape, built.data.train.dtype))
    parts += ["", "parameters by group:", format_groups(model), *built.notes]
    return "\n".join(parts)
