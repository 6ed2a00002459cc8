"""The run's log: trackers opened once, run.json written, the plan printed once."""

from __future__ import annotations

import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from dist_train.config.base import default_mode
from dist_train.config.recipe import recipe_hash, resolved
from dist_train.run import checkpoint
from dist_train.run.rundir import RunPlan
from dist_train.run.state import TrainState
from dist_train.run.tracking import RunLog


def open_log(
    accelerator,
    run: RunPlan,
    recipe,
    state: TrainState,
    info: dict,
    notes: list[str],
) -> RunLog:
    """The run's log on every rank (a no-op object off the main process). A resumed run keeps
    its tracker run id. `info` is `run_info(...)`: written to run.json by the main process."""
    run_dir = Path(run.run_dir)
    resume_step = state.step if run.resume_from else None
    if accelerator.is_main_process and resume_step is None:
        for stale in ("tensorboard", "wandb"):  # an attempt that never reached a checkpoint
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    log = RunLog(
        run_dir,
        accelerator.is_main_process,
        info["total_steps"],
        recipe.tracking,
        resolved(recipe),
        run_id=state.run_id,
        resume_step=resume_step,
    )
    state.run_id = log.run_id  # saved with every checkpoint: the resumed job continues this run
    if accelerator.is_main_process:  # output via the main process only
        info = info | {"run_id": log.run_id, "rank_recipe_hashes": run.rank_recipe_hashes}
        checkpoint.write_json_atomic(run_dir / "run.json", info | {"status": "running"})
        log.info(plan_text(info, run_dir))
        for note in notes:
            log.info(note)
        if run.resume_from:
            log.event(
                "resume",
                step=state.step,
                epoch=state.epoch,
                world_size=accelerator.num_processes,
                previous=state.history,
            )
    return log


def run_info(accelerator, recipe, plan, total: int, steps_per_epoch: int, model) -> dict:
    """What run.json records about the run before it starts (the batch plan, sizes, versions)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    versions = {}
    for pkg in ("torch", "accelerate", "datasets", "torchmetrics", "wandb"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    best = recipe.checkpoint.best
    monitor = best.monitor if best else "valid/loss"
    return {
        "name": recipe.name,
        "recipe_hash": recipe_hash(recipe),
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
        "global_batch": plan.global_batch,
        "per_device_batch": plan.per_device,
        "grad_accum": plan.grad_accum,
        "steps_per_epoch": steps_per_epoch,
        "epochs": recipe.train.epochs,
        "total_steps": total,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "monitor": monitor,
        "mode": (best.mode if best else None) or default_mode(monitor),
        "python": platform.python_version(),
        "versions": versions,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plan_text(info: dict, run_dir: Path) -> str:
    per_epoch = info.get("steps_per_epoch")
    epochs = f"{per_epoch} steps per epoch x {info.get('epochs')} epochs = " if per_epoch else ""
    return (
        f"dist-train: {info['name']} -> {run_dir}\n"
        f"  world size {info['world_size']} ({info['distributed_type']}, {info['device']}), "
        f"precision {info['mixed_precision']}\n"
        f"  batch {info['global_batch']} global = {info['per_device_batch']} per device x "
        f"{info['world_size']} processes x {info['grad_accum']} accumulation\n"
        f"  {epochs}{info['total_steps']} optimizer steps\n"
        f"  parameters {info['trainable_params']:,} trainable, {info['frozen_params']:,} frozen"
        + flops_text(info.get("train_flops_per_sample"), info.get("peak_tflops"))
        + bytes_text(info.get("strategy"), info.get("per_rank_bytes"))
        + (f"\n  {info['data']}" if info.get("data") else "")
    )


def bytes_text(strategy: str | None, figures: dict | None) -> str:
    if not figures:
        return ""
    from dist_train.training.fsdp import format_bytes

    return f"\n  {strategy}, per rank: {format_bytes(figures)}"


def flops_text(per_sample: float | None, peak: float | None) -> str:
    if not per_sample:
        return ""
    mfu = f", MFU against {peak:g} TFLOP/s per process" if peak else ""
    return f"\n  {per_sample / 1e6:.3g} MFLOP per training sample (3x forward){mfu}"
