"""data.mode lazy keeps every promise with DataLoader workers (real gloo ranks): 1 vs 2
processes, elastic 2->1 resume with an exact sample audit, kill -9 mid-epoch + resume bitwise,
exact 97-row evaluation on 1/2/3 processes and predictions in input order."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from dist_helpers import RECIPE, audit_rows, events, preempt, run_info
from procs import bitwise_equal, cli, cli_forked, cli_here, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# 485 rows in 3 parquet shards: 97 valid (valid_fraction 0.2), 388 train = 16 steps of 24 per
# epoch; saves every 7 steps land mid-epoch. One worker per process (2 cores here).
LAZY = ["data.mode=lazy", "data.num_workers=1", "checkpoint.every_steps=7", "train.epochs=2"]
AUDIT = {"DIST_TRAIN_AUDIT_SAMPLES": "1"}
STEPS = 32


@pytest.fixture(scope="module")
def lazy_recipe(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("lazy_dist")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(485, 6))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    table = pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "label": label})
    (root / "shards").mkdir()
    for k, start in enumerate((0, 160, 320)):
        pq.write_table(table.slice(start, 165 if k == 2 else 160), root / f"shards/{k}.parquet")
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["source"] = f"parquet:{root / 'shards'}"
    del recipe["data"]["valid_source"]
    path = root / "lazy.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one(lazy_recipe, tmp_path_factory) -> Path:
    """The uninterrupted 1-process lazy run (in this process), audited."""
    out = tmp_path_factory.mktemp("lazy_one") / "run"
    r = cli_here("train", str(lazy_recipe), "-o", str(out), *LAZY, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data: lazy (data.mode lazy); 1 workers/process" in r.stdout
    return out


def test_two_processes_match_one_and_count_97_valid_rows(lazy_recipe, one, tmp_path):
    two = tmp_path / "two"
    r = cli("train", str(lazy_recipe), "-o", str(two), *LAZY, nproc=2, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_info(two)["world_size"] == 2 and "data: lazy" in run_info(two)["data"]
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
    assert audit_rows(two) == audit_rows(one)  # every step: the same rows
    assert [e["valid/rows"] for e in events(one, "eval")] == [97, 97]
    assert [e["valid/rows"] for e in events(two, "eval")] == [97, 97]
    for a, b in zip(events(one, "eval"), events(two, "eval"), strict=True):
        assert a["valid/accuracy"] == pytest.approx(b["valid/accuracy"], abs=1e-6)


def test_elastic_resume_2_to_1_trains_on_exactly_the_same_rows(lazy_recipe, one, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(lazy_recipe), "-o", str(run), *LAZY]
    preempt(args, run, 2, at_step=20)  # SIGTERM mid-epoch 2 on 2 ranks (saves, exit 75)
    r = cli_here(*args, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "elastic resume" in r.stdout and run_info(run)["world_size"] == 1
    got, want = audit_rows(run), audit_rows(one)
    assert sorted(got) == sorted(want) == list(range(STEPS))
    for step in want:
        assert got[step] == want[step], step  # same rows, none twice, none skipped
    for epoch in range(2):
        seen = [i for s in range(epoch * 16, epoch * 16 + 16) for i in got[s]]
        assert len(set(seen)) == len(seen) == 384 and max(seen) < 388  # no row twice
    assert max_diff(weights(run / "model.safetensors"), weights(one / "model.safetensors")) < 1e-5


def test_kill_9_mid_epoch_then_resume_is_bitwise(lazy_recipe, one, tmp_path):
    run, log = tmp_path / "run", tmp_path / "killed.log"
    args = ["train", str(lazy_recipe), "-o", str(run), *LAZY]
    # SIGKILLed as the save of step 28 begins: step 21 (5 steps into epoch 2) is the latest.
    code = cli_forked(log, *args, DIST_TRAIN_FAULT="before-write@28", **AUDIT)
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    r = cli_here(*args, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-000021" in r.stdout
    assert bitwise_equal(weights(run / "model.safetensors"), weights(one / "model.safetensors"))
    assert _last_rows_by_step(run) == _last_rows_by_step(one)


def _last_rows_by_step(run: Path) -> dict[int, str]:
    """Step -> the rows it trained on, in order; a step redone after the resume: its last."""
    out: dict[int, str] = {}
    for line in (run / "samples" / "rank-0.log").read_text().splitlines():
        _epoch, step, ids = line.split()
        out[int(step)] = ids
    return out


def test_eval_on_3_and_predict_on_2_processes_are_exact(lazy_recipe, one, tmp_path):
    out = tmp_path / "eval.json"
    ckpt = str(one / "model.safetensors")
    r = cli("eval", str(lazy_recipe), "--checkpoint", ckpt, "-o", str(out), *LAZY, nproc=3)
    assert r.returncode == 0, r.stderr[-3000:]
    result, reference = json.loads(out.read_text()), events(one, "eval")[-1]
    assert result["valid/rows"] == 97
    assert result["valid/accuracy"] == pytest.approx(reference["valid/accuracy"], abs=1e-6)
    assert result["valid/loss"] == pytest.approx(reference["valid/loss"], abs=1e-6)
    preds = {}
    for nproc in (1, 2):
        path = tmp_path / f"preds{nproc}.csv"
        data = f"parquet:{lazy_recipe.parent / 'shards'}"  # every row, lazily, in file order
        args = ("predict", str(lazy_recipe), "--checkpoint", ckpt, "--data", data, "-o", str(path))
        args += tuple(LAZY)
        r = cli_here(*args) if nproc == 1 else cli(*args, nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        preds[nproc] = [line.split(",") for line in path.read_text().splitlines()]
    assert len(preds[2]) == 486 and [int(p[0]) for p in preds[2][1:]] == list(range(485))
    for a, b in zip(preds[1], preds[2], strict=True):  # same rows, order, labels, targets
        assert (a[0], a[1], a[-1]) == (b[0], b[1], b[-1])
    import pyarrow.dataset as pads

    labels = pads.dataset(str(lazy_recipe.parent / "shards")).to_table(columns=["label"])
    assert [int(p[-1]) for p in preds[2][1:]] == labels["label"].to_pylist()  # file order
