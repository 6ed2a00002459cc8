"""Atomic full-state checkpoints, latest-complete lookup, and the unwrapped safetensors export.

A checkpoint is written by accelerate's `save_state` into `checkpoints/.tmp-step-N/`, every
file fsynced, the directory renamed to `step-N/`, and only then marked with a `COMPLETE` file.
A kill at any moment leaves either no `step-N/` or one without `COMPLETE`, which resume skips.
Our own counters live in `train_state.json` (plain JSON, not a pickle: accelerate loads custom
checkpoint objects with `weights_only=False`, which would execute code from a tampered file).

Fault injection (tests only): `DIST_TRAIN_FAULT=<point>[@<step>]` SIGKILLs the process at that
point of a checkpoint save (of that step, or of every save), on every rank or only on rank
`DIST_TRAIN_FAULT_RANK`. The points, in order: `before-write` (temp dir clean, nothing
written), `after-weights` (accelerate's files written, no train_state.json), `before-fsync`,
`before-rename`, `before-marker` (renamed to step-N/, no COMPLETE), `after-marker` (sealed, not
pruned). Tests kill at a named point instead of polling the run directory and racing the save.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

from dist_train.errors import RunFailure, UserError

MARKER = "COMPLETE"
STATE_FILE = "train_state.json"
FAULT_POINTS = (
    "before-write",
    "after-weights",
    "before-fsync",
    "before-rename",
    "before-marker",
    "after-marker",
)


def _fault(point: str, step: int, rank: int) -> None:
    """SIGKILL this process here if DIST_TRAIN_FAULT names this point (and step, and rank):
    a kill, not an exception, so no cleanup code runs, exactly as under a real SIGKILL/OOM."""
    spec = os.environ.get("DIST_TRAIN_FAULT")
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name not in FAULT_POINTS:
        raise UserError(
            f"DIST_TRAIN_FAULT={spec}: unknown fault point `{name}`; choose one of "
            f"{', '.join(FAULT_POINTS)} (optionally @STEP), or unset it."
        )
    only_rank = os.environ.get("DIST_TRAIN_FAULT_RANK")
    if name == point and (not at or int(at) == step) and only_rank in (None, str(rank)):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    accelerator,
    run_dir: Path,
    state: dict,
    keep: int,
    protect: int | None,
    extra=None,
    shards=None,
):
    """Collective: every rank must call it at the same step (each writes its own RNG state).
    `extra(directory)`, if given, writes more files (the main process, before the fsync);
    `shards(directory)`: files every rank writes (the DCP shards of fsdp).

    A write that fails on any rank (a full disk above all) fails on every rank alike: the
    failures are agreed with an all-reduce, the temp dir is removed, the previous complete
    checkpoint stays the latest, and a full disk becomes a `UserError` naming the path."""
    root = checkpoint_dir(run_dir)
    step = state["step"]
    tmp, final = root / f".tmp-step-{step:06d}", root / f"step-{step:06d}"
    rank = accelerator.process_index

    def clean() -> None:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed

    _agreed(accelerator, _attempt(clean), tmp)
    # (the all-reduce above doubles as the barrier: the temp dir is clean before any rank
    # writes into it)
    # Collective all-reduce: every rank's files are written before main seals it, and a rank
    # that failed to write makes every rank give up at the same point.
    _fault("before-write", step, rank)

    def write() -> None:
        accelerator.save_state(str(tmp))
        if shards is not None:
            shards(tmp)

    _agreed(accelerator, _attempt(write), tmp)
    _fault("after-weights", step, rank)

    def seal() -> None:
        if not accelerator.is_main_process:
            return
        if extra is not None:
            extra(tmp)
        _write_json(tmp / STATE_FILE, state)
        _fault("before-fsync", step, rank)
        _fsync_tree(tmp)
        if final.exists():  # same step saved again (e.g. end of epoch == every_steps)
            shutil.rmtree(final)
        _fault("before-rename", step, rank)
        os.replace(tmp, final)
        _fsync_dir(root)
        _fault("before-marker", step, rank)
        try:
            _write_json(final / MARKER, {"step": step})
            _fsync_dir(final)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # never leave a renamed, unmarked dir
            raise
        _fault("after-marker", step, rank)
        prune(root, keep, protect)

    # Collective: nobody reads or resumes before the checkpoint is sealed (or all give up).
    _agreed(accelerator, _attempt(seal), tmp)
    return final


def _attempt(fn) -> BaseException | None:
    """Run a write; the exception it raised (not raised yet: the ranks must agree first)."""
    try:
        fn()
    except Exception as err:  # torch.save reports a full disk as a bare RuntimeError
        return err
    return None


def _agreed(accelerator, err: BaseException | None, tmp: Path) -> None:
    """Collective (all-reduce of [disk full, other failure] counts): if any rank failed, every
    rank removes the partial save and raises; only the failing rank re-raises a non-disk error
    with its traceback, the others report which save went wrong."""
    full = err is not None and disk_full(err, tmp)
    counts = (int(full), int(err is not None and not full))
    if accelerator.num_processes > 1:
        import torch

        t = torch.tensor(counts, dtype=torch.float32, device=accelerator.device)
        counts = tuple(int(v) for v in accelerator.reduce(t, reduction="sum").tolist())
    if not any(counts):
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # free the space the partial save took
    if counts[0]:
        raise UserError(disk_full_message(f"checkpoint {tmp}", err if full else None, tmp))
    if err is not None:
        raise err
    raise RunFailure(
        f"another rank failed while writing checkpoint {tmp} (see its error); "
        "the last complete checkpoint is intact."
    )


DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def disk_full(err: BaseException, path: Path) -> bool:
    """A write failed because the disk (or quota) is full. torch.save says only `unexpected pos
    ...` when its zip writer hits ENOSPC, so a failed write on a (nearly) full filesystem counts
    as well."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(s in str(err) for s in DISK_FULL_TEXT):
        return True
    free = free_bytes(path)
    return free is not None and free < 1 << 20


def free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def disk_full_message(what: str, err: BaseException | None, path: Path) -> str:
    if err is None:
        why = "another rank's disk is full"
    elif isinstance(err, OSError) and err.strerror:
        why = err.strerror
    else:  # torch.save's zip writer only says `unexpected pos`: name the cause instead
        why = next((s for s in DISK_FULL_TEXT if s in str(err)), "the filesystem is full")
    free = free_bytes(path)
    free_text = f", {free / 2**20:.1f} MiB free" if free is not None else ""
    return (
        f"no space left on the device while writing {what} ({why}{free_text}). The partial "
        "file was removed and the last complete checkpoint is intact. Free space or choose "
        "another -o directory (copy the run directory there to resume from its last "
        "checkpoint), then run the same command again."
    )


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
    """Write `model.safetensors` atomically (temp file, fsync, rename); a full disk is a
    `UserError` and leaves no temp file (an existing export stays as it was)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _fsync_file(tmp)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if disk_full(err, path.parent):
            raise UserError(disk_full_message(str(path), err, path.parent)) from None
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _write_json(tmp, data)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if disk_full(err, path.parent):
            raise UserError(disk_full_message(str(path), err, path.parent)) from None
        raise
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
