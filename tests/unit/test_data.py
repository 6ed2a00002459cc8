"""Data sources through `datasets`, label encoding, seeded splits, train-only standardization and
the whole-batch loader, on small files made in tmp_path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dist_train.config.schema import DataConfig
from dist_train.data.images import unit_float
from dist_train.data.loaders import TensorRows, make_loader
from dist_train.data.sources import SKLEARN_SETS, Table, load_data
from dist_train.errors import UserError

N = 40


def cfg(source: str, **kw) -> DataConfig:
    return DataConfig.model_validate({"source": source, "task": "multiclass", **kw})


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "row": np.arange(N, dtype=np.float64),  # identifies each row after the split
            "f1": rng.normal(3.0, 2.0, N),
            "f2": rng.uniform(-1, 5, N),
            "target": np.arange(N) % 3,
        }
    )


def _check_table(bundle, frame: pd.DataFrame) -> None:
    """Every row arrives once, with its features and its label encoded 0..K-1."""
    x = torch.cat([bundle.train.x, bundle.valid.x])
    y = torch.cat([bundle.train.y, bundle.valid.y])
    order = x[:, 0].argsort()
    expected = torch.tensor(frame[["row", "f1", "f2"]].to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(x[order], expected)
    assert y[order].tolist() == frame["target"].tolist()
    assert bundle.classes == [0, 1, 2]
    assert bundle.feature_names == ["row", "f1", "f2"]
    assert bundle.input_shape == (3,)
    assert bundle.train.y.dtype == torch.int64 and bundle.train.x.dtype == torch.float32


@pytest.mark.parametrize("kind", ["csv", "parquet", "json"])
def test_file_sources(tmp_path, frame, kind):
    path = tmp_path / f"data.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    _check_table(load_data(cfg(f"{kind}:{path}"), seed=0), frame)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_empty_cells_and_string_labels_read_the_same_from_every_file_kind(tmp_path, kind):
    """Numbers, booleans, strings and empty cells come out identically whether the file is
    read by `datasets` (csv) or by pyarrow directly (parquet): a missing number is named by
    row; string labels are encoded in sorted order."""

    frame = pd.DataFrame(
        {
            "a": [1, 2, 3, 4, 5, 6],
            "flag": [True, False, True, True, False, False],
            "label": ["cat", "dog", "cat", "eel", "dog", "cat"],
        }
    )
    path = tmp_path / f"data.{kind}"
    getattr(frame, f"to_{kind}")(path, index=False)
    bundle = load_data(cfg(f"{kind}:{path}", target="label", valid_fraction=0), seed=0)
    assert bundle.classes == ["cat", "dog", "eel"]
    assert sorted(bundle.train.x[:, 0].tolist()) == [1, 2, 3, 4, 5, 6]
    assert bundle.train.x[:, 1].sum() == 3
    frame["a"] = frame["a"].astype("Int64")
    frame.loc[3, "a"] = None
    getattr(frame, f"to_{kind}")(path, index=False)
    with pytest.raises(UserError, match=r"`a` is missing/NaN in row 3"):
        load_data(cfg(f"{kind}:{path}", target="label", valid_fraction=0), seed=0)
    path.write_bytes(b"not a table at all\x00\x01")
    if kind == "parquet":
        with pytest.raises(UserError, match="cannot parse"):
            load_data(cfg(f"{kind}:{path}", target="label", valid_fraction=0), seed=0)


def test_disk_source(tmp_path, frame):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_pandas(frame, preserve_index=False),
            "test": datasets.Dataset.from_pandas(frame.iloc[:6], preserve_index=False),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    _check_table(load_data(cfg(f"disk:{tmp_path / 'ds'}"), seed=0), frame)
    test = load_data(cfg(f"disk:{tmp_path / 'ds'}", split="test", valid_fraction=0), seed=0)
    assert len(test.train.y) == 6 and test.valid is None
    with pytest.raises(UserError, match="has splits"):
        load_data(cfg(f"disk:{tmp_path / 'ds'}", split="validation"), seed=0)


def _images(root, per_class: int = 4, size=(6, 5)) -> dict[str, list[np.ndarray]]:
    """PNGs in root/<class>/; returns the pixel arrays written, per class."""
    rng = np.random.default_rng(1)
    written = {}
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
            written[name].append(arr)
    return written


def test_imagefolder_source(tmp_path):
    written = _images(tmp_path / "img")
    bundle = load_data(
        cfg(
            f"imagefolder:{tmp_path / 'img'}", target="label", valid_fraction=0.25, standardize=True
        ),
        seed=0,
    )
    assert bundle.classes == ["cat", "dog"]
    assert bundle.input_shape == (3, 6, 5)
    x = torch.cat([bundle.train.x, bundle.valid.x])
    y = torch.cat([bundle.train.y, bundle.valid.y])
    assert len(x) == 8 and sorted(y.tolist()) == [0] * 4 + [1] * 4
    assert x.dtype == torch.uint8  # pixels stay bytes until a batch reaches the model
    # every written image arrives as CHW with its class; on the device it becomes exactly the
    # float32 division numpy gives (what this path produced before it kept bytes)
    for label, name in enumerate(("cat", "dog")):
        for arr in written[name]:
            want = torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255)
            hits = [i for i in range(len(x)) if torch.equal(unit_float(x[i]), want)]
            assert len(hits) == 1 and y[hits[0]] == label
    # per-channel statistics of the train split only, of the [0, 1] values
    mean, std = bundle.norm
    assert mean.shape == (3, 1, 1) and std.shape == (3, 1, 1)
    train = unit_float(bundle.train.x).double()
    torch.testing.assert_close(mean.flatten(), train.mean((0, 2, 3)).float())
    torch.testing.assert_close(std.flatten(), train.std((0, 2, 3)).float())


def test_imagefolder_grayscale_and_resize(tmp_path):
    _images(tmp_path / "img", per_class=2)
    bundle = load_data(
        cfg(
            f"imagefolder:{tmp_path / 'img'}",
            target="label",
            channels=1,
            image_size=[4, 4],
            valid_fraction=0,
        ),
        seed=0,
    )
    assert bundle.input_shape == (1, 4, 4)


def test_imagefolder_corrupt_image_names_the_file(tmp_path):
    _images(tmp_path / "img", per_class=2)
    (tmp_path / "img" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(UserError, match=r"broken\.png") as err:
        load_data(cfg(f"imagefolder:{tmp_path / 'img'}", target="label"), seed=0)
    assert "remove or replace" in str(err.value)


def test_imagefolder_missing_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_data(cfg(f"imagefolder:{tmp_path / 'nope'}", target="label"), seed=0)


@pytest.mark.parametrize("name", SKLEARN_SETS)
def test_sklearn_sources(name):
    task = "regression" if name == "diabetes" else "multiclass"
    extra = {"shape": [1, 8, 8]} if name == "digits" else {}
    bundle = load_data(DataConfig(source=f"sklearn:{name}", task=task, **extra), seed=0)
    n = len(bundle.train.y) + len(bundle.valid.y)
    rows = {"digits": 1797, "iris": 150, "wine": 178, "breast_cancer": 569, "diabetes": 442}
    assert n == rows[name]
    assert len(bundle.valid.y) == round(0.2 * n)
    if name == "digits":
        assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    if task == "regression":
        assert bundle.classes is None and bundle.train.y.dtype == torch.float32


def test_unknown_sklearn_set_and_kind():
    with pytest.raises(UserError, match="scikit-learn ships"):
        load_data(cfg("sklearn:mnist"), seed=0)
    with pytest.raises(UserError, match=r"(?i)did you mean `csv`"):
        load_data(cfg("cvs:x.csv"), seed=0)


def _csv(tmp_path, frame, name="data.csv"):
    frame.to_csv(tmp_path / name, index=False)
    return f"csv:{tmp_path / name}"


def test_split_is_seeded_deterministic_and_disjoint(tmp_path, frame):
    source = _csv(tmp_path, frame)
    a, b = load_data(cfg(source), seed=0), load_data(cfg(source), seed=0)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.valid.x, b.valid.x)
    train_rows, valid_rows = set(a.train.x[:, 0].tolist()), set(a.valid.x[:, 0].tolist())
    assert not train_rows & valid_rows
    assert train_rows | valid_rows == set(range(N))
    assert len(valid_rows) == round(N * 0.2)
    other = load_data(cfg(source), seed=1)
    assert set(other.valid.x[:, 0].tolist()) != valid_rows
    # split_seed wins over the recipe seed
    pinned = load_data(cfg(source, split_seed=0), seed=1)
    assert set(pinned.valid.x[:, 0].tolist()) == valid_rows


def test_standardize_uses_train_split_only(tmp_path, frame):
    bundle = load_data(cfg(_csv(tmp_path, frame), standardize=True), seed=0)
    mean, std = bundle.norm
    train = torch.tensor(
        frame.iloc[bundle.train.x[:, 0].long().numpy()][["row", "f1", "f2"]].to_numpy(),
        dtype=torch.float32,
    )
    torch.testing.assert_close(mean, train.mean(0))
    torch.testing.assert_close(std, train.std(0))
    everything = torch.tensor(frame[["row", "f1", "f2"]].to_numpy(), dtype=torch.float32)
    assert not torch.allclose(mean, everything.mean(0))
    # raw features are kept: the model's Standardize layer applies the statistics
    assert torch.equal(bundle.train.x, train)
    assert load_data(cfg(_csv(tmp_path, frame)), seed=0).norm is None


def test_standardize_constant_feature_gets_unit_std(tmp_path, frame):
    frame["f2"] = 7.0
    _, std = load_data(cfg(_csv(tmp_path, frame), standardize=True), seed=0).norm
    assert std[2] == 1.0


def test_classes_filter_and_encoding_order(tmp_path, frame):
    bundle = load_data(cfg(_csv(tmp_path, frame), classes=[2, 0], valid_fraction=0), seed=0)
    assert bundle.classes == [2, 0]
    rows = bundle.train.x[:, 0].long()
    labels = frame["target"].to_numpy()[rows.numpy()]
    assert set(labels.tolist()) == {0, 2}  # label 1 dropped
    assert len(rows) == int((frame["target"] != 1).sum())
    assert bundle.train.y.tolist() == [0 if v == 2 else 1 for v in labels]


def test_string_labels_encoded_in_sorted_order(tmp_path, frame):
    frame["target"] = np.array(["setosa", "virginica", "versicolor"])[frame["target"]]
    bundle = load_data(cfg(_csv(tmp_path, frame), valid_fraction=0), seed=0)
    assert bundle.classes == ["setosa", "versicolor", "virginica"]
    names = frame["target"].to_numpy()[bundle.train.x[:, 0].long().numpy()]
    assert [bundle.classes[i] for i in bundle.train.y.tolist()] == names.tolist()


def test_binary_needs_two_labels(tmp_path, frame):
    with pytest.raises(UserError, match="found 3 distinct labels"):
        load_data(DataConfig(source=_csv(tmp_path, frame), task="binary"), seed=0)


def test_valid_source_replaces_the_split(tmp_path, frame):
    source = _csv(tmp_path, frame)
    vframe = frame.iloc[:9].copy()
    vframe["row"] += 100
    bundle = load_data(cfg(source, valid_source=_csv(tmp_path, vframe, "valid.csv")), seed=0)
    assert len(bundle.train.y) == N
    assert bundle.valid.x[:, 0].tolist() == [float(r) for r in range(100, 109)]
    assert bundle.valid.y.tolist() == vframe["target"].tolist()


def test_regression_target_is_float(tmp_path, frame):
    bundle = load_data(
        DataConfig(
            source=_csv(tmp_path, frame), task="regression", features=["f1", "f2"], valid_fraction=0
        ),
        seed=0,
    )
    assert bundle.train.y.dtype == torch.float32 and bundle.classes is None
    assert bundle.input_shape == (2,)


def _table(n: int = 23) -> Table:
    return Table(torch.arange(n * 6, dtype=torch.float32).reshape(n, 2, 3), torch.arange(n) % 4)


def test_tensor_rows_getitems_returns_whole_batches():
    rows = TensorRows(_table())
    indices = [5, 0, 22, 5, 11]
    batch = rows.__getitems__(indices)
    per_row = [rows[i] for i in indices]
    assert len(batch) == len(per_row[0])  # (x, y) or (x, y, row index): same fields either way
    for field, stacked in enumerate(batch):
        assert stacked.shape[0] == 5
        assert torch.equal(stacked, torch.stack([r[field] for r in per_row]))
    assert batch[0].shape == (5, 2, 3) and batch[1].shape == (5,)
    if len(batch) > 2:  # row indices ride along with the batch
        assert batch[2].tolist() == indices
    assert len(rows) == 23


@pytest.mark.parametrize("drop_last", [False, True])
def test_make_loader_batches_equal_slices(drop_last):
    table = _table()
    batches = list(make_loader(table, batch_size=5, shuffle=False, drop_last=drop_last))
    assert len(batches) == (4 if drop_last else 5)
    for i, (x, y, *rest) in enumerate(batches):
        rows = slice(i * 5, (i + 1) * 5)
        assert torch.equal(x, table.x[rows])
        assert torch.equal(y, table.y[rows])
        if rest:
            assert rest[0].tolist() == list(range(len(table.y)))[rows]


def test_shuffled_loader_is_a_permutation():
    table = _table()
    loader = make_loader(table, 4, shuffle=True, drop_last=False)
    seen = torch.cat([batch[0][:, 0, 0] for batch in loader])
    assert sorted(seen.tolist()) == table.x[:, 0, 0].tolist()
    assert seen.tolist() != table.x[:, 0, 0].tolist()
