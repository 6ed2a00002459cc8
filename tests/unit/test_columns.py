"""Tables as users have them: string, boolean and missing cells through the column encoders
(data/columns.py), fitted on the training split only, stored in the run and reused by predict;
the held-out test split evaluated once with the best checkpoint's weights."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml
from procs import cli_here

from dist_train.config.schema import DataConfig
from dist_train.data.columns import TableEncoder
from dist_train.data.sources import load_data, load_table, split_rows
from dist_train.errors import UserError

N = 60
CITIES = ["kyiv", "lima", "oslo", "rome"]


def cfg(source: str, **kw) -> DataConfig:
    return DataConfig.model_validate(
        {"source": source, "task": "binary", "target": "label", "valid_fraction": 0.25, **kw}
    )


def frame(n: int = N, seed: int = 0) -> pd.DataFrame:
    """A number `a` (its row id, so rows are traceable after the split), a float `b`, a city,
    a boolean flag and a 0/1 label."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": np.arange(n, dtype=np.float64),
            "b": rng.normal(size=n),
            "city": rng.choice(CITIES, n),
            "flag": (rng.random(n) < 0.5).astype(object),
            "label": np.arange(n) % 2,
        }
    )


def split_of(n: int, **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    c = cfg("csv:x", **kw)
    train, valid, test = split_rows(n, c.valid_fraction, c.test_fraction, 0)
    return train.numpy(), valid.numpy(), None if test is None else test.numpy()


def test_vocabulary_and_imputed_values_come_from_the_training_rows_only(tmp_path):
    """A category only in validation rows is unseen (all-zero one-hot, counted); the imputed
    number is the training rows' mean, the imputed category their most frequent one, a
    boolean column is 0/1 (imputed with its more frequent value)."""
    df = frame()
    train, valid, _ = split_of(N)
    df.loc[valid[:3], "city"] = "zurich"  # only in validation rows
    df.loc[[train[0], valid[3]], "b"] = np.nan
    df.loc[[train[1], valid[4]], "city"] = None
    df.loc[train[2], "flag"] = None
    df.to_csv(tmp_path / "t.csv", index=False)
    bundle = load_data(cfg(f"csv:{tmp_path / 't.csv'}", missing="impute"), seed=0)
    enc = bundle.encoder
    cols = {c.name: c for c in enc.columns}
    assert [c.kind for c in enc.columns] == ["number", "number", "category", "bool"]
    assert cols["city"].vocab == CITIES  # no zurich: it never occurs in a training row
    train_rows = df.loc[train]
    assert cols["b"].fill == pytest.approx(train_rows["b"].mean())  # pandas skips the NaN
    assert cols["city"].fill == train_rows["city"].value_counts().idxmax()
    flags = train_rows["flag"].dropna().astype(bool)
    assert cols["flag"].fill == float(flags.mean() >= 0.5)
    assert enc.output_names == ["a", "b", *(f"city={c}" for c in CITIES), "flag"]
    assert bundle.input_shape == (7,)
    notes = "\n".join(bundle.notes)
    assert "train split: imputed cells: b 1, city 1, flag 1" in notes
    assert "valid split: imputed cells: b 1, city 1; categories unseen" in notes
    assert "city 3" in notes
    vx = bundle.valid.x
    by_row = {int(r): i for i, r in enumerate(vx[:, 0].tolist())}
    for r in valid[:3]:  # zurich: the all-zero block
        assert vx[by_row[int(r)], 2:6].tolist() == [0, 0, 0, 0]
    mode = CITIES.index(cols["city"].fill)
    assert vx[by_row[int(valid[4])], 2 + mode] == 1  # imputed with the training mode
    assert vx[by_row[int(valid[3])], 1] == pytest.approx(cols["b"].fill)
    tx = bundle.train.x  # every training row is one-hot with exactly one 1; flags 0/1
    assert torch.all(tx[:, 2:6].sum(1) == 1) and set(tx[:, 6].tolist()) <= {0.0, 1.0}
    row = {int(r): i for i, r in enumerate(tx[:, 0].tolist())}
    for r in train[3:10]:
        assert tx[row[int(r)], 6] == float(bool(df.loc[r, "flag"]))
        assert tx[row[int(r)], 2 + CITIES.index(df.loc[r, "city"])] == 1


def test_drop_counts_and_codes_and_error_names_row_and_column(tmp_path):
    df = frame()
    df.loc[[4, 9, 30], "b"] = np.nan
    df.loc[11, "city"] = None
    path = tmp_path / "t.parquet"
    df.to_parquet(path, index=False)
    bundle = load_data(
        cfg(f"parquet:{path}", missing="drop", categorical={"city": "codes"}), seed=0
    )
    kept = sorted(torch.cat([bundle.train.x[:, 0], bundle.valid.x[:, 0]]).int().tolist())
    assert kept == [r for r in range(N) if r not in (4, 9, 30, 11)]
    assert any("4 rows of parquet:" in n for n in bundle.notes), bundle.notes
    assert bundle.input_shape == (4,)  # a, b, city (one code), flag
    codes = bundle.train.x[:, 2]
    expect = [CITIES.index(df.loc[int(r), "city"]) + 1 for r in bundle.train.x[:, 0].tolist()]
    assert codes.int().tolist() == expect  # 1..K; 0 is kept for unseen categories
    # eval/predict --data under drop: the rows with gaps are skipped, the file's row numbers
    # of the others kept (predict's `row` column), their targets with them.
    c = cfg(f"parquet:{path}", missing="drop", categorical={"city": "codes"})
    table, has_target = load_table(
        f"parquet:{path}", c, bundle.classes, bundle.feature_names, True, bundle.encoder
    )
    assert has_target and table.rows.tolist() == kept
    assert table.x[:, 0].int().tolist() == kept and table.y.tolist() == [r % 2 for r in kept]
    assert "4 of 60 rows dropped for missing features" in table.note
    with pytest.raises(UserError, match=r"feature `b` is missing/NaN in row 4 of parquet:"):
        load_data(cfg(f"parquet:{path}"), seed=0)


def test_unseen_category_at_predict_time_and_arrow_batches(tmp_path, monkeypatch):
    """load_table (eval/predict --data) with a stored encoder: an unseen category is all-zero
    one-hot / code 0 and counted, never an error; applying the encoder per Arrow record batch
    (the lazy path) gives the rows of the whole-table transform; JSON round trip is exact."""
    df = frame()
    df.to_csv(tmp_path / "t.csv", index=False)
    c = cfg(f"csv:{tmp_path / 't.csv'}", missing="impute", categorical={"flag": "codes"})
    bundle = load_data(c, seed=0)
    enc = TableEncoder.from_json(bundle.encoder.to_json())
    new = frame(8, seed=1).drop(columns="label")
    new.loc[2, "city"] = "paris"
    new.loc[3, "b"] = np.nan
    new.to_csv(tmp_path / "new.csv", index=False)
    table, has_target = load_table(
        f"csv:{tmp_path / 'new.csv'}", c, bundle.classes, bundle.feature_names, False, enc
    )
    assert not has_target and table.x.shape == (8, 7) and table.rows.tolist() == list(range(8))
    assert table.x[2, 2:6].tolist() == [0, 0, 0, 0]
    assert "imputed cells: b 1" in table.note and "unseen in training" in table.note
    assert "city 1" in table.note
    assert table.x[3, 1] == pytest.approx(enc.columns[1].fill)
    arrow = pa.Table.from_pandas(new, preserve_index=False)
    whole = enc.transform(arrow)
    parts = [enc.transform(b) for b in arrow.to_batches(max_chunksize=3)]
    assert len(parts) == 3 and np.array_equal(np.concatenate(parts), whole)
    from dist_train.data import columns

    monkeypatch.setattr(columns, "ROW_BLOCK", 3)  # the whole table in row blocks of 3
    assert np.array_equal(enc.transform(arrow), whole)
    assert enc.last_counts.unseen == {"city": 1} and enc.last_counts.imputed == {"b": 1}
    assert np.array_equal(whole, table.x.numpy())
    assert enc.to_json() == bundle.encoder.to_json()
    # Fitted in one streaming pass over record batches (the lazy path): the same encoder.
    rows = pa.Table.from_pandas(frame(), preserve_index=False)
    names = ["a", "b", "city", "flag"]
    whole_fit = TableEncoder.fit(rows, names, "impute", {"flag": "codes"})
    streamed = TableEncoder.fit_batches(
        rows.to_batches(max_chunksize=7), names, "impute", {"flag": "codes"}
    )
    assert [c.vocab for c in streamed.columns] == [c.vocab for c in whole_fit.columns]
    for got, want in zip(streamed.columns, whole_fit.columns, strict=True):
        assert got.kind == want.kind and got.fill == pytest.approx(want.fill)


def test_test_fraction_is_a_disjoint_seeded_split_before_validation():
    train, valid, test = split_of(100, test_fraction=0.2)
    assert len(test) == 20 and len(valid) == 25 and len(train) == 55
    assert len(set(train) | set(valid) | set(test)) == 100
    # One seeded permutation: without a test split validation is its first 25 rows (the
    # split runs made before test_fraction existed); with one, the test rows come first.
    _, no_test_valid, none = split_of(100)
    assert none is None and len(no_test_valid) == 25
    assert np.array_equal(no_test_valid[:20], test)
    with pytest.raises(UserError, match="leave none of the 3 rows"):
        split_rows(3, 0.5, 0.4, 0)


def test_csv_run_with_strings_bools_gaps_test_split_then_predict_unseen(tmp_path):
    """One process, the CLI: a csv with string, boolean and empty cells trains (impute), the
    held-out test rows are evaluated once with the best checkpoint and their metrics equal a
    hand evaluation of that checkpoint's weights on the test rows; predict --data on a file
    with an unseen category writes every row."""
    from torchmetrics.functional.classification import binary_accuracy

    from dist_train.build import build_components
    from dist_train.config.recipe import load_recipe
    from dist_train.tools.predict import load_into

    rng = np.random.default_rng(0)
    n = 200
    df = frame(n)
    df["a"] = rng.normal(size=n)
    df["label"] = ((df["b"] > 0) ^ (df["city"] == "rome")).astype(int)
    df.loc[[3, 50], "b"] = np.nan
    df.loc[7, "city"] = None
    df.loc[9, "flag"] = None
    df.to_csv(tmp_path / "train.csv", index=False)
    new = df.iloc[:12].drop(columns="label").copy()
    new.loc[0, "city"] = "paris"
    new.to_csv(tmp_path / "new.csv", index=False)
    recipe = {
        "name": "cats",
        "seed": 0,
        "data": {
            "source": f"csv:{tmp_path / 'train.csv'}",
            "target": "label",
            "task": "binary",
            "missing": "impute",
            "test_fraction": 0.2,
            "standardize": True,
        },
        "model": {"layers": [{"linear": 16}, "relu", {"linear": "out"}]},
        "loss": "bce_with_logits",
        "optimizer": {"name": "adam", "lr": 0.02},
        "train": {"epochs": 4, "batch_size": 20},
        "metrics": ["accuracy"],
        "checkpoint": {"best": {"monitor": "valid/loss"}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    res = cli_here("train", str(tmp_path / "r.yaml"), "--output", str(run))
    assert res.returncode == 0, res.stderr
    imputed = [line for line in res.stdout.splitlines() if "imputed cells:" in line]
    counts = [int(c.split()[-1]) for line in imputed for c in line.split(": ", 2)[2].split(",")]
    assert sum(counts) == 4, imputed  # the four empty cells, wherever the split put them
    assert "test: 40 held-out rows (data.test_fraction 0.2)" in res.stdout
    info = json.loads((run / "run.json").read_text())
    test = info["test"]
    best = info["best_step"]
    assert test["test/rows"] == 40
    assert test["test/weights"] == f"best checkpoint (step {best}, model.safetensors)"
    assert f"test (best checkpoint (step {best}" in res.stdout
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["test/loss"] for e in logged if e["event"] == "test"] == [test["test/loss"]]
    stored = json.loads((run / "columns.json").read_text())
    assert stored["columns"][2]["vocab"] == CITIES
    # By hand: the recipe's data (same split and encoders), the best checkpoint's weights.
    r = load_recipe(str(tmp_path / "r.yaml"), [])
    built = build_components(r, None, finetune=False, optimizer=False)
    assert built.data.encoder.to_json().strip() == (run / "columns.json").read_text().strip()
    load_into(built.model, str(run / "checkpoints" / f"step-{best:06d}"))
    built.model.eval()
    with torch.no_grad():
        out = built.model(built.data.test.x).squeeze(-1)
    y = built.data.test.y
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y.float())
    assert test["test/loss"] == pytest.approx(float(loss), abs=1e-6)
    acc = float(binary_accuracy(torch.sigmoid(out), y))
    assert test["test/accuracy"] == pytest.approx(acc, abs=1e-6)
    res = cli_here(
        "predict",
        str(tmp_path / "r.yaml"),
        "--checkpoint",
        str(run),
        "--data",
        f"csv:{tmp_path / 'new.csv'}",
    )
    assert res.returncode == 0, res.stderr
    assert "categories unseen in training (encoded as unknown): city 1" in res.stdout
    preds = (run / "preds.csv").read_text().splitlines()
    assert len(preds) == 13 and preds[0] == "row,prediction,prob_1"
    assert [int(p.split(",")[0]) for p in preds[1:]] == list(range(12))


def test_embedding_layer_reads_the_codes_columns(tmp_path):
    """`data.categorical: {city: codes}` + `embedding: 2` as the first layer: the code column
    is kept out of standardisation, embedded (unseen code 0 -> the zero vector, untrained) and
    concatenated after the other features; without a codes column, or not first, exit 2."""
    from dist_train.build import build_components
    from dist_train.config.schema import Recipe
    from dist_train.model.net import EmbedCodes

    frame().to_csv(tmp_path / "t.csv", index=False)
    raw = {
        "name": "emb",
        "seed": 0,
        "data": {
            "source": f"csv:{tmp_path / 't.csv'}",
            "target": "label",
            "task": "binary",
            "categorical": {"city": "codes"},
            "standardize": True,
        },
        "model": {"layers": [{"embedding": 2}, {"linear": 8}, "relu", {"linear": "out"}]},
        "loss": "bce_with_logits",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "train": {"epochs": 1, "batch_size": 8},
    }
    built = build_components(Recipe.model_validate(raw), None, finetune=False, optimizer=False)
    data, net = built.data, built.model
    assert data.codes == [(2, 4)] and data.input_shape == (4,)  # a, b, city code, flag
    assert float(data.norm[0][2]) == 0.0 and float(data.norm[1][2]) == 1.0
    embed = net.layers[0]
    assert isinstance(embed, EmbedCodes) and net.layers[1].in_features == 3 + 2
    x = data.train.x[:5].clone()
    out = embed(x)
    assert torch.equal(out[:, :3], x[:, [0, 1, 3]])
    assert torch.equal(out[:, 3:], embed.tables[0].weight[x[:, 2].long()])
    x[:, 2] = 0  # a category unseen at fit time
    assert torch.equal(embed(x)[:, 3:], torch.zeros(5, 2))
    keys = [k for k in net.state_dict() if k.startswith("layers.0.")]
    assert keys == ["layers.0.tables.0.weight"]  # the index buffers come from columns.json
    del raw["data"]["categorical"]
    with pytest.raises(UserError, match=r"model.layers\[0\] \(embedding\).*no feature column"):
        build_components(Recipe.model_validate(raw), None, finetune=False, optimizer=False)
    raw["data"]["categorical"] = {"city": "codes"}
    raw["model"]["layers"] = [{"linear": 8}, {"embedding": 2}, {"linear": "out"}]
    with pytest.raises(UserError, match="must be the first layer"):
        build_components(Recipe.model_validate(raw), None, finetune=False, optimizer=False)
