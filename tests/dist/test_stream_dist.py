"""data.mode stream on real gloo ranks: equal-length epochs with exactly batch_size rows per
step, the same rows per step as one process, kill -9 mid-epoch + resume bitwise on the same world
size, resume on a different world size (2 -> 1) with the documented exactness, reruns bitwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from dist_helpers import RECIPE, audit_rows, events, run_info
from procs import bitwise_equal, cli, cli_here, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# 388 train rows in 3 parquet files of 50-row groups + 97 valid rows (a separate file, read
# map-style): 16 steps of 24 per epoch; saves every 7 steps land mid-epoch.
STREAM = [
    "data.mode=stream",
    "data.shuffle_buffer=64",
    "data.num_workers=1",
    "checkpoint.every_steps=7",
    "train.epochs=2",
]
AUDIT = {"DIST_TRAIN_AUDIT_SAMPLES": "1"}
STEPS, PER_EPOCH = 32, 16


@pytest.fixture(scope="module")
def stream_recipe(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("stream_dist")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(485, 6))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    table = pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "label": label})
    (root / "shards").mkdir()
    for k, (start, n) in enumerate([(0, 150), (150, 130), (280, 108)]):
        pq.write_table(table.slice(start, n), root / f"shards/{k}.parquet", row_group_size=50)
    pq.write_table(table.slice(388), root / "valid.parquet")
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["source"] = f"parquet:{root / 'shards'}"
    recipe["data"]["valid_source"] = f"parquet:{root / 'valid.parquet'}"
    path = root / "stream.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one(stream_recipe, tmp_path_factory) -> Path:
    """The uninterrupted 1-process stream run (in this process), audited."""
    out = tmp_path_factory.mktemp("stream_one") / "run"
    r = cli_here("train", str(stream_recipe), "-o", str(out), *STREAM, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data: stream (data.mode stream)" in r.stdout and "388 rows in 3 shard(s)" in r.stdout
    return out


@pytest.fixture(scope="module")
def two(stream_recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream_two") / "run"
    r = cli("train", str(stream_recipe), "-o", str(out), *STREAM, nproc=2, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _steps_by_rank(run: Path) -> list[dict[int, list[list[int]]]]:
    """Per rank: epoch -> its micro-batches (row ids), from the sample audit."""
    out = []
    for log in sorted((run / "samples").glob("rank-*.log")):
        epochs: dict[int, list[list[int]]] = {}
        for line in log.read_text().splitlines():
            epoch, _step, ids = line.split()
            epochs.setdefault(int(epoch), []).append([int(i) for i in ids.split(",")])
        out.append(epochs)
    return out


def test_two_ranks_end_epochs_together_with_full_steps_of_the_same_rows(two, one):
    info = run_info(two)
    assert info["world_size"] == 2 and "data: stream" in info["data"]
    ranks = _steps_by_rank(two)
    assert len(ranks) == 2
    for epochs in ranks:  # every rank: 16 micro-batches of 12 rows in each epoch
        assert sorted(epochs) == [0, 1]
        assert all(len(b) == PER_EPOCH and {len(x) for x in b} == {12} for b in epochs.values())
    got, want = audit_rows(two), audit_rows(one)
    assert sorted(got) == list(range(STEPS)) and got == want  # each step: the same 24 rows
    for epoch in range(2):
        seen = [i for s in range(epoch * PER_EPOCH, (epoch + 1) * PER_EPOCH) for i in got[s]]
        assert len(seen) == len(set(seen)) == PER_EPOCH * 24  # no row twice in an epoch
    assert [e["valid/rows"] for e in events(two, "eval")] == [97, 97]  # map-style validation
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5


def test_kill_9_mid_epoch_resumes_bitwise_on_2_and_exactly_on_1(stream_recipe, one, two, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(stream_recipe), "-o", str(run), *STREAM]
    # Both ranks SIGKILLed as the save of step 28 begins: step 21 (epoch 2, step 5 of 16) is
    # the latest complete checkpoint.
    r = cli(*args, nproc=2, DIST_TRAIN_FAULT="before-write@28", **AUDIT)
    assert r.returncode != 0
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts[-1] == "step-000021", ckpts
    other = tmp_path / "other"
    shutil.copytree(run, other)
    r = cli(*args, nproc=2, **AUDIT)  # same world size
    assert r.returncode == 0, r.stderr[-3000:]
    assert bitwise_equal(weights(run / "model.safetensors"), weights(two / "model.safetensors"))
    # Different world size (2 -> 1): the same rows per step (dealt by position), weights as
    # 1 vs 2 processes agree.
    r = cli_here("train", str(stream_recipe), "-o", str(other), *STREAM, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "elastic resume" in r.stdout and run_info(other)["world_size"] == 1
    redone = {}
    for line in (other / "samples" / "rank-0.log").read_text().splitlines()[-11:]:
        _epoch, step, ids = line.split()
        redone[int(step)] = sorted(int(i) for i in ids.split(","))
    want = audit_rows(one)
    assert sorted(redone) == list(range(21, STEPS))
    for step in range(21, STEPS):
        assert redone[step] == want[step], step
    assert max_diff(weights(other / "model.safetensors"), weights(one / "model.safetensors")) < 1e-5


def test_rerun_is_bitwise_identical_with_any_number_of_workers(stream_recipe, one, tmp_path):
    out = tmp_path / "again"
    args = [*STREAM[:-3], "data.num_workers=0", *STREAM[-2:]]
    r = cli_here("train", str(stream_recipe), "-o", str(out), *args, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert bitwise_equal(weights(out / "model.safetensors"), weights(one / "model.safetensors"))
    assert audit_rows(out) == audit_rows(one)
