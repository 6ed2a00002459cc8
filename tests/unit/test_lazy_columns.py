"""Tables as users have them on data.mode lazy: strings, booleans, data.categorical and missing
cells encoded per fetch by the memory path's encoders (fitted on the training split in one
chunked pass), the held-out test split, and eval/predict --data reusing columns.json; the
same split rows, encoded features, counts and weights as the memory path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procs import bitwise_equal, cli_here, weights

from dist_train.config.schema import DataConfig
from dist_train.data.rows import LazyTable
from dist_train.data.sources import load_data
from dist_train.errors import UserError

CITIES = ["kyiv", "lima", "oslo", "rome", "suva"]


def table(rows: int, seed: int, gaps: bool = True) -> pd.DataFrame:
    """Numbers (f1 with gaps), an int column, a city (string, gaps), a boolean flag (gaps)
    and a 3-class label that depends on all of them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 2))
    city = rng.choice(CITIES, rows)
    flag = rng.random(rows) < 0.4
    zone = rng.integers(0, 4, rows)
    score = x[:, 0] + 0.5 * x[:, 1] + np.where(city == "rome", 1.5, 0) - flag + 0.2 * zone
    df = pd.DataFrame(
        {
            "f0": x[:, 0],
            "f1": x[:, 1],
            "zone": zone,
            "city": city,
            "flag": flag.astype(object),
            "label": np.digitize(score, [-0.5, 0.7]),
        }
    )
    if gaps:
        holes = rng.choice(rows, size=(3, max(rows // 25, 1)), replace=False)
        df.loc[holes[0], "f1"] = np.nan
        df.loc[holes[1], "city"] = None
        df.loc[holes[2], "flag"] = None
    return df


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same rows as a csv (memory and lazy) and as 3 parquet shards (lazy); a 97-row
    test file and a predict file with a city training never had."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("lazy_columns")
    df = table(400, 0)
    df.to_csv(root / "train.csv", index=False)
    arrow = pa.Table.from_pandas(df, preserve_index=False)
    (root / "shards").mkdir()
    for k, (start, n) in enumerate(((0, 150), (150, 130), (280, 120))):
        pq.write_table(arrow.slice(start, n), root / f"shards/{k}.parquet")
    pq.write_table(arrow, root / "train.parquet")
    table(97, 1).to_csv(root / "test.csv", index=False)
    new = table(30, 2)
    new.loc[[3, 7], "city"] = "zurich"  # unseen in training
    new.to_csv(root / "new.csv", index=False)
    return {
        "csv": root / "train.csv",
        "parquet": root / "train.parquet",
        "shards": root / "shards",
        "test": root / "test.csv",
        "new": root / "new.csv",
    }


def cfg(source: str, **kw) -> DataConfig:
    base = {"source": source, "target": "label", "task": "multiclass", "num_workers": 0}
    return DataConfig.model_validate(base | kw)


def rows_of(t) -> torch.Tensor:
    return t.source.fetch(t.ids) if isinstance(t, LazyTable) else t.x


def assert_same_bundle(lazy, memory) -> None:
    assert isinstance(lazy.train, LazyTable) and not isinstance(memory.train, LazyTable)
    assert lazy.encoder.to_json() == memory.encoder.to_json()  # the same columns.json
    assert lazy.notes == memory.notes  # the same counts in the plan
    assert lazy.input_shape == memory.input_shape and lazy.classes == memory.classes
    assert lazy.codes == memory.codes
    for name in ("train", "valid", "test"):
        a, b = getattr(lazy, name), getattr(memory, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a.y, b.y), name  # the same rows in the same order
            assert torch.equal(rows_of(a), b.x), name  # encoded bitwise alike
    assert (lazy.norm is None) == (memory.norm is None)
    if memory.norm is not None:
        for got, want in zip(lazy.norm, memory.norm, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("where", "kw"),
    [
        ("shards", {"missing": "impute", "test_fraction": 0.2, "standardize": True}),
        ("csv", {"missing": "drop", "categorical": {"city": "codes", "zone": "onehot"}}),
        ("parquet", {"missing": "impute", "categorical": {"flag": "codes"}, "classes": [0, 2]}),
    ],
)
def test_lazy_encoded_splits_equal_the_memory_path(files, tmp_path, where, kw):
    memory = load_data(cfg(f"csv:{files['csv']}", mode="memory", **kw), seed=4)
    source = f"csv:{files['csv']}" if where == "csv" else f"parquet:{files[where]}"
    lazy = load_data(cfg(source, mode="lazy", cache_dir=str(tmp_path), **kw), seed=4)
    assert_same_bundle(lazy, memory)
    notes = "\n".join(lazy.notes)
    if kw["missing"] == "drop":
        assert "data.missing drop: 48 rows of" in notes  # 16 gaps per column, none shared
        assert len(lazy.train) + len(lazy.valid) == 352
    else:
        assert "train split: imputed cells: f1" in notes
    if "test_fraction" in kw:
        assert len(lazy.test) == 80 and "test: 80 held-out rows" in notes


def test_lazy_test_and_valid_sources_equal_the_memory_path(files, tmp_path):
    kw = {
        "missing": "impute",
        "test_source": f"csv:{files['test']}",
        "valid_source": f"csv:{files['new']}",
        "standardize": True,
    }
    memory = load_data(cfg(f"csv:{files['csv']}", mode="memory", **kw), seed=1)
    lazy = load_data(
        cfg(f"parquet:{files['shards']}", mode="lazy", cache_dir=str(tmp_path), **kw), seed=1
    )
    assert_same_bundle(lazy, memory)
    assert len(lazy.test) == 97 and len(lazy.valid) == 30
    assert "valid source: " in "\n".join(lazy.notes) and "city 2" in "\n".join(lazy.notes)


def test_chunked_fit_and_fetch_across_record_batches(files, tmp_path, monkeypatch):
    """Fit chunks of 7 rows (the memory path's chunks too) gathered across 3 shards: still
    the memory path's encoder and rows; the mean imputed differs from one chunk's in the last
    float64 bits only (sums per chunk)."""
    from dist_train.data import sources

    kw = {"missing": "impute", "standardize": True}
    lazy = cfg(f"parquet:{files['shards']}", mode="lazy", cache_dir=str(tmp_path), **kw)
    whole = load_data(lazy, seed=0)
    monkeypatch.setattr(sources, "TAKE_CHUNK", 7)
    memory = load_data(cfg(f"csv:{files['csv']}", mode="memory", **kw), seed=0)
    chunked = load_data(lazy, seed=0)
    assert_same_bundle(chunked, memory)
    fills = [
        (c.fill, w.fill)
        for c, w in zip(chunked.encoder.columns, whole.encoder.columns, strict=True)
    ]
    assert fills[1][0] == pytest.approx(fills[1][1], rel=1e-12)  # f1: the mean
    assert [f for f, _ in fills[2:]] == [w for _, w in fills[2:]]  # modes: order-free


def test_lazy_column_errors_are_user_errors(files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lazy = {"mode": "lazy", "cache_dir": str(tmp_path)}
    with pytest.raises(UserError) as err:  # data.missing error: the memory path's message
        load_data(cfg(f"parquet:{files['shards']}", **lazy), seed=0)
    with pytest.raises(UserError) as mem:
        load_data(cfg(f"csv:{files['csv']}", mode="memory"), seed=0)
    assert str(err.value).split(" of ")[0] == str(mem.value).split(" of ")[0]
    assert "set data.missing: drop" in str(err.value)
    pq.write_table(
        pa.table({"a": [[1, 2], [3]], "b": [1.0, 2.0], "label": [0, 1]}), tmp_path / "l.parquet"
    )
    with pytest.raises(UserError, match=r"column `a` of .* holds list<.*> values, neither numbers"):
        load_data(cfg(f"parquet:{tmp_path / 'l.parquet'}", task="binary", **lazy), seed=0)
    with pytest.raises(UserError, match=r"data\.categorical: column `town` is not a feature"):
        load_data(
            cfg(
                f"parquet:{files['shards']}", missing="drop", categorical={"town": "codes"}, **lazy
            ),
            seed=0,
        )


def test_lazy_run_is_bitwise_the_memory_run_then_eval_and_predict_reuse_columns_json(
    files, tmp_path
):
    """One process, the CLI: a categorical table with gaps (impute), a `codes` column into an
    embedding layer and a test_fraction split trains on lazy (3 parquet shards, a DataLoader
    worker) to bitwise the memory run's weights, with the same columns.json, plan counts and
    test metrics (80 rows); eval --data and predict --data (a city training never had) on lazy
    read columns.json and write what the memory path writes."""
    recipe = {
        "name": "lazy-cats",
        "seed": 2,
        "data": {
            "target": "label",
            "task": "multiclass",
            "missing": "impute",
            "categorical": {"zone": "codes"},
            "test_fraction": 0.2,
            "standardize": False,
        },
        "model": {"layers": [{"embedding": 2}, {"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2, "batch_size": 24},
        "metrics": ["accuracy"],
        "checkpoint": {"best": {"monitor": "valid/loss"}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    modes = {
        "memory": [f"data.source=csv:{files['csv']}", "data.mode=memory"],
        "lazy": [f"data.source=parquet:{files['shards']}", "data.mode=lazy", cache],
    }
    runs, out = {}, {}
    for mode, over in modes.items():
        runs[mode] = tmp_path / mode
        args = ["train", str(path), "-o", str(runs[mode]), *over, "data.num_workers=1"]
        r = cli_here(*args, WANDB_MODE="disabled")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"data: {mode} (data.mode {mode})" in r.stdout
        out[mode] = [line.split("] ")[-1] for line in r.stdout.splitlines() if "split:" in line]
    assert out["lazy"] == out["memory"] and any("imputed cells" in x for x in out["lazy"])
    mem, lazy = runs["memory"], runs["lazy"]
    assert (lazy / "columns.json").read_text() == (mem / "columns.json").read_text()
    assert bitwise_equal(weights(lazy / "model.safetensors"), weights(mem / "model.safetensors"))
    tests = {m: json.loads((runs[m] / "run.json").read_text())["test"] for m in runs}
    assert tests["lazy"]["test/rows"] == tests["memory"]["test/rows"] == 80
    for key in ("test/loss", "test/accuracy"):
        assert tests["lazy"][key] == tests["memory"][key], key
    assert tests["lazy"]["test/weights"] == tests["memory"]["test/weights"]
    # eval/predict --data on lazy: columns.json of the run (the recipe's data line not needed)
    written = {}
    for mode, over in modes.items():
        for tool, data in (("eval", files["test"]), ("predict", files["new"])):
            dest = tmp_path / f"{mode}-{tool}.out"
            args = [tool, str(path), "--checkpoint", str(runs[mode]), "--data", f"csv:{data}"]
            r = cli_here(*args, "-o", str(dest), *over, WANDB_MODE="disabled")
            assert r.returncode == 0, r.stderr[-3000:]
            if tool == "predict":
                assert "categories unseen in training (encoded as unknown): city 2" in r.stdout
            written[mode, tool] = dest.read_text()
    assert written["lazy", "predict"] == written["memory", "predict"]
    assert len(written["lazy", "predict"].splitlines()) == 31
    evals = {m: json.loads(written[m, "eval"]) for m in modes}
    assert evals["lazy"]["valid/rows"] == 97
    for key in ("valid/loss", "valid/accuracy"):
        assert evals["lazy"][key] == pytest.approx(evals["memory"][key], abs=1e-6), key


@pytest.mark.parametrize("missing", ["impute", "drop"])
def test_another_files_counts_cover_the_rows_data_classes_keeps(files, tmp_path, missing):
    """eval/predict `--data` (and the stream path's valid/test sources) count imputed, dropped
    and unseen cells over the rows data.classes keeps, as the training source is counted:
    lazy and memory give the same note, and it differs from the count over every row."""
    from dist_train.data.sources import load_table

    kw = {"missing": missing, "classes": [0, 2]}
    memory = load_data(cfg(f"csv:{files['csv']}", mode="memory", **kw), seed=1)
    feats = memory.feature_names
    labels = pd.read_csv(files["test"])["label"]
    notes, sizes = {}, {}
    for mode in ("memory", "lazy"):
        c = cfg(f"csv:{files['csv']}", mode=mode, cache_dir=str(tmp_path), **kw)
        t, _ = load_table(f"csv:{files['test']}", c, memory.classes, feats, encoder=memory.encoder)
        notes[mode], sizes[mode] = t.note, len(t.y)
    assert notes["lazy"] == notes["memory"] and notes["memory"]
    assert sizes["lazy"] == sizes["memory"] <= int(labels.isin([0, 2]).sum()) < len(labels)
    every = cfg(f"csv:{files['csv']}", mode="memory", missing=missing)
    t, _ = load_table(f"csv:{files['test']}", every, [0, 1, 2], feats, encoder=memory.encoder)
    assert t.note != notes["memory"]  # 97 rows counted, not the filtered ones
