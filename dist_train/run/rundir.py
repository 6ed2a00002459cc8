"""Run directory: where a run writes, and whether it starts, resumes or refuses.

Decided on the main process only and broadcast (`agree_run_dir`): a timestamp or a directory
listing must never differ between ranks. Nothing is written or deleted until the data, model
and optimizer were built (`materialize_run_dir`), so a mistake found while building leaves an
existing run untouched (also under --restart).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_train.config.recipe import dump_yaml, recipe_hash, resolved
from dist_train.errors import UserError
from dist_train.run.checkpoint import checkpoint_dir, latest_complete
from dist_train.training.distributed import from_main

# Keys that may change between a run and its resume without changing the math.
NOT_TRAINING_RELEVANT = (
    "name",
    "tracking",
    "checkpoint",
    "slurm",
    "sweep",
    "train.log_every_steps",
    "train.threads",
    "train.stop_check_every_steps",
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
    restart: bool = False  # --restart: every run file goes, but only in materialize_run_dir
    rank_recipe_hashes: list[str] = field(default_factory=list)  # filled in on every rank


def plan_run_dir(
    output_dir: str | None, name: str, resolved: dict, restart: bool, allow_changed: bool
) -> RunPlan:
    if output_dir is None:
        return RunPlan(str(timestamped_run_dir(name)))
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return RunPlan(
            str(run_dir),
            error=f"-o {run_dir}: is a file, not a directory; choose another output directory.",
        )
    if not run_dir.exists():
        return RunPlan(str(run_dir))
    if restart:  # cleared later, once the build succeeded (materialize_run_dir)
        return RunPlan(str(run_dir), notice=f"--restart: cleared {run_dir}", restart=True)
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


def agree_run_dir(accelerator, recipe, output_dir, restart: bool, allow_changed: bool) -> RunPlan:
    """Rank 0 decides (timestamp, resume or refuse) and broadcasts; every rank then acts alike.
    Nothing is written yet (see materialize_run_dir)."""
    plan = None
    if accelerator.is_main_process:  # one listing, one clock: rank 0's
        plan = plan_run_dir(output_dir, recipe.name, resolved(recipe), restart, allow_changed)
    plan = from_main(accelerator, plan)  # collective: all ranks get rank 0's plan
    if plan.error:
        raise UserError(plan.error)
    plan.rank_recipe_hashes = rank_hashes(accelerator, recipe)
    return plan


def materialize_run_dir(accelerator, plan: RunPlan, recipe) -> None:
    """Create/clear the run directory and write recipe.yaml — only once the data, model and
    optimizer were built, so a mistake found while building leaves an existing run untouched."""
    run_dir = Path(plan.run_dir)
    if accelerator.is_main_process:  # one rank touches the shared directory
        if plan.notice:
            print(plan.notice, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan.restart:
            for item in (*RUN_FILES, "checkpoints"):
                path = run_dir / item
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        elif not plan.resume_from:
            clear_for_new_run(run_dir)
        (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
    accelerator.wait_for_everyone()  # collective: the directory exists before any rank writes


def rank_hashes(accelerator, recipe) -> list[str]:
    """Every rank's hash of the recipe it parsed (collective): ranks that were handed different
    recipes or overrides would silently train different models; refuse instead."""
    mine = recipe_hash(recipe)
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    hashes = gather_object([mine])  # collective: every rank's hash on every rank
    if len(set(hashes)) > 1:
        raise UserError(
            f"the ranks were given different recipes (hashes {hashes}); launch every "
            "rank with the same recipe file and overrides."
        )
    return hashes


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
