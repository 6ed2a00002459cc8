"""Freezing as its own section (issue 14, item 3), in one process: globs over parameter and
module names, `unfreeze` exceptions, batch-norm kept in eval mode while frozen and given back
when a schedule unfreezes it, per-group counts in `summary` for any model, and every glob that
matches nothing (or a schedule that cannot happen) refused with exit 2 naming the key."""

from __future__ import annotations

import pytest
from procs import ROOT, cli_here
from torch import nn

from dist_train.build import build_components
from dist_train.config.recipe import load_recipe

WINE = str(ROOT / "recipes" / "wine_mlp.yaml")
BN = ["model.layers=[{linear: 8}, batchnorm, relu, {linear: 8}, batchnorm, relu, {linear: out}]"]


def _build(*overrides: str):
    return build_components(load_recipe(WINE, [*BN, *overrides]), optimizer=False)


def test_module_globs_freeze_parameters_and_batch_norm_statistics():
    built = _build("freeze=[layers.0, layers.1]", "unfreeze=[layers.1.bias]")
    model = built.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.weight" not in trainable and "layers.1.weight" not in trainable
    assert {"layers.1.bias", "layers.3.weight"} <= trainable  # the exception, the rest
    model.train()
    assert model.layers[4].training  # trainable: train mode as usual
    assert model.layers[1].training  # its bias trains, so its statistics do too

    built = _build("freeze=[layers.0, layers.1]")
    built.model.train()
    assert not built.model.layers[1].training  # all parameters frozen: statistics frozen
    assert f"freeze: {13 * 8 + 8 + 2 * 8} parameters frozen at epoch 0" in built.notes


def test_a_schedule_unfreezes_and_gives_batch_norm_back():
    built = _build(
        "freeze={params: ['layers.[0-4].*'], schedule: [{epoch: 1, unfreeze: ['layers.[34]']}]}",
        "train.epochs=3",
    )
    model, plan = built.model, built.freezing
    model.train()
    assert plan.scheduled and not model.layers[4].training
    assert plan.apply(model, 1) == [
        "layers.3.weight",
        "layers.3.bias",
        "layers.4.weight",
        "layers.4.bias",
    ]
    assert model.layers[4].training and type(model.layers[4]) is nn.BatchNorm1d
    assert not model.layers[1].training  # still frozen
    assert plan.apply(model, 2) == []  # nothing more to unfreeze
    assert "  after 1 epoch: unfreezes layers.[34] (88 parameters)" in built.notes


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("freeze=[backbone.*]", "freeze 'backbone.*': matches no parameter"),
        ("unfreeze=[layers.6.*]", "unfreeze: lists exceptions to `freeze`"),
        (
            "freeze={params: [layers.0.*], unfreeze_at_epoch: 60}",
            "freeze.unfreeze_at_epoch: epoch 60 never comes",
        ),
        (
            "freeze={params: [layers.0.*], schedule: [{epoch: 2, unfreeze: [layers.3.*]}]}",
            "freeze.schedule[0].unfreeze 'layers.3.*': matches no parameter still frozen",
        ),
        ("freeze=['*']", "every parameter is frozen at epoch 0"),
    ],
)
def test_freeze_mistakes_exit_2_naming_the_key(override, message):
    r = cli_here("check", WINE, *BN, override)
    assert r.returncode == 2, r.stdout[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr


def test_summary_counts_per_group_for_a_model_that_is_no_layer_list():
    r = cli_here(
        "summary",
        WINE,
        "~model.layers",
        "model.module={path: 'user_models:TwoTower'}",
        "freeze=[layers.backbone]",
    )
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.strip()}
    assert rows["layers.backbone"] == ["0", f"{13 * 8 + 8 + 16:,}"]
    assert rows["layers.skip"] == [f"{13 * 8 + 8:,}", "0"]
    assert rows["layers.head"] == [f"{8 * 3 + 3:,}", "0"]
