"""model.factory / model.hf backbones, the logits rule, data.text: built through the CLI in this
process (check / summary / train), bad inputs exit 2 naming the recipe key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from procs import ROOT, cli, cli_here, weights

from dist_train.errors import UserError
from dist_train.model.backbone import logits_of

FACTORIES = {"PYTHONPATH": str(ROOT / "tests")}  # `factories:NAME` importable (in-process too)


@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))


def write(tmp_path: Path, recipe: dict) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def table_recipe(model: dict) -> dict:
    return {
        "name": "bb",
        "data": {"source": "sklearn:wine", "target": "target", "task": "multiclass"},
        "model": model,
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"epochs": 1, "batch_size": 16},
    }


def text_recipe(hf_text: Path, **model) -> dict:
    return {
        "name": "txt",
        "data": {
            "source": f"csv:{hf_text / 'reviews.csv'}",
            "text": "text",
            "target": "label",
            "task": "multiclass",
            "max_length": 24,
        },
        "model": model
        or {"hf": {"pretrained": str(hf_text / "bert-tiny"), "task": "sequence_classification"}},
        "loss": "cross_entropy",
        "optimizer": {"name": "adamw", "lr": 0.003},
        "train": {"epochs": 1, "batch_size": 32, "max_steps": 3},
        "metrics": ["accuracy"],
    }


def test_logits_rule():
    from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

    t = torch.ones(2, 3)
    assert logits_of(t, "m") is t
    assert logits_of(SequenceClassifierOutput(logits=t), "m") is t
    assert logits_of({"logits": t, "x": 1}, "m") is t
    assert logits_of((None, t, torch.zeros(1)), "m") is t
    with pytest.raises(UserError, match=r"model.hf: .*ModelOutput without logits"):
        logits_of(BaseModelOutput(last_hidden_state=t), "model.hf")
    with pytest.raises(UserError, match=r"model.factory: .*dict without logits"):
        logits_of({"hidden": t}, "model.factory")
    with pytest.raises(UserError, match="not logits"):
        logits_of("text", "model.factory")


def test_token_rows_are_cut_to_the_longest_row_of_the_batch():
    from dist_train.model.backbone import TokenInputs

    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0]])
    mask = (ids > 0).long()
    x = torch.stack([ids, mask], dim=1)  # [N, K, L] as stored
    got = TokenInputs(["input_ids", "attention_mask"], right_padded=True)(x)
    assert torch.equal(got["input_ids"], ids[:, :3]) and torch.equal(
        got["attention_mask"], mask[:, :3]
    )
    kept = TokenInputs(["input_ids", "attention_mask"], right_padded=False)(x)
    assert kept["input_ids"].shape == (2, 5)  # left padding: nothing to cut at the end


def test_factory_function_with_out_kwarg_and_summary(tmp_path):
    model = {
        "factory": {"path": "factories:mlp", "kwargs": {"in_features": 13, "num_classes": "out"}}
    }
    path = write(tmp_path, table_recipe(model))
    r = cli_here("check", path)
    assert r.returncode == 0, r.stderr
    r = cli_here("summary", path)
    assert r.returncode == 0, r.stderr
    # the backbone's own children, its output (3 wine classes) on the last; parameter counts
    assert "backbone.2" in r.stdout and "[3]" in r.stdout
    assert f"{13 * 16 + 16 + 16 * 3 + 3:,} total" in r.stdout


def test_factory_class_tuple_output_with_layers_head_and_init(tmp_path):
    """A tuple output counts by its first tensor; `model.layers` after it form a head sized by a
    dry forward; model.init reaches the head only, never the factory's weights."""
    model = {
        "factory": {
            "path": "factories:TupleMLP",
            "kwargs": {"in_features": 13, "hidden": 8, "width": 5},
        },
        "layers": ["relu", {"linear": "out"}],
        "init": {"weight": {"name": "constant", "val": 0.25}, "bias": "zeros"},
    }
    out = tmp_path / "run"
    r = cli_here(
        "train",
        write(tmp_path, table_recipe(model)),
        "-o",
        str(out),
        "train.max_steps=1",
        "optimizer.lr=1e-9",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    w = weights(out / "model.safetensors")
    assert w["layers.1.weight"].shape == (3, 5)
    assert torch.allclose(w["layers.1.weight"], torch.full((3, 5), 0.25), atol=1e-6)
    assert not torch.allclose(w["backbone.proj.weight"], torch.tensor(0.25), atol=1e-3)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (
            {"path": "factories:no_such_thing"},
            "model.factory.path `factories:no_such_thing`: cannot import",
        ),
        ({"path": "nosuchpkg.mod:fn"}, "model.factory.path `nosuchpkg.mod:fn`: cannot import"),
        ({"path": "/tmp/x.py:fn"}, "model.factory.path `/tmp/x.py:fn`: expected"),
        ({"path": "factories:mlp", "kwargs": {"in_feat": 13}}, "model.factory.kwargs"),
        ({"path": "factories:not_a_module"}, "returned a str, not an nn.Module"),
        (
            {"path": "factories:DictOut", "kwargs": {"in_features": 13}},
            "model.factory: .*dict without logits",
        ),
    ],
)
def test_bad_factory_exits_2_naming_the_key(tmp_path, factory, message):
    r = cli_here("check", write(tmp_path, table_recipe({"factory": factory})))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    import re

    assert re.search(message, r.stderr), r.stderr


def test_model_output_without_logits_exits_2(tmp_path, hf_text):
    """A transformers base model (hidden states, no classification head) through a factory."""
    recipe = text_recipe(
        hf_text,
        factory={
            "path": "transformers:BertModel.from_pretrained",
            "kwargs": {"pretrained_model_name_or_path": str(hf_text / "bert-tiny")},
        },
    )
    recipe["data"]["tokenizer"] = str(hf_text / "bert-tiny")
    r = cli_here("check", write(tmp_path, recipe))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.factory: the model returns a BaseModelOutputWithPooling" in r.stderr
    assert "ModelOutput without logits" in r.stderr


def test_tokenizer_missing_exits_2_naming_data_tokenizer(tmp_path, hf_text):
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = text_recipe(hf_text)
    recipe["data"]["tokenizer"] = str(empty)
    r = cli_here("check", write(tmp_path, recipe))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"data.tokenizer `{empty}`: no tokenizer there" in r.stderr


def test_text_needs_a_model_that_embeds_tokens(tmp_path, hf_text):
    recipe = text_recipe(hf_text, layers=[{"linear": "out"}])
    r = cli_here("check", write(tmp_path, recipe))
    assert r.returncode == 2 and "data.text" in r.stderr, r.stderr


def test_hf_text_trains_head_sized_from_data_and_predicts(tmp_path, hf_text):
    """3 steps of the tiny BERT: the 2-label head comes from the data, the encoder from the
    directory (bitwise before training), predict writes labels and probabilities per row."""
    from safetensors.torch import load_file

    path = write(tmp_path, text_recipe(hf_text))
    r = cli_here("check", path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model.hf: BertForSequenceClassification" in r.stdout
    out = tmp_path / "run"
    r = cli_here("train", path, "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    w = weights(out / "model.safetensors")
    assert w["backbone.classifier.weight"].shape == (2, 32)
    r = cli_here("summary", path)
    assert r.returncode == 0, r.stderr[-2000:]
    layer_table = r.stdout.split("parameters by group:")[0]  # then trainable/frozen per group
    rows = {ln.split()[0]: ln for ln in layer_table.splitlines() if ln.startswith("backbone")}
    assert (
        set(rows) == {"backbone.bert", "backbone.dropout", "backbone.classifier"}
        and "[2]" in rows["backbone.classifier"]
    )
    assert "26,594 total, 26,594 trainable" in r.stdout
    pre = load_file(str(hf_text / "bert-tiny" / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(pre[key], w[f"backbone.{key}"])  # trained
    preds = tmp_path / "preds.csv"
    r = cli_here(
        "predict",
        path,
        "--checkpoint",
        str(out),
        "--data",
        f"csv:{hf_text / 'reviews.csv'}",
        "-o",
        str(preds),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = preds.read_text().splitlines()
    assert lines[0] == "row,prediction,prob_negative,prob_positive,target" and len(lines) == 2001


def test_hf_init_never_touches_the_pretrained_backbone(tmp_path, hf_text):
    """model.init reaches the head in model.layers only (alone with model.hf it is refused)."""
    from safetensors.torch import load_file

    recipe = text_recipe(hf_text)
    recipe["model"]["init"] = {"weight": {"name": "constant", "val": 0.5}, "bias": "zeros"}
    r = cli_here("check", write(tmp_path, recipe))
    assert r.returncode == 2 and "model.init: applies only to layers" in r.stderr, r.stderr
    recipe["model"]["layers"] = ["relu", {"linear": "out"}]
    out = tmp_path / "run"
    r = cli_here(
        "train", write(tmp_path, recipe), "-o", str(out), "optimizer.lr=1e-12", "train.max_steps=1"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    pre = load_file(str(hf_text / "bert-tiny" / "model.safetensors"))
    w = weights(out / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(pre[key], w[f"backbone.{key}"], atol=1e-9)
    assert pre[key].abs().sum() > 0
    # the head after the checkpoint's own 2-wide classifier: initialised by the recipe
    assert torch.allclose(w["layers.1.weight"], torch.full((2, 2), 0.5), atol=1e-9)


@pytest.mark.slow  # a child process: seconds of imports (transformers), HF_HUB_OFFLINE set before
def test_hub_id_without_network_exits_2(tmp_path, hf_text):
    recipe = text_recipe(hf_text)
    recipe["model"]["hf"]["pretrained"] = "someone/not-downloadable"
    recipe["data"]["tokenizer"] = str(hf_text / "bert-tiny")
    # a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported, and the
    # test worker (that cli() would fork from) has imported it already
    r = cli("check", write(tmp_path, recipe), launcher="exec", HF_HUB_OFFLINE="1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.hf.pretrained `someone/not-downloadable`: cannot load" in r.stderr
    assert "Traceback" not in r.stderr


def test_text_pairs_train_with_token_type_ids(tmp_path, hf_text):
    """Two text columns: [CLS] a [SEP] b [SEP], with token_type_ids among the model inputs."""
    csv = tmp_path / "pairs.csv"
    rows = (hf_text / "reviews.csv").read_text().splitlines()[1:201]
    csv.write_text(
        "premise,hypothesis,label\n"
        + "\n".join(f'{r.rsplit(",", 1)[0]},"the verdict",{r.rsplit(",", 1)[1]}' for r in rows)
        + "\n"
    )
    recipe = text_recipe(hf_text)
    recipe["data"] |= {"source": f"csv:{csv}", "text": ["premise", "hypothesis"]}
    r = cli_here("train", write(tmp_path, recipe), "-o", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    from dist_train.build import build_data
    from dist_train.config.recipe import load_recipe

    data = build_data(load_recipe(write(tmp_path, recipe)))
    assert data.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    types = data.train.x[:, 1]
    assert int(types.max()) == 1 and int(types[:, 0].max()) == 0  # the second text is segment 1
