"""Run directory: where a run writes, and whether it starts, resumes or refuses.

Decided on the main process only (the caller broadcasts the answer): a timestamp or a
directory listing must never differ between ranks.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_train.run.checkpoint import checkpoint_dir, latest_complete

# Keys that may change between a run and its resume without changing the math.
NOT_TRAINING_RELEVANT = (
    "name",
    "tracking",
    "checkpoint",
    "slurm",
    "sweep",
    "train.log_every_steps",
    "train.threads",
    "train.peak_tflops",
)
RUN_FILES = (
    "metrics.jsonl",
    "model.safetensors",
    "run.json",
    "recipe.yaml",
    "eval.json",
    "tensorboard",
    "wandb",
    "report.html",
)


@dataclass
class RunPlan:
    run_dir: str
    resume_from: str | None = None
    error: str | None = None
    notice: str | None = None
    rank_recipe_hashes: list[str] = field(default_factory=list)  # filled in on every rank


def plan_run_dir(
    output_dir: str | None, name: str, resolved: dict, restart: bool, allow_changed: bool
) -> RunPlan:
    if output_dir is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / name / stamp
        n = 1
        while run_dir.exists():
            run_dir, n = Path("runs") / name / f"{stamp}-{n}", n + 1
        return RunPlan(str(run_dir))
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return RunPlan(
            str(run_dir),
            error=f"-o {run_dir}: is a file, not a directory; choose another output directory.",
        )
    if not run_dir.exists():
        return RunPlan(str(run_dir))
    if restart:
        for item in (*RUN_FILES, "checkpoints"):
            path = run_dir / item
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return RunPlan(str(run_dir), notice=f"--restart: cleared {run_dir}")
    notices: list[str] = []
    ckpt = latest_complete(run_dir, notice=notices.append)
    if _finished(run_dir):
        return RunPlan(
            str(run_dir),
            error=f"{run_dir} holds a finished run; pass --restart to "
            "train it again from scratch, or choose another -o directory.",
        )
    if ckpt is None:
        return RunPlan(str(run_dir), notice="; ".join(notices) or None)
    changed = changed_fields(run_dir / "recipe.yaml", resolved)
    if changed and not allow_changed:
        return RunPlan(
            str(run_dir),
            error=(
                f"{run_dir} has a checkpoint from a different recipe "
                f"(changed: {', '.join(changed)})."
                " Resuming would mix two experiments; pass --allow-changed if you mean it, "
                "--restart to start over, or another -o directory."
            ),
        )
    notices.append(
        f"resuming from {ckpt}" + (f" with changed {', '.join(changed)}" if changed else "")
    )
    return RunPlan(str(run_dir), resume_from=str(ckpt), notice="; ".join(notices))


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def changed_fields(old_path: Path, new: dict) -> list[str]:
    try:
        old = yaml.safe_load(old_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["recipe.yaml (missing or unreadable)"]
    return [k for k in _diff(old, new, "") if not k.startswith(NOT_TRAINING_RELEVANT)]


def _diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = list(dict.fromkeys([*a, *b]))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def clear_for_new_run(run_dir: Path) -> None:
    """A run with no usable checkpoint starts over: stale logs must not mix into the new one."""
    for item in ("metrics.jsonl", "model.safetensors", "run.json"):
        (run_dir / item).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)


def timestamped_run_dir(name: str, root: str | Path = "runs") -> Path:
    """The default run directory `root/<name>/<YYYYmmdd-HHMMSS>` (relative, as given), with
    `-1`, `-2`, ... appended when it exists already (two runs started in the same second).
    One definition for `train` and `submit`, so both name the runs of a recipe alike."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = Path(root) / name / stamp, 1
    while run_dir.exists():
        run_dir, n = Path(root) / name / f"{stamp}-{n}", n + 1
    return run_dir
