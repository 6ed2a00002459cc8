"""Pretrained weights from the files users have (issue 14, item 2): a plain nn.Sequential's
state dict through finetune.key_map, torch.save / safetensors files, transformers
save_pretrained directories (single file, sharded, pytorch_model.bin); the load report; strict
loading; model.init never touching loaded tensors; bad key maps naming the key."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dist_train.build import build_components
from dist_train.config.recipe import validate
from dist_train.errors import UserError
from dist_train.model.finetune import save_report


def _table(path, rows=64, seed=0, ints=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 32, size=(rows, 6)) if ints else rng.normal(size=(rows, 6))
    label = np.arange(rows) % 3
    head = ",".join([f"f{i}" for i in range(6)] + ["label"])
    body = "\n".join(",".join([*(f"{v:.6f}" for v in x[r]), str(label[r])]) for r in range(rows))
    path.write_text(head + "\n" + body + "\n")
    return path


def _recipe(csv, **sections) -> dict:
    raw = {
        "name": "pre",
        "seed": 1,
        "data": {"source": f"csv:{csv}", "target": "label", "task": "multiclass"},
        "model": {"layers": [{"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "train": {"epochs": 1, "batch_size": 8},
    }
    return raw | sections


def _plain() -> nn.Sequential:
    torch.manual_seed(123)  # weights unlike the recipe's (seed 1) initial ones
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize(
    "key_map", [{"": "layers."}, {"0.": "layers.0.", "2.": "layers.2."}], ids=["all", "each"]
)
def test_sequential_state_dict_loads_through_key_map_with_identical_outputs(tmp_path, key_map):
    csv = _table(tmp_path / "t.csv")
    plain = _plain()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    finetune = {"from": str(tmp_path / "plain.pt"), "key_map": key_map, "strict": True}
    built = build_components(validate(_recipe(csv, finetune=finetune)), optimizer=False)
    x = torch.randn(5, 6)
    assert torch.equal(built.model(x), plain(x))
    report = built.load_report
    assert len(report.loaded) == 4 and not (report.missing or report.unexpected)
    assert built.notes[0].startswith(f"finetune: tensors from {tmp_path / 'plain.pt'}")
    assert any(line.split()[:2] == ["loaded", "4"] for line in built.notes)
    save_report(tmp_path, report)
    saved = json.loads((tmp_path / "load_report.json").read_text())
    assert saved["counts"]["loaded"] == 4 and "layers.2.bias" in saved["loaded"]


def test_safetensors_and_wrapped_torch_save_files_load(tmp_path):
    csv = _table(tmp_path / "t.csv")
    plain = _plain()
    state = {f"layers.{k}": v for k, v in plain.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "ckpt.pth")
    x = torch.randn(4, 6)
    for name in ("w.safetensors", "ckpt.pth"):
        finetune = {"from": str(tmp_path / name), "strict": True}
        built = build_components(validate(_recipe(csv, finetune=finetune)), optimizer=False)
        assert torch.equal(built.model(x), plain(x)), name


def test_model_init_shapes_only_what_the_recipe_creates(tmp_path):
    """Loaded tensors replace the initialised ones; a reinitialised head keeps model.init."""
    csv = _table(tmp_path / "t.csv")
    plain = _plain()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    raw = _recipe(
        csv,
        finetune={
            "from": str(tmp_path / "plain.pt"),
            "key_map": {"": "layers."},
            "reinit": ["layers.2.*"],
        },
    )
    raw["model"]["init"] = {"weight": {"name": "constant", "val": 0.5}, "bias": "zeros"}
    model = build_components(validate(raw), optimizer=False).model
    assert torch.equal(model.layers[0].weight, plain[0].weight)  # loaded, not 0.5
    assert bool((model.layers[2].weight == 0.5).all())  # created by the recipe: model.init


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """One tiny random BertForSequenceClassification saved three ways, as users have them."""
    from transformers import BertForSequenceClassification
    from user_models import tiny_bert_config

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(7)
    hf = BertForSequenceClassification(tiny_bert_config(3)).eval()
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="2KB")
    (root / "bin").mkdir()
    shutil.copy(root / "single" / "config.json", root / "bin")
    torch.save(hf.state_dict(), root / "bin" / "pytorch_model.bin")
    return root, hf


@pytest.mark.parametrize("kind", ["single", "sharded", "bin"])
def test_transformers_save_pretrained_directory_loads(tmp_path, bert_dirs, kind):
    root, hf = bert_dirs
    assert kind != "sharded" or (root / kind / "model.safetensors.index.json").is_file()
    csv = _table(tmp_path / "ids.csv", ints=True)
    raw = _recipe(
        csv,
        model={"module": {"path": "user_models:TinyBertClassifier"}},
        finetune={"from": str(root / kind), "key_map": {"": "layers.model."}, "strict": True},
    )
    built = build_components(validate(raw), optimizer=False)
    own = built.model.state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(own[f"layers.model.{name}"], tensor), name
    ids = torch.randint(0, 32, (3, 6))
    built.model.eval()
    assert torch.equal(built.model(ids.float()), hf(input_ids=ids).logits)


def test_null_key_map_rule_drops_tensors_and_strict_lists_what_is_missing(tmp_path):
    csv = _table(tmp_path / "t.csv")
    torch.save(_plain().state_dict(), tmp_path / "plain.pt")
    finetune = {"from": str(tmp_path / "plain.pt"), "key_map": {"2.": None, "": "layers."}}
    built = build_components(validate(_recipe(csv, finetune=finetune)), optimizer=False)
    assert built.load_report.dropped == ["2.weight", "2.bias"]
    assert built.load_report.missing == ["layers.2.weight", "layers.2.bias"]
    with pytest.raises(UserError) as err:
        build_components(validate(_recipe(csv, finetune=finetune | {"strict": True})))
    text = str(err.value)
    assert text.startswith("finetune.strict:") and "2 missing" in text
    assert "layers.2.weight" in text


def test_key_map_rule_that_matches_nothing_names_the_key(tmp_path):
    csv = _table(tmp_path / "t.csv")
    torch.save(_plain().state_dict(), tmp_path / "plain.pt")
    finetune = {"from": str(tmp_path / "plain.pt"), "key_map": {"backbone.": "", "": "layers."}}
    with pytest.raises(UserError) as err:
        build_components(validate(_recipe(csv, finetune=finetune)), optimizer=False)
    assert str(err.value).startswith("finetune.key_map: rule 'backbone.' matches no tensor")
    assert "0.weight" in str(err.value)


def test_directory_without_weights_lists_what_it_looked_for(tmp_path):
    from dist_train.model.pretrained import load_weights

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as err:
        load_weights(str(tmp_path))
    assert "pytorch_model.bin" in str(err.value) and "transformers" in str(err.value)
