"""train.strategy: fsdp (FSDP2) on real gloo ranks: equal to one process, sharded memory, exact
metrics, sharded (DCP) checkpoints that resume bitwise and reshard to 1 and 3 ranks, and an
export that loads into the bare model. Few launches, many assertions each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist_helpers import audit_rows, events, preempt, run_info
from procs import bitwise_equal, cli, cli_here, max_diff, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# 20 steps per epoch x 3 epochs = 60 optimizer steps, 2 micro-batches each, clipped; a
# checkpoint every 7 steps puts them mid-epoch.
FSDP = [
    "train.strategy=fsdp",
    "train.grad_accum=2",
    "train.max_grad_norm=0.5",
    "checkpoint.every_steps=7",
    "train.activation_checkpointing=true",  # composed with sharding: block = unit
]
AUDIT = {"DIST_TRAIN_AUDIT_SAMPLES": "1"}


def _final_eval(run: Path) -> dict:
    return events(run, "eval")[-1]


def test_fsdp_on_two_ranks_equals_one_process_and_shards_memory(
    tiny_recipe, reference_run, tmp_path
):
    """One 2-rank FSDP run (with activation checkpointing composed with sharding) against one
    process: weights within 1e-5 after 60 steps with accumulation and clipping, the same exact
    metrics over the 97 validation rows, rank 0 holding <= 0.55x the parameter + optimizer
    bytes, checkpoints written as one DCP shard file per rank, and an export that loads
    strictly into the bare model and reproduces the sharded model's validation metrics."""
    one = reference_run(tiny_recipe, *FSDP[1:])
    two = reference_run(tiny_recipe, *FSDP, nproc=2, **AUDIT)  # shared with the resume test
    assert run_info(two)["world_size"] == 2 and run_info(one)["world_size"] == 1
    assert run_info(two)["steps"] == 60
    assert max_diff(weights(two / "model.safetensors"), weights(one / "model.safetensors")) < 1e-5
    got, want = _final_eval(two), _final_eval(one)
    assert got["valid/rows"] == want["valid/rows"] == 97
    assert got["valid/loss"] == pytest.approx(want["valid/loss"], abs=1e-5)
    assert got["valid/accuracy"] == want["valid/accuracy"]
    assert got["valid/confusion_matrix"] == want["valid/confusion_matrix"]
    mem_two, mem_one = events(two, "memory")[-1], events(one, "memory")[-1]
    sharded = mem_two["params"] + mem_two["optimizer"]
    assert sharded <= 0.55 * (mem_one["params"] + mem_one["optimizer"]), (mem_two, mem_one)
    for ckpt in (two / "checkpoints").glob("step-*"):
        files = sorted(p.name for p in (ckpt / "sharded").iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], files
        assert not list(ckpt.glob("model*.safetensors"))  # no gathered copy in checkpoints
    # The export: a plain state dict (strict load inside `eval`) and the same metrics.
    out = tmp_path / "eval.json"
    r = cli_here(
        "eval",
        str(tiny_recipe),
        *FSDP,
        "--checkpoint",
        str(two / "model.safetensors"),
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    exported = json.loads(out.read_text())
    assert exported["valid/rows"] == 97
    assert exported["valid/loss"] == pytest.approx(got["valid/loss"], abs=1e-6)
    assert exported["valid/accuracy"] == got["valid/accuracy"]


def test_sharded_checkpoint_resumes_bitwise_and_reshards_to_one_and_three_ranks(
    tiny_recipe, reference_run, tmp_path
):
    """kill -9 of rank 1 as the save of step 28 begins (step 21, mid-epoch, is the latest
    complete checkpoint). Resumed on 2 ranks: bitwise equal to the uninterrupted 2-rank run.
    Copies resumed on 1 and on 3 processes: every step trains exactly the rows the
    uninterrupted run trained (audited), weights within 1e-5."""
    ref = reference_run(tiny_recipe, *FSDP, nproc=2, **AUDIT)
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), *FSDP]
    r = cli(*args, nproc=2, DIST_TRAIN_FAULT="before-write@28", DIST_TRAIN_FAULT_RANK="1", **AUDIT)
    assert r.returncode != 0, r.stdout[-2000:]
    latest = sorted(p.name for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    assert latest and not (run / "checkpoints" / "step-000028" / "COMPLETE").exists()
    copies = {n: tmp_path / f"copy{n}" for n in (1, 3)}
    for copy in copies.values():
        shutil.copytree(run, copy)
        for log in (copy / "samples").glob("*.log"):  # rows of the killed part: retrained
            log.unlink()
    r = cli(*args, nproc=2, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "step-000021" in r.stdout
    assert run_info(run)["world_size"] == run_info(ref)["world_size"] == 2
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
    want = audit_rows(ref)
    for n, copy in copies.items():
        resume_args = ["train", str(tiny_recipe), "-o", str(copy), *FSDP]
        r = cli_here(*resume_args, **AUDIT) if n == 1 else cli(*resume_args, nproc=n, **AUDIT)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert run_info(copy)["world_size"] == n
        assert "elastic resume: checkpoint from 2 processes" in r.stdout
        got = audit_rows(copy)
        assert sorted(got) == list(range(21, 60))  # the steps after the checkpoint, once each
        assert all(got[s] == want[s] for s in got), n
        diff = max_diff(weights(copy / "model.safetensors"), weights(ref / "model.safetensors"))
        assert diff < 1e-5, (n, diff)


def test_switching_strategy_on_resume_is_refused(tiny_recipe, tmp_path):
    """A DDP checkpoint does not resume as FSDP: exit 2, naming the key and the fix."""
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), "checkpoint.every_steps=7"]
    r = cli(*args, DIST_TRAIN_FAULT="before-write@14")  # killed: a run to resume
    assert r.returncode != 0 and (run / "checkpoints/step-000007/COMPLETE").is_file()
    r = cli_here(*args, "train.strategy=fsdp", "--allow-changed")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "written with train.strategy ddp, this run uses fsdp" in r.stdout + r.stderr


def test_nonfinite_step_is_skipped_alike_on_every_shard(
    tiny_data, tiny_recipe, reference_run, tmp_path
):
    """One training row with f0 = inf: its step's gradients are NaN. On 2 FSDP ranks the
    guard (the global norm of the sharded gradients) skips that step on both, as one process
    does: the same skipped step, and weights within 1e-5 of the one-process run. Both
    fine-tune from a pretrained file with the first layer frozen (FSDP2 with frozen
    parameters; built plainly, then sharded): the frozen tensors stay bitwise unchanged."""
    pretrained = reference_run(tiny_recipe, *FSDP[1:]) / "model.safetensors"
    lines = tiny_data["train"].read_text().splitlines()
    cells = lines[101].split(",")
    lines[101] = ",".join(["inf", *cells[1:]])
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    common = [
        f"data.source=csv:{bad}",
        "data.standardize=false",
        "train.on_nonfinite=skip",
        "train.epochs=1",
        "train.log_every_steps=5",
        f"finetune={{from: {pretrained}, freeze: ['layers.0.*']}}",
    ]
    runs = {n: tmp_path / f"run{n}" for n in (1, 2)}
    for n, run in runs.items():
        args = ["train", str(tiny_recipe), "-o", str(run), *common, "train.strategy=fsdp"]
        r = cli_here(*args) if n == 1 else cli(*args, nproc=n)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert run_info(run)["world_size"] == n
    skipped = [[e["step"] for e in events(run, "nonfinite")] for run in runs.values()]
    assert skipped[0] == skipped[1] and len(skipped[0]) == 1, skipped
    one, two = (weights(run / "model.safetensors") for run in runs.values())
    assert max_diff(one, two) < 1e-5
    start = weights(pretrained)
    assert all(bool((two[k] == start[k]).all()) for k in ("layers.0.weight", "layers.0.bias"))
    assert not bool((two["layers.2.weight"] == start["layers.2.weight"]).all())  # trained


def test_preempted_sharded_run_saves_and_resumes_bitwise(tiny_recipe, reference_run, tmp_path):
    """SIGTERM on 2 fsdp ranks mid-epoch: the synchronized stop saves a sharded (DCP)
    checkpoint and exits 75; the resumed run ends bitwise equal to the uninterrupted one."""
    ref = reference_run(tiny_recipe, *FSDP, nproc=2, **AUDIT)
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), "-o", str(run), *FSDP]
    preempt(args, run, 2, at_step=27)
    saved = sorted(p.parent.name for p in (run / "checkpoints").glob("step-*/COMPLETE"))
    assert saved and list((run / "checkpoints" / saved[-1] / "sharded").iterdir()), saved
    r = cli(*args, nproc=2, **AUDIT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and run_info(run)["world_size"] == 2
    assert bitwise_equal(weights(run / "model.safetensors"), weights(ref / "model.safetensors"))
