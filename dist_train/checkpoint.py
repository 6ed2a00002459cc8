"""Atomic full-state checkpoints, latest-complete lookup, and the unwrapped safetensors export.

A checkpoint is written by accelerate's `save_state` into `checkpoints/.tmp-step-N/`, every
file fsynced, the directory renamed to `step-N/`, and only then marked with a `COMPLETE` file.
A kill at any moment leaves either no `step-N/` or one without `COMPLETE`, which resume skips.
Our own counters live in `train_state.json` (plain JSON, not a pickle: accelerate loads custom
checkpoint objects with `weights_only=False`, which would execute code from a tampered file).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"
STATE_FILE = "train_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(accelerator, run_dir: Path, state: dict, keep: int, protect: int | None):
    """Collective: every rank must call it at the same step (each writes its own RNG state)."""
    root = checkpoint_dir(run_dir)
    step = state["step"]
    tmp, final = root / f".tmp-step-{step:06d}", root / f"step-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
    accelerator.wait_for_everyone()  # the temp dir is clean before any rank writes into it
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are written before main seals it
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, state)
        _fsync_tree(tmp)
        if final.exists():  # same step saved again (e.g. end of epoch == every_steps)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_json(final / MARKER, {"step": step})
        _fsync_dir(final)
        prune(root, keep, protect)
    accelerator.wait_for_everyone()  # nobody reads or resumes before the checkpoint is sealed
    return final


def latest_complete(run_dir: Path, notice=print) -> Path | None:
    """Newest `step-N/` with its COMPLETE marker; incomplete ones are skipped with a notice."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        if (path / MARKER).is_file() and (path / STATE_FILE).is_file():
            return path
        notice(f"skipping incomplete checkpoint {path} (the save was interrupted)")
    return None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def prune(root: Path, keep: int, protect: int | None) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())
    for path in done[:-keep]:
        if protect is None or path.name != f"step-{protect:06d}":
            shutil.rmtree(path, ignore_errors=True)


def export_model(model_state: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write `model.safetensors` atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))
