"""Recipe loading: overrides, YAML-typed values, the resolved round trip, shipped recipes, and the
README recipe reference kept in sync with the typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dist_train.config import reference as schema_doc
from dist_train.config.recipe import apply_override, dump_yaml, load_recipe, recipe_hash, resolved
from dist_train.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture
def raw() -> dict:
    return {
        "name": "t",
        "data": {"source": "sklearn:iris", "task": "multiclass"},
        "model": {"layers": [{"linear": 8}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "train": {"early_stopping": {"patience": 3}},
    }


def test_override_sets_nested_value_parsed_as_yaml(raw):
    apply_override(raw, "optimizer.lr=1e-2")
    apply_override(raw, "train.epochs=7")
    apply_override(raw, "data.standardize=true")
    apply_override(raw, "metrics=[accuracy, f1]")
    apply_override(raw, "name=run-2")
    assert raw["optimizer"]["lr"] == 0.01 and isinstance(raw["optimizer"]["lr"], float)
    assert raw["train"]["epochs"] == 7
    assert raw["data"]["standardize"] is True
    assert raw["metrics"] == ["accuracy", "f1"]
    assert raw["name"] == "run-2"


def test_recipe_file_reads_exponent_without_dot_as_float(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw).replace("lr: 0.1", "lr: 5e-3"))
    assert "5e-3" in path.read_text()
    recipe = load_recipe(path, ["optimizer.weight_decay=1e-4"])
    assert recipe.optimizer.lr == pytest.approx(5e-3)
    assert recipe.optimizer.weight_decay == pytest.approx(1e-4)


def test_override_adds_missing_sections(raw):
    apply_override(raw, "scheduler.name=cosine")
    apply_override(raw, "tracking.wandb.project=p")
    assert raw["scheduler"] == {"name": "cosine"}
    assert raw["tracking"] == {"wandb": {"project": "p"}}


def test_override_deletes(raw):
    apply_override(raw, "~train.early_stopping")
    assert "early_stopping" not in raw["train"]
    apply_override(raw, "~model.layers.1")
    assert raw["model"]["layers"] == [{"linear": 8}, {"linear": "out"}]


def test_override_list_index(raw):
    apply_override(raw, "model.layers.1=gelu")
    apply_override(raw, "model.layers.0.linear=16")
    apply_override(raw, "model.layers.-1={linear: out, bias: false}")
    assert raw["model"]["layers"] == [{"linear": 16}, "gelu", {"linear": "out", "bias": False}]


@pytest.mark.parametrize("item", ["~train.nothing", "~model.layers.5", "model.layers.x=relu"])
def test_override_bad_targets(raw, item):
    with pytest.raises(UserError, match="override"):
        apply_override(raw, item)


def test_overrides_applied_by_load_recipe(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path, ["optimizer.lr=1e-2", "~train.early_stopping", "seed=3"])
    assert recipe.optimizer.lr == pytest.approx(0.01)
    assert recipe.train.early_stopping is None
    assert recipe.seed == 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_resolved_recipe_round_trips(tmp_path, path):
    recipe = load_recipe(path)
    again_path = tmp_path / "resolved.yaml"
    again_path.write_text(dump_yaml(recipe))
    again = load_recipe(again_path)
    assert again == recipe
    assert recipe_hash(again) == recipe_hash(recipe)
    assert resolved(again) == resolved(recipe)


def test_round_trip_keeps_every_layer_argument(tmp_path, raw):
    raw["model"]["layers"][0] = {"conv2d": {"out": 4}}
    raw["data"]["shape"] = [1, 2, 2]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    text = dump_yaml(load_recipe(path))
    assert "conv2d: {out: 4, kernel: 3, stride: 1, padding: 0, bias: true}" in text
    path.write_text(text)
    assert load_recipe(path).model.layers[0].args.kernel == 3


def test_hash_changes_with_content(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert recipe_hash(load_recipe(path)) != recipe_hash(load_recipe(path, ["optimizer.lr=0.2"]))


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"wine_mlp.yaml", "digits_cnn.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a shipped recipe starts with a comment saying how to run it"


def test_readme_recipe_reference_is_current():
    text = (ROOT / "README.md").read_text()
    begin, end = text.find(schema_doc.BEGIN), text.find(schema_doc.END)
    assert begin >= 0 and end > begin, "README.md lacks the generated recipe reference block"
    block = text[begin : end + len(schema_doc.END)]
    assert block == schema_doc.reference_markdown(), (
        "README.md's recipe reference is stale: regenerate the block with `dist-train schema`"
    )


def test_reference_lists_every_section_and_layer():
    doc = schema_doc.reference_markdown()
    for key in (
        "`data.source`",
        "`model.layers`",
        "`train.early_stopping.monitor`",
        "`finetune.from`",
        "`tracking.wandb.project`",
        "`optimizer.param_groups[].lr`",
    ):
        assert key in doc
    for layer in ("`linear`", "`conv2d`", "`dropout`", "`batchnorm`", "`module`"):
        assert layer in doc
