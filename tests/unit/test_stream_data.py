"""data.mode stream in one process: the global stream dealt to ranks and workers (the rows of
every step do not depend on either), resume by position, the scan's statistics equal the memory
path's, csv/json streams, and the refusals (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from procs import cli_here

from dist_train.config.schema import DataConfig
from dist_train.data.sources import load_data
from dist_train.data.stream import SHARD_BITS, StreamRows, StreamTable
from dist_train.errors import UserError

ROWS = 230  # 3 files of several row groups


def _table(rows: int = ROWS) -> pa.Table:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 4))
    return pa.table({**{f"f{i}": x[:, i] for i in range(4)}, "label": (x[:, 0] > 0).astype(int)})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    table = _table()
    (root / "shards").mkdir()
    for k, (start, n) in enumerate([(0, 90), (90, 70), (160, 70)]):
        pq.write_table(table.slice(start, n), root / f"shards/{k}.parquet", row_group_size=25)
    return root


def _cfg(source: str, **extra) -> DataConfig:
    return DataConfig(
        source=source, target="label", task="binary", mode="stream", standardize=True, **extra
    )


@pytest.fixture(scope="module")
def bundle(shards):
    return load_data(_cfg(f"parquet:{shards / 'shards'}", shuffle_buffer=40), seed=5)


def _rows(table: StreamTable, per_device, limit, rank, world, epoch=0, skip=0, workers=1):
    """Every micro-batch of this rank as its worker processes would build them, merged in
    DataLoader's round-robin order."""
    out = []
    for w in range(workers):
        rows = StreamRows(table, per_device, limit, 5, rank, world, table.cfg.shuffle_buffer)
        rows.epoch, rows.skip = epoch, skip
        out.append([b[2].tolist() for b in rows.batches(w, workers)])
    merged = []
    for i in range(max(map(len, out))):
        merged += [lst[i] for lst in out if i < len(lst)]
    return merged


def test_steps_see_the_same_rows_on_any_world_size_and_worker_count(bundle):
    table = bundle.train
    assert isinstance(table, StreamTable) and len(table) == ROWS and table.num_shards == 3
    assert "230 rows in 3 shard(s)" in bundle.plan and "shuffle buffer 40" in bundle.plan
    steps = ROWS // 24  # batch 24: 9 steps, the same number on every rank
    one = _rows(table, 24, steps, 0, 1)
    assert len(one) == steps and all(len(b) == 24 for b in one)
    seen = [i for b in one for i in b]
    assert len(set(seen)) == len(seen)  # no row twice in an epoch
    offsets = {i >> SHARD_BITS: i & ((1 << SHARD_BITS) - 1) for i in seen}
    assert set(offsets) == {0, 1, 2} and max(offsets.values()) < 90  # (shard, offset) ids
    assert seen != sorted(seen)  # shuffled
    for workers in (1, 2, 3):
        ranks = [_rows(table, 12, steps, r, 2, workers=workers) for r in (0, 1)]
        assert [len(r) for r in ranks] == [steps, steps]  # every rank: the same step count
        for s in range(steps):
            assert sorted(ranks[0][s] + ranks[1][s]) == sorted(one[s])
    assert _rows(table, 24, steps, 0, 1, workers=2) == one  # order independent of workers
    assert _rows(table, 24, steps, 0, 1, skip=4) == one[4:]  # resume: from the position
    assert _rows(table, 24, steps, 0, 1) == one  # a rerun: the same stream
    other = _rows(table, 24, steps, 0, 1, epoch=1)
    assert other != one and sorted(map(sorted, other)) != sorted(map(sorted, one))


def test_scan_statistics_and_targets_equal_the_memory_path(shards, bundle):
    whole = shards / "whole.parquet"
    pq.write_table(_table(), whole)
    memory = load_data(
        DataConfig(
            source=f"parquet:{whole}",
            target="label",
            task="binary",
            valid_fraction=0,
            standardize=True,
        ),
        seed=5,
    )
    assert bundle.classes == memory.classes and bundle.feature_names == memory.feature_names
    assert torch.equal(bundle.train.y, memory.train.y)
    for a, b in zip(bundle.norm, memory.norm, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(bundle.train.head(2), memory.train.x[:2])
    assert bundle.valid is None and "validation: none" in bundle.plan


def test_csv_and_json_stream_with_a_map_style_validation_source(tmp_path):
    frame = _table(60).to_pandas()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_json(tmp_path / "t.json", orient="records", lines=True)
    pq.write_table(_table(17), tmp_path / "v.parquet")
    for kind in ("csv", "json"):
        cfg = _cfg(f"{kind}:{tmp_path / f't.{kind}'}", valid_source=f"parquet:{tmp_path}/v.parquet")
        got = load_data(cfg, seed=0)
        assert len(got.train) == 60 and len(got.valid) == 17
        assert got.classes == [0, 1] and "(memory)" in got.plan
        batches = _rows(got.train, 20, 3, 0, 1)
        assert sorted(i for b in batches for i in b) == list(range(60))


def test_streaming_hub_key_and_refusals(shards, tmp_path):
    src = f"parquet:{shards / 'shards'}"
    with pytest.raises(UserError, match="`sklearn:` sources are not streamed"):
        load_data(_cfg("sklearn:iris"), seed=0)
    with pytest.raises(UserError, match="no random validation split"):
        load_data(_cfg(src, valid_fraction=0.2), seed=0)
    with pytest.raises(UserError, match=r"data\.sampler balanced"):
        load_data(_cfg(src, sampler="balanced"), seed=0)
    with pytest.raises(ValueError, match=r"data\.streaming true"):
        DataConfig(source=src, target="label", task="binary", mode="lazy", streaming=True)
    auto = DataConfig(source=src, target="label", task="binary", streaming=True)
    assert "data: stream (auto: data.streaming true)" in load_data(auto, seed=0).plan
    recipe = {
        "name": "s",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "data": {"source": src, "target": "label", "task": "binary", "mode": "stream"},
        "model": {"layers": [{"linear": "out"}]},
        "loss": "bce_with_logits",
        "train": {"epochs": 1, "batch_size": 500},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    r = cli_here("train", str(path), "-o", str(tmp_path / "run"))
    assert r.returncode == 2 and "larger than the 230 training rows" in r.stderr, r.stderr
    r = cli_here("lr-find", str(path), "train.batch_size=20")
    assert r.returncode == 2 and "data.mode stream trains only" in r.stderr, r.stderr[-2000:]
