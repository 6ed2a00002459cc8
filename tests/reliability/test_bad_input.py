# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Bad input, the cases tests/unit/test_recipe_errors.py does not hold: checkpoints that do not
exist or do not fit, an unreadable image, an output dir that is a file, a full disk, and
"nothing written to an existing run". Each: exit 2, one message naming the file/key and the
fix, no traceback.

Covered elsewhere (not repeated): malformed YAML, empty recipe, unknown keys at every level,
wrong types, missing data file/column, labels outside num_classes or NaN, non-numeric features,
bad override syntax (tests/unit/test_recipe_errors.py); the finetune shape table and the eval
architecture mismatch of a real checkpoint, malicious pickles (tests/dist/test_finetune.py);
the corrupt image as a UserError (tests/unit/test_data.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import cli_here
from rel_helpers import bitwise_equal, cli, rel_data, rel_recipe, weights  # noqa: F401 (fixtures)
from safetensors.torch import save_file

from dist_train.cli import main


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`dist-train ARGS` in this process (seconds of imports saved per case); `train` installs
    signal handlers, which are put back afterwards."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
        return code, capsys.readouterr().err

    yield run
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _assert_user_error(code: int, err: str, *expect: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for want in expect:
        assert want in err, f"{want!r} missing from:\n{err}"


# --- checkpoints and images ------------------------------------------------------------------


@dataclass
class Case:
    id: str
    args: tuple[str, ...]  # {recipe}, {tmp} are filled in
    expect: tuple[str, ...]
    files: dict = field(default_factory=dict)


def _wrong_arch(path: Path) -> None:
    """A safetensors file whose tensors do not fit the rel recipe's model."""
    save_file(
        {
            "layers.0.weight": torch.zeros(5, 6),
            "layers.0.bias": torch.zeros(5),
            "head.weight": torch.zeros(3, 5),
        },
        str(path),
    )


def _images(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


CASES = [
    Case(
        "eval_checkpoint_missing",
        ("eval", "{recipe}", "--checkpoint", "{tmp}/nope/model.safetensors"),
        ("nope/model.safetensors", "file not found", "give the path"),
    ),
    Case(
        "eval_checkpoint_dir_without_weights",
        ("eval", "{recipe}", "--checkpoint", "{tmp}"),
        ("no model.safetensors in this directory",),
    ),
    Case(
        "finetune_from_missing",
        ("check", "{recipe}", "finetune.from={tmp}/gone.safetensors"),
        ("finetune.from", "gone.safetensors", "file not found"),
    ),
    Case(
        "eval_checkpoint_other_architecture",
        ("eval", "{recipe}", "--checkpoint", "{tmp}/other.safetensors"),
        (
            "does not fit this recipe's model",
            "layers.0.weight: file [5, 6] vs model [32, 6]",
            "layers.2.weight: missing from the file",
            "head.weight: in the file, not in the model",
            "use the recipe the checkpoint was trained with",
        ),
        files={"other.safetensors": _wrong_arch},
    ),
    Case(
        "finetune_from_other_architecture",
        ("check", "{recipe}", "finetune.from={tmp}/other.safetensors"),
        ("finetune.from", "layers.0.weight: checkpoint [5, 6] vs model [32, 6]", "finetune.reinit"),
        files={"other.safetensors": _wrong_arch},
    ),
    Case(
        "finetune_from_corrupt_safetensors",
        ("check", "{recipe}", "finetune.from={tmp}/torn.safetensors"),
        ("torn.safetensors", "not a valid safetensors file"),
        files={"torn.safetensors": lambda p: p.write_bytes(b"\x10\x00\x00\x00garbage")},
    ),
    Case(
        "imagefolder_unreadable_image",
        (
            "check",
            "{recipe}",
            "data.source=imagefolder:{tmp}/img",
            "~data.valid_source",
            "data.valid_fraction=0.25",
            "data.image_size=[6,6]",
            "data.channels=3",
            "model.layers=[flatten, {{linear: 4}}, relu, {{linear: out}}]",
        ),
        ("broken.png", "remove or replace"),
        files={"img": _images},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_case(case, rel_recipe, tmp_path, in_process, capsys):
    for name, make in case.files.items():
        make(tmp_path / name)
    args = [a.format(recipe=rel_recipe, tmp=tmp_path) for a in case.args]
    code, err = in_process(*args)
    with capsys.disabled():
        print(f"\n  [{case.id}] {err.removeprefix('error: ').splitlines()[0][:150]}", end="")
    _assert_user_error(code, err, *case.expect)


# --- an output dir that is a file; nothing written to an existing run ---------------------


def test_output_dir_that_is_a_file(rel_recipe, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    r = cli_here("train", str(rel_recipe), "-o", str(target))
    _assert_user_error(
        r.returncode,
        r.stderr,
        "notes.txt: is a file, not a directory",
        "choose another output directory",
    )
    assert target.read_text() == "my notes\n"


def _snapshot(run: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def existing_run(rel_data, tmp_path_factory):
    """An unfinished run with two complete checkpoints (SIGKILLed right after sealing the
    second), and its recipe."""
    from procs import cli_forked
    from rel_helpers import write_recipe

    tmp = tmp_path_factory.mktemp("existing")
    train_csv = tmp / "train.csv"
    shutil.copy(rel_data["train"], train_csv)
    recipe = write_recipe(tmp / "r.yaml", train_csv, rel_data["valid"])
    run = tmp / "run"
    args = ["train", str(recipe), "-o", str(run), "checkpoint.every_steps=5"]
    code = cli_forked(tmp / "killed.log", *args, DIST_TRAIN_FAULT="after-marker@10")
    assert code == -9, (tmp / "killed.log").read_text()[-3000:]
    done = [p.name for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()]
    assert sorted(done) == ["step-000005", "step-000010"]
    return recipe, run


BAD_RUNS = {
    "bad_override_syntax": (["train.epochs"], "override `train.epochs`"),
    "unknown_key_override": (["train.epoch=3"], "train.epoch: unknown key"),
    "wrong_type_override": (["optimizer.lr=fast"], "optimizer.lr"),
    "fp16_on_cpu": (["train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    "changed_recipe": (["optimizer.lr=0.5"], "checkpoint from a different recipe"),
}


@pytest.mark.parametrize("case", BAD_RUNS, ids=list(BAD_RUNS))
def test_a_rejected_command_writes_nothing_to_an_existing_run(case, existing_run, in_process):
    if case == "fp16_on_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a CUDA machine")
    recipe, run = existing_run
    overrides, expect = BAD_RUNS[case]
    before = _snapshot(run)
    code, err = in_process("train", str(recipe), *overrides, "-o", str(run))
    _assert_user_error(code, err, expect)
    assert _snapshot(run) == before


def test_malformed_recipe_file_writes_nothing_to_an_existing_run(
    existing_run, in_process, tmp_path
):
    _, run = existing_run
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nseed: 0\n  data: x\n")
    before = _snapshot(run)
    code, err = in_process("train", str(bad), "-o", str(run))
    _assert_user_error(code, err, "bad.yaml:3:", "malformed YAML")
    assert _snapshot(run) == before


def test_a_data_error_writes_nothing_to_an_existing_run(existing_run, in_process):
    recipe, run = existing_run
    train_csv = recipe.parent / "train.csv"
    moved = train_csv.with_name("moved.csv")
    before = _snapshot(run)
    train_csv.rename(moved)  # the same recipe, but its data file went away
    try:
        code, err = in_process("train", str(recipe), "checkpoint.every_steps=5", "-o", str(run))
    finally:
        moved.rename(train_csv)
    _assert_user_error(code, err, "train.csv not found")
    assert _snapshot(run) == before


# --- no space left on the device -------------------------------------------------------------

WIDE = ["model.layers.0={linear: 1024}", "train.log_every_steps=5"]  # ~210 KB per checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size, unmounted afterwards. Mounting needs root: skipped (saying so)
    when not root; as root (CI) a failed mount fails the test instead of hiding it."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root, where this runs)")
    mounts = []

    def make(size_kib: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"mount -t tmpfs failed as root: {r.stderr.strip()}"
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(rel_recipe, tmp_path, small_disk, reference_run):
    ref = reference_run(rel_recipe, *WIDE)
    ckpt = sum(p.stat().st_size for p in (ref / "checkpoints" / "step-000020").iterdir())
    # Room for the first checkpoint (step 20) and the logs, not for a second one (step 40).
    disk = small_disk(int(ckpt * 1.5) // 1024 + 64)
    run = disk / "run"
    r = cli("train", str(rel_recipe), "-o", str(run), *WIDE)
    _assert_user_error(
        r.returncode,
        r.stderr,
        f"no space left on the device while writing checkpoint {run}/checkpoints/.tmp-step-000040",
        "last complete checkpoint is intact",
        "Free space or choose another -o",
    )
    assert len(r.stderr.strip().splitlines()) == 1  # one paragraph
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000020"]  # no partial save left
    assert (ckpts / "step-000020" / "COMPLETE").is_file()
    assert not (run / "model.safetensors").exists()
    # On a bigger disk the same command resumes from the intact checkpoint and ends as if
    # nothing had happened.
    big = tmp_path / "big"
    shutil.copytree(run, big)
    r = cli_here("train", str(rel_recipe), "-o", str(big), *WIDE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {big}/checkpoints/step-000020" in r.stdout
    assert bitwise_equal(weights(big / "model.safetensors"), weights(ref / "model.safetensors"))


def test_disk_full_during_the_export_keeps_the_previous_file(small_disk):
    from dist_train.errors import UserError
    from dist_train.run.checkpoint import export_model

    disk = small_disk(256)
    target = disk / "model.safetensors"
    export_model({"w": torch.ones(4)}, target, {"step": "1"})
    (disk / "filler").write_bytes(b"\0" * (256 * 1024 - 3 * 4096 - target.stat().st_size))
    with pytest.raises(UserError, match="no space left on the device while writing") as err:
        export_model({"w": torch.zeros(64 * 1024)}, target, {"step": "2"})
    assert "Free space or choose another -o" in str(err.value)
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "model.safetensors"]
    assert bitwise_equal(weights(target), {"w": torch.ones(4)})


def test_disk_full_while_writing_run_json(small_disk):
    from dist_train.errors import UserError
    from dist_train.run.checkpoint import write_json_atomic

    disk = small_disk(64)
    write_json_atomic(disk / "run.json", {"status": "running"})  # one page of the 16
    (disk / "filler").write_bytes(b"\0" * (60 * 1024))  # fills the rest (tmpfs counts pages)
    with pytest.raises(UserError, match="no space left on the device while writing"):
        write_json_atomic(disk / "run.json", {"status": "running", "pad": "x" * 10000})
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "run.json"]  # no temp file left
    assert json.loads((disk / "run.json").read_text()) == {"status": "running"}  # intact


def test_eval_missing_checkpoint_names_the_flag(rel_recipe, tmp_path, in_process):
    code, err = in_process("eval", str(rel_recipe), "--checkpoint", f"{tmp_path}/nope.pt")
    _assert_user_error(code, err, "--checkpoint")
    assert "finetune.from" not in err
