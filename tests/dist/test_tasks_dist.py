"""Class-balanced sampling and multi-label metrics on real gloo ranks (torchrun)."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch
import yaml
from dist_helpers import RECIPE, audit_rows, events, make_multilabel_table, run_info
from procs import cli, max_diff, weights

pytestmark = pytest.mark.dist


def test_balanced_sampler_same_rows_and_weights_on_1_and_2_processes(
    reference_run, tiny_recipe, tiny_data
):
    """`data.sampler: balanced` draws one global sequence of rows from (seed, epoch): 2 ranks
    train on exactly the rows of 1 process at every step (same weights within 1e-5), and the
    draw really evens out the classes of this skewed table."""
    args = ("data.sampler=balanced", "train.epochs=2", "checkpoint.every_epochs=0")
    one = reference_run(tiny_recipe, *args, DIST_TRAIN_AUDIT_SAMPLES="1")
    two = reference_run(tiny_recipe, *args, nproc=2, DIST_TRAIN_AUDIT_SAMPLES="1")
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    rows1, rows2 = audit_rows(one), audit_rows(two)
    assert len(rows1) == 2 * (480 // 24) and rows1 == rows2
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
    lines = tiny_data["train"].read_text().splitlines()[1:]
    labels = [int(line.rsplit(",", 1)[1]) for line in lines]
    natural = Counter(labels)
    drawn = Counter(labels[i] for ids in rows1.values() for i in ids)
    assert max(natural.values()) / min(natural.values()) > 2  # the table is skewed ...
    assert max(drawn.values()) / min(drawn.values()) < 1.25  # ... the draws are not
    assert sum(drawn.values()) == 2 * 480 - 2 * (480 % 24)


def test_multilabel_metrics_over_97_rows_equal_torchmetrics(tmp_path):
    """`data.task: multilabel` (three 0/1 columns, bce_with_logits by default) trained and
    predicted on 2 ranks: the evaluation counts 97 rows, its accuracy / F1 / AUROC equal
    torchmetrics' functional multilabel metrics on the model's outputs for the 97 rows, and
    predict writes the same probabilities and 0/1 labels at `data.threshold`."""
    from torchmetrics.functional.classification import (
        multilabel_accuracy,
        multilabel_auroc,
        multilabel_f1_score,
    )

    from dist_train.build import build_components
    from dist_train.config.recipe import load_recipe
    from dist_train.tools.predict import load_into

    make_multilabel_table(tmp_path / "train.csv", 480, 0)
    make_multilabel_table(tmp_path / "valid.csv", 97, 1)
    recipe = json.loads(json.dumps(RECIPE))
    del recipe["loss"]  # the task's default: bce_with_logits
    recipe["data"] |= {
        "source": f"csv:{tmp_path / 'train.csv'}",
        "target": ["a", "b", "c"],
        "valid_source": f"csv:{tmp_path / 'valid.csv'}",
        "task": "multilabel",
        "threshold": 0.4,
    }
    recipe["metrics"] = ["accuracy", "f1", "auroc"]
    recipe["train"]["epochs"] = 1
    path = tmp_path / "ml.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run, preds = tmp_path / "run", tmp_path / "preds.csv"
    r = cli("train", str(path), "-o", str(run), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_info(run)["world_size"] == 2
    ev = events(run, "eval")[-1]
    assert ev["valid/rows"] == 97
    r = cli(
        "predict",
        str(path),
        "--checkpoint",
        str(run / "model.safetensors"),
        "--data",
        f"csv:{tmp_path / 'valid.csv'}",
        "-o",
        str(preds),
        nproc=2,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    built = build_components(load_recipe(str(path), []), finetune=False, optimizer=False)
    load_into(built.model, str(run / "model.safetensors"))
    built.model.eval()
    with torch.no_grad():
        probs = built.model(built.data.valid.x).sigmoid()
    y = built.data.valid.y
    assert y.shape == (97, 3)
    kw = {"num_labels": 3}
    assert ev["valid/accuracy"] == pytest.approx(
        float(multilabel_accuracy(probs, y, threshold=0.4, **kw)), abs=1e-6
    )
    assert ev["valid/f1"] == pytest.approx(
        float(multilabel_f1_score(probs, y, threshold=0.4, **kw)), abs=1e-6
    )
    assert ev["valid/auroc"] == pytest.approx(float(multilabel_auroc(probs, y, **kw)), abs=1e-6)
    assert 0.5 < ev["valid/accuracy"] < 1  # learned something, not everything: a real check

    with open(preds) as fh:
        table = list(csv.DictReader(fh))
    assert [int(row["row"]) for row in table] == list(range(97))
    for row, p, t in zip(table, probs.tolist(), y.tolist(), strict=True):
        for j, name in enumerate("abc"):
            assert float(row[f"prob_{name}"]) == pytest.approx(p[j], abs=2e-6)
            assert int(row[f"pred_{name}"]) == int(p[j] > 0.4)
            assert int(row[f"target_{name}"]) == t[j]
