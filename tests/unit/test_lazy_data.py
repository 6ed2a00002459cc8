"""data.mode lazy (data/lazy.py, data/arrow.py): the same rows, split, targets and statistics
as the memory path, fetched from parquet shards, a glob, `disk:` or the csv Arrow cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procs import bitwise_equal, cli_here, weights

from dist_train.config.schema import DataConfig
from dist_train.data.loaders import make_loader
from dist_train.data.rows import LazyTable, Workers
from dist_train.data.sources import load_data
from dist_train.errors import UserError

ROWS = 485  # 97 valid rows at valid_fraction 0.2


def _write(root: Path) -> dict[str, Path]:
    """One table as a parquet file, 3 parquet shards (one in a subdirectory), a csv; labels of
    three classes with one (class 7) the data.classes filter drops."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 6)) * [1, 10, 100, 0.1, 1, 5] + [0, 3, -50, 1, 0, 2]
    label = (x[:, 0] > 0).astype(int) + (x[:, 3] > 1.05).astype(int)
    label[::50] = 7
    table = pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "label": label})
    shards = root / "shards"
    (shards / "b").mkdir(parents=True)
    pq.write_table(table.slice(0, 200), shards / "a-0.parquet")
    pq.write_table(table.slice(200, 150), shards / "a-1.parquet")
    pq.write_table(table.slice(350), shards / "b" / "c.parquet")  # sorted path: last
    pq.write_table(table, root / "t.parquet")
    table.to_pandas().to_csv(root / "t.csv", index=False)
    return {"parquet": root / "t.parquet", "shards": shards, "csv": root / "t.csv"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return _write(tmp_path_factory.mktemp("lazy"))


def _cfg(source: str, **kw) -> DataConfig:
    base = {"source": source, "target": "label", "task": "multiclass", "classes": [0, 1, 2]}
    return DataConfig(**(base | {"standardize": True, "num_workers": 0} | kw))


def _all_rows(table) -> torch.Tensor:
    return table.source.fetch(table.ids)


@pytest.mark.parametrize("where", ["shards", "glob", "csv"])
def test_lazy_split_targets_rows_and_statistics_equal_the_memory_path(files, tmp_path, where):
    source = {
        "shards": f"parquet:{files['shards']}",
        "glob": f"parquet:{files['shards']}/**/*.parquet",
        "csv": f"csv:{files['csv']}",
    }[where]
    memory = load_data(_cfg(f"parquet:{files['parquet']}", mode="memory"), seed=5)
    lazy = load_data(_cfg(source, mode="lazy", cache_dir=str(tmp_path)), seed=5)
    assert isinstance(lazy.train, LazyTable) and not isinstance(memory.train, LazyTable)
    assert lazy.plan.startswith("data: lazy (data.mode lazy); 0 workers")
    assert memory.plan == "data: memory (data.mode memory)"
    assert len(lazy.valid) == len(memory.valid) == 95  # 475 rows kept (10 of class 7 dropped)
    for a, b in ((lazy.train, memory.train), (lazy.valid, memory.valid)):
        assert torch.equal(a.y, b.y)
        assert torch.equal(_all_rows(a), b.x)  # the same rows in the same order, bitwise
    assert torch.equal(lazy.train.head(2), memory.train.head(2))
    assert lazy.classes == memory.classes and lazy.input_shape == memory.input_shape == (6,)
    for got, want in zip(lazy.norm, memory.norm, strict=True):  # one chunked float64 pass
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_statistics_pass_is_chunked_and_matches(files, monkeypatch):
    """Chunks of 7 rows merged (Chan et al.): the same statistics as one chunk."""
    from dist_train.data import lazy as lazy_mod

    cfg = _cfg(f"parquet:{files['shards']}", mode="lazy")
    whole = load_data(cfg, seed=1).norm
    monkeypatch.setattr(lazy_mod, "STATS_CHUNK", 7)
    chunked = load_data(cfg, seed=1).norm
    for got, want in zip(chunked, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_csv_arrow_cache_is_written_once_and_reused(files, tmp_path):
    cfg = _cfg(f"csv:{files['csv']}", mode="lazy", cache_dir=str(tmp_path / "cache"))
    load_data(cfg, seed=0)
    # The Arrow file and its gap count, no conversion leftovers.
    cached, gaps = sorted((tmp_path / "cache").iterdir())
    assert cached.suffix == ".arrow" and gaps.name.endswith(".gaps.json")
    stamp = cached.stat().st_mtime_ns
    again = load_data(cfg, seed=0)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cached.name, gaps.name]
    assert cached.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert again.train.source.files == [str(cached)]


def test_disk_source_is_read_lazily(files, tmp_path):
    import datasets

    datasets.Dataset.from_parquet(str(files["parquet"])).save_to_disk(str(tmp_path / "ds"))
    memory = load_data(_cfg(f"disk:{tmp_path / 'ds'}", mode="memory"), seed=2)
    lazy = load_data(_cfg(f"disk:{tmp_path / 'ds'}", mode="lazy"), seed=2)
    assert torch.equal(_all_rows(lazy.train), memory.train.x)
    assert torch.equal(lazy.valid.y, memory.valid.y)


def test_auto_chooses_by_the_estimated_size(files):
    small = load_data(_cfg(f"parquet:{files['shards']}"), seed=0)
    assert small.plan.startswith("data: memory (auto: estimated 0.0111 MiB <= budget")
    big = load_data(_cfg(f"parquet:{files['shards']}", memory_budget_gb=1e-6), seed=0)
    assert isinstance(big.train, LazyTable)
    assert "auto: estimated 0.0111 MiB > budget 0.00102 MiB per process" in big.plan
    # sources that cannot be read lazily stay in memory, saying why
    from dist_train.data.lazy import choose_mode

    digits = choose_mode(DataConfig(source="sklearn:digits", task="multiclass"))
    assert (digits.mode, digits.why) == (
        "memory",
        "auto: sklearn: sources are read into memory (lazy: parquet, disk, csv, json)",
    )


@pytest.mark.parametrize(
    ("source", "mode", "message"),
    [
        ("parquet:{root}/empty", "lazy", "the directory holds no *.parquet files"),
        ("parquet:{root}/nothing-*.parquet", "lazy", "the glob matches no files"),
        ("parquet:{root}/nothing-*.parquet", "memory", "the glob matches no files"),
        ("sklearn:iris", "lazy", "data.mode lazy: sklearn: sources are read into memory"),
        ("parquet:{root}/bad.parquet", "lazy", "cannot parse .*bad.parquet as parquet"),
        ("parquet:{root}/bad.parquet", "auto", "cannot parse .*bad.parquet as parquet"),
    ],
)
def test_bad_lazy_sources_are_user_errors(tmp_path, source, mode, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.parquet").write_text("not parquet\n")
    cfg = _cfg(source.format(root=tmp_path), mode=mode, classes=None, cache_dir=str(tmp_path))
    pattern = message if ".*" in message else message.replace("*", r"\*").replace("(", r"\(")
    with pytest.raises(UserError, match=pattern):
        load_data(cfg, seed=0)


def test_stream_mode_of_an_unstreamable_source_exits_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: s\ndata: {source: 'sklearn:iris', task: multiclass, mode: stream}\n"
        "model: {layers: [{linear: out}]}\nloss: cross_entropy\n"
        "optimizer: {name: sgd, lr: 0.1}\ntrain: {epochs: 1, batch_size: 8}\n"
    )
    r = cli_here("check", str(recipe))
    assert r.returncode == 2 and "`sklearn:` sources are not streamed" in r.stderr


class CountingSource:
    """A RowSource that appends every fetched id to a file (workers are other processes)."""

    input_shape = (2,)
    dtype = torch.float32

    def __init__(self, n: int, log: str) -> None:
        self.n, self.log = n, log

    def __len__(self) -> int:
        return self.n

    def fetch(self, ids: np.ndarray) -> torch.Tensor:
        with open(self.log, "a") as fh:
            fh.write("".join(f"{i}\n" for i in ids.tolist()))
        return torch.from_numpy(np.stack([ids, -ids], 1).astype(np.float32))


def test_mid_epoch_resume_fetches_no_skipped_row(tmp_path):
    """accelerate's skip_first_batches (the trainer's mid-epoch resume) skips index lists:
    the rows of the skipped batches are never fetched (O(1) I/O), the rest exactly once."""
    from accelerate import Accelerator, DataLoaderConfiguration

    log = tmp_path / "fetched.txt"
    table = LazyTable(CountingSource(100, str(log)), np.arange(100, dtype=np.int64) * 3, None)
    table.y = torch.arange(100)
    seedable = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=4)  # as the trainer
    acc = Accelerator(cpu=True, dataloader_config=seedable)
    workers = Workers(num_workers=1, persistent_workers=True, prefetch_factor=2)
    loader = acc.prepare(make_loader(table, 10, True, True, seed=4, workers=workers))
    loader.set_epoch(1)
    full = [idx.tolist() for _, _, idx in loader]
    log.unlink()
    skipped = acc.skip_first_batches(loader, 4)
    skipped.set_epoch(1)
    rest = [(x, idx.tolist()) for x, _, idx in skipped]
    assert [idx for _, idx in rest] == full[4:]  # the same order, resumed at batch 4
    assert all(torch.equal(x[:, 0], torch.tensor(idx) * 3.0) for x, idx in rest)
    fetched = [int(v) for v in log.read_text().split()]
    want = [3 * i for batch in full[4:] for i in batch]
    assert sorted(fetched) == sorted(want)  # nothing of batches 0-3 read
    assert not set(fetched) & {3 * i for batch in full[:4] for i in batch}


def test_lazy_training_is_bitwise_the_memory_training(files, tmp_path):
    """One process: the lazy run (a glob of shards, a DataLoader worker, mixup partners fetched
    by the worker, epoch by epoch) ends with exactly the weights of the memory run on the
    whole file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: l\nseed: 3\n"
        "data: {target: label, task: multiclass, classes: [0, 1, 2], standardize: false,\n"
        "       augment: {mixup: 0.4}}\n"
        "model: {layers: [{linear: 16}, relu, dropout, {linear: out}]}\nloss: cross_entropy\n"
        "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}\ntrain: {epochs: 2, batch_size: 24}\n"
        "metrics: [accuracy]\n"
    )
    runs = {}
    for mode, source in (
        ("memory", f"parquet:{files['parquet']}"),
        ("lazy", f"parquet:{files['shards']}/**/*.parquet"),
    ):
        runs[mode] = tmp_path / mode
        args = ["train", str(recipe), "-o", str(runs[mode]), f"data.source={source}"]
        r = cli_here(*args, f"data.mode={mode}", "data.num_workers=1")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"data: {mode} (data.mode {mode})" in r.stdout
    assert "1 workers/process" in r.stdout
    got, want = (weights(runs[m] / "model.safetensors") for m in ("lazy", "memory"))
    assert bitwise_equal(got, want)


def test_worker_defaults_follow_the_cores_per_process(monkeypatch):
    from dist_train.data.lazy import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    w = default_workers(_cfg("parquet:x", num_workers=None))
    assert (w.num_workers, w.persistent_workers, w.prefetch_factor) == (3, True, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 2 cores per process: tables fetch inline,
    assert default_workers(_cfg("parquet:x", num_workers=None)).num_workers == 0
    assert default_workers(_cfg("i:x", num_workers=None), decode=True).num_workers == 1  # images
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    w = default_workers(_cfg("parquet:x", num_workers=None), decode=True)
    assert (w.num_workers, w.persistent_workers, w.prefetch_factor) == (0, False, None)
    assert default_workers(_cfg("parquet:x", num_workers=5)).num_workers == 5


def test_mixed_column_types_and_many_record_batches(tmp_path):
    """Integers, booleans and float32 next to float64 (no single strided view: column by
    column), and a `disk:` dataset of 1000-row record batches: still the memory path's rows."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    n = 2500
    table = pa.table(
        {
            "a": rng.integers(-5, 5, n).astype(np.int32),
            "b": rng.random(n) > 0.5,
            "c": rng.normal(size=n).astype(np.float32),
            "d": rng.normal(size=n),
            "label": rng.integers(0, 2, n),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "ds"))
    for source in (f"parquet:{tmp_path / 'm.parquet'}", f"disk:{tmp_path / 'ds'}"):
        kw = {"task": "binary", "classes": None, "cache_dir": str(tmp_path / "cache")}
        memory = load_data(_cfg(source, mode="memory", **kw), seed=0)
        lazy = load_data(_cfg(source, mode="lazy", **kw), seed=0)
        assert torch.equal(_all_rows(lazy.train), memory.train.x), source
        assert torch.equal(_all_rows(lazy.valid), memory.valid.x), source


def test_parquet_cache_is_packed_row_major_only_for_plain_numeric_features(tmp_path):
    """Numbers/booleans under data.missing error: the shard's cache holds the features as one
    row-major float32 column (the fetch gathers whole rows) and the target as it is; another
    feature list is another cache file. A NaN that reaches a fetch (a cache edited after the
    load) is still reported by it, naming its row. Under data.missing impute the cache keeps
    the columns the encoders read. A shard lacking a feature column of the first shard is a
    user error naming that shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_train.data.arrow import gaps_path, open_arrow, packed_kinds, packed_rows_path

    rng = np.random.default_rng(3)
    n = 300
    x = rng.normal(size=n)
    b, c = rng.random(n) > 0.5, rng.integers(0, 9, n)
    table = pa.table({"a": x, "b": b, "c": c, "label": rng.integers(0, 2, n)})
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "p.parquet")
    kw = {"task": "binary", "classes": None, "standardize": False}
    source = f"parquet:{tmp_path / 'd'}"

    cache = tmp_path / "packed"
    lazy = load_data(_cfg(source, mode="lazy", cache_dir=str(cache), **kw), seed=0)
    cached, gaps, rows = sorted(cache.iterdir())  # x.arrow, x.gaps.json, x.rows.npy
    assert rows == packed_rows_path(cached) and np.load(rows).shape == (n, 3)
    assert gaps == gaps_path(cached) and gaps.read_text() == "{}"
    assert open_arrow([str(cached)]).schema.names == ["label"]
    assert packed_kinds([str(cached)]) == {"a": "number", "b": "bool", "c": "number"}
    ids = np.array([5, 0, 299, 17])
    want = np.stack([x[ids], b[ids], c[ids]], 1)
    assert torch.equal(lazy.train.source.fetch(ids), torch.from_numpy(want.astype(np.float32)))
    packed = np.load(rows)
    packed[123, 0] = np.nan
    np.save(rows, packed)
    with pytest.raises(UserError, match="missing/NaN in row 123"):
        lazy.train.source.fetch(np.array([1, 123]))
    with open(rows, "r+b") as f:  # a cache cut short under a running job: named, exit 2
        f.truncate(rows.stat().st_size - 12)
    fresh = load_data(_cfg(source, mode="lazy", cache_dir=str(cache), **kw), seed=0)
    with pytest.raises(UserError, match=r"rows\.npy is shorter than its header says"):
        fresh.train.source.fetch(np.array([n - 1]))
    load_data(_cfg(source, mode="lazy", cache_dir=str(cache), features=["c", "a"], **kw), seed=0)
    assert len(list(cache.iterdir())) == 6  # the key names the packed columns

    columns = tmp_path / "columns"
    imputed = load_data(
        _cfg(source, mode="lazy", cache_dir=str(columns), missing="impute", **kw), seed=0
    )
    cached, _ = sorted(columns.iterdir())
    assert "a" in open_arrow([str(cached)]).schema.names
    assert packed_kinds([str(cached)]) is None
    assert not torch.isnan(imputed.train.source.fetch(imputed.train.ids)).any()

    pq.write_table(table.drop_columns(["b"]), tmp_path / "d" / "q.parquet")
    with pytest.raises(UserError, match=r"parquet shard .*q\.parquet has no column `b`"):
        load_data(_cfg(source, mode="lazy", cache_dir=str(cache), **kw), seed=0)


def test_load_holds_each_row_once_in_the_splits_order():
    """The lazy load's memory per row (benchmarks/parquet_scale.py: the 5 GiB run's growth):
    a many-chunk target column is copied chunk by chunk into one array (Arrow's own
    `to_numpy` concatenates in its pool first), the split permutation is drawn as int32 (the
    same permutation as the memory path's int64 one) and the ids and targets are gathered
    into its order in chunks, each split a slice of them."""
    import pyarrow as pa

    from dist_train.data.lazy import _gathered
    from dist_train.data.sources import column, split_permutation, split_rows

    parts = [np.arange(k * 1000, k * 1000 + 700 + k, dtype=np.int64) for k in range(5)]
    table = pa.table(
        {"y": pa.chunked_array(parts), "b": pa.chunked_array([p % 2 == 0 for p in parts])}
    )
    y = column(table, "y", "t.parquet")
    assert y.dtype == np.int64 and y.flags.owndata and np.array_equal(y, np.concatenate(parts))
    assert column(table, "b", "t.parquet").dtype == np.bool_
    with_nulls = pa.table({"y": pa.chunked_array([[1, None], [3]], type=pa.int64())})
    assert np.array_equal(column(with_nulls, "y", "t"), [1.0, np.nan, 3.0], equal_nan=True)

    n = 200_003
    perm, n_test, n_valid = split_permutation(n, 0.1, 0.05, 7, torch.int32)
    assert perm.dtype == torch.int32 and (n_test, n_valid) == (10_000, 20_000)
    train, valid, test = split_rows(n, 0.1, 0.05, 7)
    assert torch.equal(torch.cat([test, valid, train]), perm.long())
    assert split_permutation(n, 0.0, 0.0, 7) == (None, 0, 0)

    values = np.random.default_rng(0).integers(0, 1 << 30, n).astype(np.int32)
    order = perm.numpy()
    got = _gathered(values, order, chunk=4096)
    assert got.dtype == np.int32 and np.array_equal(got, values[order])


@pytest.mark.parametrize("kind", ["shards", "csv"])
def test_a_missing_cell_under_error_stops_the_lazy_load_like_the_memory_one(tmp_path, kind):
    """data.missing error on a table of numbers: the conversion to the cache counts each
    column's missing cells, so the lazy load refuses a NaN / empty cell before training, with
    the memory path's message and row number (rows numbered across shards), from the count
    alone when the cache is reused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    shards = [rng.normal(size=(n, 2)) for n in (40, 30)]
    shards[1][7, 1] = np.nan  # row 47 of the directory, feature b
    root = tmp_path / "d"
    root.mkdir()
    for k, x in enumerate(shards):
        cols = {"a": x[:, 0], "b": x[:, 1], "label": rng.integers(0, 2, len(x))}
        if kind == "shards":
            pq.write_table(pa.table(cols), root / f"part-{k}.parquet")
        else:
            rows = [
                f"{a},{'' if np.isnan(b) else b},{y}"
                for a, b, y in zip(*cols.values(), strict=True)
            ]
            with open(root / "t.csv", "a") as f:
                f.write("a,b,label\n" * (k == 0) + "\n".join(rows) + "\n")
    source = f"parquet:{root}" if kind == "shards" else f"csv:{root / 't.csv'}"
    kw = {"task": "binary", "classes": None, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(UserError) as memory:
        load_data(_cfg(source, mode="memory", **kw), seed=0)
    assert "feature `b` is missing/NaN in row 47" in str(memory.value)
    for _ in range(2):  # converting, then from the cache's count alone
        with pytest.raises(UserError) as lazy:
            load_data(_cfg(source, mode="lazy", **kw), seed=0)
        assert str(lazy.value) == str(memory.value)
    assert load_data(_cfg(source, mode="lazy", missing="drop", **kw), seed=0).train is not None
