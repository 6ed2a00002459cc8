"""Tables as users have them on data.mode stream: strings, booleans, data.categorical and missing
cells encoded in the workers by the memory path's encoders, fitted in the stream's one scan (in
file order); data.missing drop keeps equal-length epochs; the test_source read map-style and
evaluated once with the best weights; eval/predict --data reuse columns.json."""

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

from procs import cli_here, max_diff, weights

from dist_train.config.schema import DataConfig
from dist_train.data.sources import load_data
from dist_train.data.stream import StreamRows, StreamTable
from dist_train.errors import UserError

CITIES = ["kyiv", "lima", "oslo", "rome", "suva"]


def table(rows: int, seed: int) -> pd.DataFrame:
    """Numbers (f1 with gaps), an int zone, a city (string, gaps), a boolean flag (gaps) and
    a 3-class label depending on all of them."""
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
    holes = rng.choice(rows, size=(3, max(rows // 25, 1)), replace=False)
    df.loc[holes[0], "f1"] = np.nan
    df.loc[holes[1], "city"] = None
    df.loc[holes[2], "flag"] = None
    return df


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("stream_columns")
    df = table(400, 0)
    df.to_csv(root / "train.csv", index=False)
    arrow = pa.Table.from_pandas(df, preserve_index=False)
    (root / "shards").mkdir()
    for k, (start, n) in enumerate(((0, 150), (150, 130), (280, 120))):
        pq.write_table(arrow.slice(start, n), root / f"shards/{k}.parquet", row_group_size=40)
    table(97, 1).to_csv(root / "test.csv", index=False)
    table(60, 3).to_csv(root / "valid.csv", index=False)
    new = table(30, 2)
    new.loc[[3, 7], "city"] = "zurich"  # unseen in training
    new.to_csv(root / "new.csv", index=False)
    return {k: root / v for k, v in (("csv", "train.csv"), ("shards", "shards"))} | {
        k: root / f"{k}.csv" for k in ("test", "valid", "new")
    }


def cfg(source: str, **kw) -> DataConfig:
    base = {"source": source, "target": "label", "task": "multiclass", "num_workers": 0}
    return DataConfig.model_validate(base | {"valid_fraction": 0, "shuffle_buffer": 0} | kw)


def stream_rows(t: StreamTable, per_device: int, steps: int, rank: int = 0, world: int = 1):
    """This rank's micro-batches of epoch 0 as (features, targets, row ids)."""
    rows = StreamRows(t, per_device, steps, 0, rank, world, t.cfg.shuffle_buffer)
    return list(rows.batches(0, 1))


@pytest.mark.parametrize(
    "kw",
    [
        {"missing": "impute", "standardize": True},
        {
            "missing": "drop",
            "categorical": {"city": "codes", "zone": "onehot"},
            "shape": [8],
            "standardize": True,
        },
        {"missing": "impute", "categorical": {"flag": "codes"}, "classes": [0, 2]},
    ],
)
def test_stream_encoders_rows_and_counts_equal_the_memory_path(files, kw):
    """One csv file streamed in file order (shuffle buffer 0): the same columns.json byte for
    byte, the same plan counts, targets, encoded rows (bitwise) and test rows as memory; the
    statistics of the encoded features within 1e-6."""
    kw |= {"test_source": f"csv:{files['test']}"}
    memory = load_data(cfg(f"csv:{files['csv']}", mode="memory", **kw), seed=1)
    stream = load_data(cfg(f"csv:{files['csv']}", mode="stream", **kw), seed=1)
    assert isinstance(stream.train, StreamTable)
    assert stream.encoder.to_json() == memory.encoder.to_json()
    notes = {m: b.notes for m, b in (("stream", stream), ("memory", memory))}
    # The test file's counts too: over the rows data.classes keeps, on both paths.
    assert notes["stream"] == notes["memory"] and stream.codes == memory.codes
    assert stream.input_shape == memory.input_shape and stream.classes == memory.classes
    assert torch.equal(stream.train.y, memory.train.y)
    (x, y, _ids), *rest = stream_rows(stream.train, len(stream.train), 1)
    assert not rest and torch.equal(x, memory.train.x) and torch.equal(y, memory.train.y)
    assert torch.equal(stream.train.head(2), memory.train.x[:2])
    assert torch.equal(stream.test.x, memory.test.x) and torch.equal(stream.test.y, memory.test.y)
    assert (stream.norm is None) == (memory.norm is None)
    for got, want in zip(stream.norm or (), memory.norm or (), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    notes = "\n".join(stream.notes)
    if kw["missing"] == "drop":
        assert len(stream.train) == 352 and "data.missing drop: 48 rows of" in notes
    else:
        assert "train split: imputed cells: f1" in notes
    assert "test: " in stream.plan


def test_drop_deals_kept_rows_to_ranks_in_equal_full_steps(files):
    """3 shards, drop: 352 kept rows, 14 steps of 24; on 2 ranks every step is 12 + 12 rows,
    the same 24 rows as one process, none a dropped row, none twice."""
    kw = {"missing": "drop", "shuffle_buffer": 50}
    t = load_data(cfg(f"parquet:{files['shards']}", mode="stream", **kw), seed=0).train
    assert len(t) == 352
    steps = len(t) // 24
    one = stream_rows(t, 24, steps)
    ranks = [stream_rows(t, 12, steps, r, 2) for r in (0, 1)]
    assert [len(one), len(ranks[0]), len(ranks[1])] == [steps] * 3
    for s in range(steps):
        assert [len(ranks[0][s][2]), len(ranks[1][s][2])] == [12, 12]
        both = torch.cat([ranks[0][s][2], ranks[1][s][2]])
        assert sorted(both.tolist()) == sorted(one[s][2].tolist())
        assert not torch.isnan(one[s][0]).any()
    seen = [i for b in one for i in b[2].tolist()]
    assert len(seen) == len(set(seen)) == steps * 24
    df = table(400, 0)
    gap = df[["f1", "city", "flag"]].isna().any(axis=1).to_numpy()
    starts = np.array([0, 150, 280])
    rows = [starts[i >> 32] + (i & 0xFFFFFFFF) for i in seen]
    assert not gap[rows].any()  # no dropped row trained


def test_stream_refusals_name_the_key_and_fix(files):
    with pytest.raises(UserError, match=r"data\.test_fraction 0\.2\); give data\.test_source"):
        load_data(cfg(f"csv:{files['csv']}", mode="stream", test_fraction=0.2), seed=0)
    with pytest.raises(UserError, match=r"feature `f1` is missing/NaN in row \d+ of .*set data"):
        load_data(cfg(f"parquet:{files['shards']}", mode="stream"), seed=0)
    with pytest.raises(UserError, match=r"data\.categorical: column `town` is not a feature"):
        load_data(cfg(f"csv:{files['csv']}", mode="stream", categorical={"town": "codes"}), seed=0)
    with pytest.raises(UserError, match=r"data\.shape \[3\] holds 3 values but rows have 9"):
        load_data(cfg(f"csv:{files['csv']}", mode="stream", missing="drop", shape=[3]), seed=0)


def test_stream_run_equals_memory_then_eval_and_predict_reuse_columns_json(files, tmp_path):
    """The CLI, one process: a string city (one-hot), a `codes` zone into an embedding layer,
    impute, a valid_source and a 97-row test_source, from one csv file (3 parquet shards:
    the imputed mean differs in its last float64 bits, sums per chunk). Full-batch steps
    (batch 400 = every row: the stream's order and memory's shuffle give the same step) on
    stream and memory: the
    same columns.json and plan counts, weights within 1e-5, the same test rows evaluated once
    with the best weights. eval/predict --data read the stream run's columns.json; predict
    encodes a city training never had as unknown (all-zero one-hot) and says so."""
    recipe = {
        "name": "stream-cats",
        "seed": 2,
        "data": {
            "source": f"csv:{files['csv']}",
            "valid_source": f"csv:{files['valid']}",
            "test_source": f"csv:{files['test']}",
            "target": "label",
            "task": "multiclass",
            "missing": "impute",
            "categorical": {"zone": "codes"},
            "standardize": True,
            "num_workers": 1,
        },
        "model": {"layers": [{"embedding": 2}, {"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9},
        "train": {"epochs": 4, "batch_size": 400},
        "metrics": ["accuracy"],
        "checkpoint": {"best": {"monitor": "valid/loss"}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    modes = {"stream": ["data.mode=stream"], "memory": ["data.mode=memory"]}
    runs, out = {}, {}
    for mode, over in modes.items():
        runs[mode] = tmp_path / mode
        r = cli_here("train", str(path), "-o", str(runs[mode]), *over, WANDB_MODE="disabled")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"data: {mode} (data.mode {mode})" in r.stdout
        out[mode] = [line.split("] ")[-1] for line in r.stdout.splitlines() if "source:" in line]
        out[mode] += [line.split("] ")[-1] for line in r.stdout.splitlines() if "split:" in line]
    assert out["stream"] == out["memory"] and any("imputed cells" in x for x in out["stream"])
    stream, mem = runs["stream"], runs["memory"]
    assert (stream / "columns.json").read_text() == (mem / "columns.json").read_text()
    cols = json.loads((stream / "columns.json").read_text())["columns"]
    assert [c["encoding"] for c in cols] == ["value", "value", "codes", "onehot", "value"]
    diff = max_diff(weights(stream / "model.safetensors"), weights(mem / "model.safetensors"))
    assert diff < 1e-5, diff
    tests = {m: json.loads((runs[m] / "run.json").read_text())["test"] for m in runs}
    assert tests["stream"]["test/rows"] == tests["memory"]["test/rows"] == 97
    assert tests["stream"]["test/weights"] == tests["memory"]["test/weights"]
    assert tests["stream"]["test/weights"].startswith("best")
    for key in ("test/loss", "test/accuracy"):
        assert tests["stream"][key] == pytest.approx(tests["memory"][key], abs=1e-5), key
    written = {}
    for tool, data in (("eval", files["test"]), ("predict", files["new"])):
        dest = tmp_path / f"{tool}.out"
        args = [tool, str(path), "--checkpoint", str(stream), "--data", f"csv:{data}"]
        r = cli_here(*args, "-o", str(dest), "data.mode=stream", WANDB_MODE="disabled")
        assert r.returncode == 0, r.stderr[-3000:]
        if tool == "predict":
            assert "categories unseen in training (encoded as unknown): city 2" in r.stdout
        written[tool] = dest.read_text()
    assert len(written["predict"].splitlines()) == 31  # header + every row, unseen included
    assert json.loads(written["eval"])["valid/rows"] == 97
