"""Tracking on real 2-process (gloo) runs: one wandb run per job, the same run after SIGKILL +
resume (twice) and after clean stops, with strictly increasing steps, TensorBoard read back,
console printed once, and `dist-train report` on real run directories.

The .wandb files are read here only to check what wandb holds; dist_train itself never reads
them (what a resumed run re-sends is decided from metrics.jsonl)."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
from dist_helpers import RECIPE, events, run_info
from procs import cli

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# tiny recipe: 20 optimizer steps per epoch, a log line every step, 4 epochs = 80 steps.
TRACKED = [
    "train.epochs=4",
    "checkpoint.every_steps=10",
    "tracking.wandb.project=dist-train-test",
    "tracking.wandb.mode=offline",
    "tracking.tensorboard=true",
]


def _train(recipe: Path, run: Path, *overrides: str):
    r = cli(
        "train", str(recipe), "-o", str(run), *TRACKED, *overrides, nproc=2, WANDB_MODE="offline"
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert run_info(run)["world_size"] == 2
    return r


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data):
    """One uninterrupted 2-process run with wandb offline and TensorBoard."""
    import yaml

    root = tmp_path_factory.mktemp("tracking")
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["source"] = f"csv:{tiny_data['train']}"
    recipe["data"]["valid_source"] = f"csv:{tiny_data['valid']}"
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = root / "run"
    r = _train(path, run)
    return run, r


# --- the offline .wandb file, read with wandb's own protobuf records --------------------------


def _wandb_records(path: Path):
    """Records of a .wandb transaction log (the LevelDB log format: 32 KiB blocks, 7-byte chunk
    headers, FULL/FIRST/MIDDLE/LAST chunks) parsed into wandb's `Record` protobuf. A tail torn by
    SIGKILL ends the iteration."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break  # zero fill or torn tail
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _wandb_run(run_dir: Path) -> dict:
    """id, config and history rows ({key: value}) of one offline-run-DATE_TIME-ID directory.
    A part killed by SIGKILL may hold no records at all (wandb writes 32 KiB blocks)."""
    (path,) = run_dir.glob("run-*.wandb")
    out = {"id": run_dir.name.rsplit("-", 1)[1], "history": [], "config": {}}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            assert record.run.run_id == out["id"]
            out["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            out["history"].append(row)
    return out


def _wandb_parts(run: Path, folder: str = "wandb") -> list[dict]:
    """The offline parts of the run in start order (the directory names carry the start time,
    which is also the order `wandb sync` uploads them in)."""
    return [_wandb_run(d) for d in sorted((run / folder).glob("offline-run-*"))]


def _tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _strictly_increasing(values: list) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


# --- tests ------------------------------------------------------------------------------------


def test_two_processes_make_one_wandb_run_and_print_everything_once(finished_run):
    run, r = finished_run
    info = run_info(run)
    parts = _wandb_parts(run)
    assert len(parts) == 1, [p["id"] for p in parts]  # one run for the job, not one per rank
    assert parts[0]["id"] == info["run_id"]
    assert parts[0]["config"]["name"] == "tiny"  # the resolved recipe is the run config
    assert parts[0]["config"]["train"]["batch_size"] == 24
    steps = [row["_step"] for row in parts[0]["history"]]
    assert steps == list(range(1, 81))  # train every step; eval merged into its step's row
    train = {e["step"]: e for e in events(run, "train")}
    assert [r_["train/loss"] for r_ in parts[0]["history"]] == [
        pytest.approx(train[s]["train/loss"]) for s in steps
    ]
    evals = [row for row in parts[0]["history"] if "valid/loss" in row]
    assert [row["_step"] for row in evals] == [20, 40, 60, 80]
    assert all("valid/accuracy" in row and "valid/f1" in row for row in evals)
    out = r.stdout + r.stderr
    for once in (
        "dist-train: tiny ->",
        "20 steps per epoch x 4 epochs",
        "run summary:",
        "wandb: offline run",
        "saved ",
    ):
        assert out.count(once) == 1, (once, out[-3000:])
    assert f"wandb sync {run / 'wandb'}" in out
    table = out.split("run summary:")[1].splitlines()
    assert any(line.split()[:1] == ["valid/accuracy"] for line in table)
    assert out.count("epoch 4 valid:") == 1
    assert "world size 2" in out


def test_tensorboard_reads_back_the_logged_values(finished_run):
    run, _ = finished_run
    train = {e["step"]: e for e in events(run, "train")}
    loss = _tensorboard_scalars(run, "train/loss")
    assert sorted(loss) == sorted(train) == list(range(1, 81))
    assert all(loss[s] == pytest.approx(train[s]["train/loss"], rel=1e-6) for s in loss)
    lr = _tensorboard_scalars(run, "lr")
    assert all(lr[s] == pytest.approx(train[s]["lr"], rel=1e-6) for s in lr)
    for tag in ("grad_norm", "samples_per_s", "step_time"):
        assert _tensorboard_scalars(run, tag)
    valid = {e["step"]: e["valid/accuracy"] for e in events(run, "eval")}
    assert _tensorboard_scalars(run, "valid/accuracy") == pytest.approx(valid)


def _logged_step(run: Path, step: int):
    """True once metrics.jsonl holds `step` (for a graceful stop: any later step is fine)."""

    def reached() -> bool:
        path = run / "metrics.jsonl"
        return path.exists() and f'"step": {step},' in path.read_text()

    return reached


def test_sigkill_and_resume_twice_continue_the_same_run(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), *TRACKED]
    # Both ranks SIGKILLed as the save of step 30, then of step 60, begins: steps 21-30 and
    # 51-60 were logged (wandb, TensorBoard, jsonl) and are trained again after each resume.
    r = cli(*args, nproc=2, WANDB_MODE="offline", DIST_TRAIN_FAULT="before-write@30")
    assert r.returncode != 0 and not (run / "model.safetensors").exists(), r.stderr[-2000:]
    first = _wandb_parts(run)
    assert len(first) == 1  # nothing from it may have reached the file: it is re-sent
    r = cli(*args, nproc=2, WANDB_MODE="offline", DIST_TRAIN_FAULT="before-write@60")
    assert r.returncode != 0 and not (run / "model.safetensors").exists(), r.stderr[-2000:]
    r = _train(tiny_recipe, run)
    assert r.stdout.count("resuming from") == 1

    run_id = run_info(run)["run_id"]
    assert run_id == first[0]["id"]
    resumes = events(run, "resume")
    assert [e["step"] for e in resumes] == [20, 50]
    # metrics.jsonl: every step once, in order (the replayed steps were rewound, not repeated)
    train_steps = [e["step"] for e in events(run, "train")]
    assert train_steps == list(range(1, 81))
    assert [e["step"] for e in events(run, "eval")] == [20, 40, 60, 80]

    # A killed part lost an unknown tail, and only metrics.jsonl says what was logged: each
    # was set aside (kept, not synced) and its steps re-sent by the next part.
    aside = _wandb_parts(run, "wandb-unfinished")
    assert len(aside) == 2 and {p["id"] for p in aside} == {run_id}
    parts = _wandb_parts(run)
    assert len(parts) == 1 and parts[0]["id"] == run_id  # what `wandb sync RUN/wandb` uploads
    steps = [row["_step"] for p in parts for row in p["history"]]
    assert _strictly_increasing(steps), steps  # across the parts, in start order: no duplicates
    assert steps == train_steps  # complete: what a kill lost was re-sent from metrics.jsonl
    train = {e["step"]: e["train/loss"] for e in events(run, "train")}
    for row in (row for p in parts for row in p["history"]):
        assert row["train/loss"] == pytest.approx(train[row["_step"]], rel=1e-6)

    loss = _tensorboard_scalars(run, "train/loss")  # the replayed steps purged, then re-logged
    assert sorted(loss) == list(range(1, 81))
    assert all(loss[s] == pytest.approx(train[s], rel=1e-6) for s in loss)


def test_a_clean_stop_keeps_its_part_and_the_next_continues_after_it(tiny_recipe, tmp_path):
    """SIGTERM to the training process (a preemption) closes wandb cleanly: that part is
    complete, says so in metrics.jsonl, and the resumed part sends only the steps after it.
    (Signalled alone: wandb's own service process lives on to write the part out.)"""
    import os
    import signal
    import subprocess
    import time

    from procs import ROOT, command, env

    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), *TRACKED]
    proc = subprocess.Popen(
        command(args), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    reached, deadline = _logged_step(run, 23), time.monotonic() + 180
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=180)[0].decode()
    assert "stopped by a signal" in out, out[-3000:]
    (closed,) = events(run, "wandb")  # the part that closed cleanly, and how far it got
    stop = events(run, "train")[-1]["step"]
    assert closed["step"] == stop >= 23
    r = cli("train", str(tiny_recipe), "-o", str(run), *TRACKED, WANDB_MODE="offline")
    assert r.returncode == 0, r.stderr[-3000:]

    assert not (run / "wandb-unfinished").exists()  # nothing was set aside
    parts = _wandb_parts(run)
    assert len(parts) == 2 and {p["id"] for p in parts} == {run_info(run)["run_id"]}
    assert [row["_step"] for row in parts[0]["history"]] == list(range(1, stop + 1))
    steps = [row["_step"] for p in parts for row in p["history"]]
    assert steps == list(range(1, 81))  # complete, no step twice
    assert [e["step"] for e in events(run, "wandb")] == [stop, 80]


def test_report_on_real_runs(finished_run, tiny_recipe, tmp_path):
    from PIL import Image

    run, _ = finished_run
    other = tmp_path / "lr_high"
    r = cli(
        "train",
        str(tiny_recipe),
        "-o",
        str(other),
        "train.epochs=4",
        "optimizer.lr=0.3",
        "tracking.wandb.mode=disabled",
        nproc=1,
        WANDB_MODE="disabled",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "report"
    r = cli("report", str(run), str(other), "-o", str(out), WANDB_MODE="disabled")
    assert r.returncode == 0, r.stderr[-3000:]
    html = (out / "report.html").read_text()
    for name in ("loss.png", "metrics.png", "lr.png", "throughput.png", "confusion_matrix.png"):
        png = out / name
        assert png.stat().st_size > 10_000, name
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            small = img.convert("L").resize((64, 64))
            colours = len(set(small.getdata()))
            assert img.size[0] >= 600 and colours > 20, (name, img.size, colours)
    assert html.count("data:image/png;base64,") >= 5  # self-contained: plots inlined
    assert "lr_high" in html  # both runs are named tiny: labelled by their directories
