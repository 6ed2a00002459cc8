"""A table with string, boolean and missing cells on real gloo ranks: the same encoders, the
same weights and exact metrics of a 97-row held-out test set on 1 and 2 processes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dist_helpers import events, run_info
from procs import cli, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CITIES = ["kyiv", "lima", "oslo", "rome", "suva"]


def make_categorical_table(path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    city = rng.choice(CITIES, rows)
    flag = rng.random(rows) < 0.4
    score = x[:, 0] + 0.5 * x[:, 1] + np.where(city == "rome", 1.5, 0) - flag
    df = pd.DataFrame(
        {
            "f0": x[:, 0],
            "f1": x[:, 1],
            "f2": x[:, 2],
            "city": city,
            "flag": flag.astype(object),
            "label": np.digitize(score, [-0.5, 0.7]),
        }
    )
    gaps = rng.choice(rows, size=(3, rows // 25), replace=False)
    df.loc[gaps[0], "f1"] = np.nan
    df.loc[gaps[1], "city"] = None
    df.loc[gaps[2], "flag"] = None
    df.to_csv(path, index=False)


def test_categorical_table_1_vs_2_processes_and_exact_97_row_test_set(tmp_path):
    """One launch per world size (a 97-row test_source, valid_fraction split, impute):
    the fitted encoders are identical, the weights agree within 1e-5, the test set counts 97
    rows on both and its metrics agree within 1e-5 and equal a hand evaluation of the
    exported weights on the 97 encoded rows."""
    from dist_train.build import build_components
    from dist_train.config.recipe import load_recipe
    from dist_train.tools.predict import load_into

    make_categorical_table(tmp_path / "train.csv", 400, 0)
    make_categorical_table(tmp_path / "test.csv", 97, 1)
    recipe = {
        "name": "cats",
        "seed": 3,
        "data": {
            "source": f"csv:{tmp_path / 'train.csv'}",
            "test_source": f"csv:{tmp_path / 'test.csv'}",
            "target": "label",
            "task": "multiclass",
            "valid_fraction": 0.2,
            "missing": "impute",
            "categorical": {"flag": "onehot"},
            "standardize": True,
        },
        "model": {"layers": [{"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "batch_size": 24, "log_every_steps": 5},
        "metrics": ["accuracy", "f1"],
    }
    path = tmp_path / "cats.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"run{nproc}"
        res = cli("train", str(path), "--output", str(runs[nproc]), nproc=nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "test (final weights):" in res.stdout and "(rows 97)" in res.stdout
    one, two = runs[1], runs[2]
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    assert (one / "columns.json").read_text() == (two / "columns.json").read_text()
    cols = json.loads((one / "columns.json").read_text())["columns"]
    assert [c["encoding"] for c in cols] == ["value"] * 3 + ["onehot", "onehot"]
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
    t1, t2 = run_info(one)["test"], run_info(two)["test"]
    assert t1["test/rows"] == t2["test/rows"] == 97
    for key in ("test/loss", "test/accuracy", "test/f1"):
        assert abs(t1[key] - t2[key]) < 1e-5, key
    assert [e["test/rows"] for e in events(two, "test")] == [97]
    assert all(e["valid/rows"] == 80 for e in events(two, "eval"))
    # By hand, in this process: the recipe's encoded test rows, the exported weights.
    built = build_components(load_recipe(str(path), []), None, finetune=False, optimizer=False)
    assert len(built.data.test.y) == 97
    load_into(built.model, str(two / "model.safetensors"))
    built.model.eval()
    with torch.no_grad():
        out = built.model(built.data.test.x)
    y = built.data.test.y
    loss = float(torch.nn.functional.cross_entropy(out, y))
    acc = float((out.argmax(-1) == y).double().mean())  # correct rows / 97
    assert abs(t2["test/loss"] - loss) < 1e-5 and abs(t2["test/accuracy"] - acc) < 1e-5


def test_lazy_categorical_table_1_vs_2_processes_with_a_worker(tmp_path):
    """data.mode lazy, one DataLoader worker per process: the encoders fitted in the lazy
    pass are the same on 1 and 2 gloo ranks, the weights agree within 1e-5 and the 97-row
    test_source counts 97 rows on both with the same metrics, those of the memory path
    (standardised: statistics equal within 1e-6, so within 1e-5)."""
    from procs import cli_here

    make_categorical_table(tmp_path / "train.csv", 400, 0)
    make_categorical_table(tmp_path / "test.csv", 97, 1)
    recipe = {
        "name": "lazy-cats",
        "seed": 5,
        "data": {
            "source": f"csv:{tmp_path / 'train.csv'}",
            "test_source": f"csv:{tmp_path / 'test.csv'}",
            "target": "label",
            "task": "multiclass",
            "missing": "impute",
            "categorical": {"flag": "onehot"},
            "standardize": True,
            "mode": "lazy",
            "num_workers": 1,
            "cache_dir": str(tmp_path / "cache"),
        },
        "model": {"layers": [{"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 1, "batch_size": 24},
        "metrics": ["accuracy"],
    }
    path = tmp_path / "cats.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    one, two, mem = tmp_path / "run1", tmp_path / "run2", tmp_path / "memory"
    for run, mode in ((one, "lazy"), (mem, "memory")):
        args = ("train", str(path), "--output", str(run), f"data.mode={mode}")
        res = cli_here(*args, WANDB_MODE="disabled")
        assert res.returncode == 0, res.stderr[-3000:]
    res = cli("train", str(path), "--output", str(two), nproc=2, WANDB_MODE="disabled")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data: lazy (data.mode lazy); 1 workers/process" in res.stdout
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    assert (one / "columns.json").read_text() == (two / "columns.json").read_text()
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
    assert (one / "columns.json").read_text() == (mem / "columns.json").read_text()
    assert max_diff(weights(one / "model.safetensors"), weights(mem / "model.safetensors")) < 1e-5
    t1, t2, tm = (run_info(r)["test"] for r in (one, two, mem))
    assert t1["test/rows"] == t2["test/rows"] == tm["test/rows"] == 97
    for key in ("test/loss", "test/accuracy"):
        assert abs(t1[key] - t2[key]) < 1e-5 and abs(t1[key] - tm[key]) < 1e-5, key
    assert all(e["valid/rows"] == 80 for e in events(two, "eval"))


def test_stream_drop_table_1_vs_2_processes_with_a_worker(tmp_path):
    """data.mode stream, 3 parquet shards, a string city and data.missing drop (48 of 400
    rows left out), one worker per process: the encoders fitted in each process's scan are
    the same on 1 and 2 gloo ranks, every rank trains 14 micro-batches of exactly 12 kept
    rows per epoch (the sample audit; each step the 24 rows of the 1-process step), weights
    within 1e-5, and the 88 kept rows of the test_source count once each on both."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dist_helpers import audit_rows
    from procs import cli_here

    make_categorical_table(tmp_path / "train.csv", 400, 0)
    make_categorical_table(tmp_path / "test.csv", 97, 1)
    arrow = pa.Table.from_pandas(pd.read_csv(tmp_path / "train.csv"), preserve_index=False)
    (tmp_path / "shards").mkdir()
    for k, (start, n) in enumerate(((0, 150), (150, 130), (280, 120))):
        pq.write_table(arrow.slice(start, n), tmp_path / f"shards/{k}.parquet", row_group_size=40)
    recipe = {
        "name": "stream-cats",
        "seed": 4,
        "data": {
            "source": f"parquet:{tmp_path / 'shards'}",
            "test_source": f"csv:{tmp_path / 'test.csv'}",
            "target": "label",
            "task": "multiclass",
            "missing": "drop",
            "standardize": True,
            "mode": "stream",
            "shuffle_buffer": 50,
            "num_workers": 1,
        },
        "model": {"layers": [{"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "batch_size": 24},
        "metrics": ["accuracy"],
    }
    path = tmp_path / "cats.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    one, two = tmp_path / "run1", tmp_path / "run2"
    audit = {"DIST_TRAIN_AUDIT_SAMPLES": "1", "WANDB_MODE": "disabled"}
    res = cli_here("train", str(path), "--output", str(one), **audit)
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli("train", str(path), "--output", str(two), nproc=2, **audit)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data.missing drop: 48 rows of" in res.stdout and "352 rows in 3 shard(s)" in res.stdout
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    assert (one / "columns.json").read_text() == (two / "columns.json").read_text()
    for log in sorted((two / "samples").glob("rank-*.log")):
        sizes: dict[int, list[int]] = {}
        for line in log.read_text().splitlines():
            epoch, _step, ids = line.split()
            sizes.setdefault(int(epoch), []).append(len(ids.split(",")))
        assert sizes == {0: [12] * 14, 1: [12] * 14}, sizes
    assert len(list((two / "samples").glob("rank-*.log"))) == 2
    got, want = audit_rows(two), audit_rows(one)
    assert sorted(got) == list(range(28)) and got == want
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
    t1, t2 = run_info(one)["test"], run_info(two)["test"]
    assert t1["test/rows"] == t2["test/rows"] == 88
    assert [e["test/rows"] for e in events(two, "test")] == [88]
    for key in ("test/loss", "test/accuracy"):
        assert abs(t1[key] - t2[key]) < 1e-5, key
