"""Glue between the loop and the run directory: agree on it, log the plan, save, resume, export."""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from dist_train.config.recipe import dump_yaml, recipe_hash, resolved
from dist_train.config.schema import default_mode
from dist_train.errors import UserError
from dist_train.run import checkpoint
from dist_train.run.rundir import RunPlan, clear_for_new_run, plan_run_dir
from dist_train.run.tracking import RunLog
from dist_train.training.distributed import from_main


def agree_run_dir(accelerator, recipe, output_dir, restart: bool, allow_changed: bool) -> RunPlan:
    """Rank 0 decides (timestamp, resume or refuse) and broadcasts; every rank then acts alike.
    Nothing is written yet (see materialize_run_dir)."""
    plan = None
    if accelerator.is_main_process:
        plan = plan_run_dir(output_dir, recipe.name, resolved(recipe), restart, allow_changed)
    plan = from_main(accelerator, plan)  # collective: all ranks get rank 0's plan
    if plan.error:
        raise UserError(plan.error)
    plan.rank_recipe_hashes = _rank_hashes(accelerator, recipe)
    return plan


def materialize_run_dir(accelerator, plan: RunPlan, recipe) -> None:
    """Create/clear the run directory and write recipe.yaml — only once the data, model and
    optimizer were built, so a mistake found while building leaves an existing run untouched."""
    run_dir = Path(plan.run_dir)
    if accelerator.is_main_process:
        if plan.notice:
            print(plan.notice, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not plan.resume_from:
            clear_for_new_run(run_dir)
        (run_dir / "recipe.yaml").write_text(dump_yaml(recipe))
    accelerator.wait_for_everyone()  # the directory exists before any rank writes into it


def _rank_hashes(accelerator, recipe) -> list[str]:
    """Every rank's hash of the recipe it parsed (collective): ranks that were handed different
    recipes or overrides would silently train different models; refuse instead."""
    mine = recipe_hash(recipe)
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    hashes = gather_object([mine])
    if len(set(hashes)) > 1:
        raise UserError(
            f"the ranks were given different recipes (hashes {hashes}); launch every "
            "rank with the same recipe file and overrides."
        )
    return hashes


def configure_ddp(accelerator, model, data, head) -> None:
    """Find trainable parameters that get no gradient (unused branches, a head the loss never
    reaches): DDP then needs find_unused_parameters, else it fails with "Expected to have
    finished reduction". Probed on a copy so batchnorm statistics stay untouched."""
    from accelerate.utils import DistributedDataParallelKwargs

    probe = copy.deepcopy(model)
    x, y = data.train.x[:2], data.train.y[:2]
    head.loss_fn(probe(x), y).backward()
    unused = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        if accelerator.is_main_process:
            print(
                f"note: {len(unused)} trainable parameters get no gradient ({unused[:3]}...); "
                "DDP runs with find_unused_parameters=True",
                flush=True,
            )
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)


def open_log(
    accelerator,
    run_dir: Path,
    recipe,
    run: RunPlan,
    state,
    total: int,
    plan,
    model,
    notes: list[str],
    steps_per_epoch: int | None = None,
    flops: tuple[float | None, float | None] = (None, None),
) -> RunLog:
    """The run's log on every rank (a no-op object off the main process): trackers opened once,
    run.json written, the plan printed once. A resumed run keeps its tracker run id."""
    import shutil

    resume_step = state.step if run.resume_from else None
    if accelerator.is_main_process and resume_step is None:
        for stale in ("tensorboard", "wandb"):  # an attempt that never reached a checkpoint
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    log = RunLog(
        run_dir,
        accelerator.is_main_process,
        total,
        recipe.tracking,
        resolved(recipe),
        run_id=state.run_id,
        resume_step=resume_step,
    )
    state.run_id = log.run_id  # saved with every checkpoint: the resumed job continues this run
    if accelerator.is_main_process:
        info = _run_info(accelerator, recipe, plan, total, model, steps_per_epoch, log.run_id)
        info["rank_recipe_hashes"] = run.rank_recipe_hashes
        info["train_flops_per_sample"], info["peak_tflops"] = flops
        checkpoint.write_json_atomic(run_dir / "run.json", info | {"status": "running"})
        log.info(_plan_text(info, run_dir))
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


def _run_info(
    accelerator,
    recipe,
    plan,
    total: int,
    model,
    steps_per_epoch: int | None = None,
    run_id: str | None = None,
) -> dict:
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
    t = recipe.train
    if steps_per_epoch is None and (not t.max_steps or total < t.max_steps):
        steps_per_epoch = total // max(t.epochs, 1)  # total = steps per epoch x epochs here
    return {
        "name": recipe.name,
        "recipe_hash": recipe_hash(recipe),
        "run_id": run_id,
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
        "global_batch": plan.global_batch,
        "per_device_batch": plan.per_device,
        "grad_accum": plan.grad_accum,
        "steps_per_epoch": steps_per_epoch,
        "epochs": t.epochs,
        "total_steps": total,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "monitor": monitor,
        "mode": (best.mode if best else None) or default_mode(monitor),
        "python": platform.python_version(),
        "versions": versions,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _plan_text(info: dict, run_dir: Path) -> str:
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
        + _flops_text(info.get("train_flops_per_sample"), info.get("peak_tflops"))
    )


def _flops_text(per_sample: float | None, peak: float | None) -> str:
    if not per_sample:
        return ""
    mfu = f", MFU against {peak:g} TFLOP/s per process" if peak else ""
    return f"\n  {per_sample / 1e6:.3g} MFLOP per training sample (3x forward){mfu}"


def save(accelerator, run_dir: Path, recipe, state) -> Path:
    """Collective: the synchronized, atomic full-state save (every rank, same step)."""
    return checkpoint.save_checkpoint(
        accelerator, run_dir, asdict(state), recipe.checkpoint.keep, state.best_step
    )


def resume(accelerator, path: Path, state):
    """Load model/optimizer/schedule/scaler/RNG through accelerate, then our JSON counters."""
    saved = checkpoint.read_state(path)
    accelerator.wait_for_everyone()  # the checkpoint was sealed before anyone loads it
    _check_rng_file(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # weights_only refusals, corrupt or truncated files
        raise UserError(
            f"checkpoint {path}: cannot be loaded ({str(err).splitlines()[0][:160]}). It may be "
            "corrupt or tampered with (files load only as plain tensors, never as pickled "
            "code). Delete this checkpoint directory to resume from the previous one, or "
            "pass --restart."
        ) from None
    for key, value in saved.items():
        if hasattr(state, key):
            setattr(state, key, value)
    state.history = [*saved.get("history", []), saved.get("world_size", 1)]
    if saved.get("world_size") != accelerator.num_processes and accelerator.is_main_process:
        print(
            f"elastic resume: checkpoint from {saved.get('world_size')} processes, now "
            f"{accelerator.num_processes}; continuing after {saved['step']} optimizer steps "
            f"(global batch unchanged, so the same samples come next)",
            flush=True,
        )
    state.world_size = accelerator.num_processes
    return state


def _check_rng_file(path: Path, rank: int) -> None:
    """accelerate swallows a refused RNG file (logs at INFO and resumes with fresh RNGs, so the
    resume is silently inexact); load it the same safe way first and fail loudly instead."""
    from accelerate.utils.other import load as safe_load  # weights_only + numpy's RNG types

    rng = path / f"random_states_{rank}.pkl"
    if not rng.is_file():
        return  # elastic resume onto more ranks: the new ranks start fresh RNG streams
    try:
        safe_load(rng, map_location="cpu")
    except Exception as err:
        raise UserError(
            f"checkpoint {path}: {rng.name} cannot be loaded safely "
            f"({str(err).splitlines()[0][:120]}); delete this checkpoint directory "
            "to resume from the previous one."
        ) from None


def export(accelerator, model, run_dir: Path, recipe, data, state, result: dict) -> None:
    """model.safetensors from the unwrapped model (no `module.` prefix), then run.json done."""
    accelerator.wait_for_everyone()  # all ranks finished their last step
    if not accelerator.is_main_process:
        return
    net = accelerator.unwrap_model(model)
    meta = {
        "recipe_hash": recipe_hash(recipe),
        "input_shape": json.dumps(list(data.input_shape)),
        "classes": json.dumps(data.classes),
        "task": recipe.data.task,
        "step": str(state.step),
    }
    checkpoint.export_model(net.state_dict(), run_dir / "model.safetensors", meta)
    info = json.loads((run_dir / "run.json").read_text())
    info |= {
        "status": "finished",
        "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": state.step,
        "best_value": state.best_value,
        "best_step": state.best_step,
        "final": {k: v for k, v in result.items() if not isinstance(v, list)},
    }
    checkpoint.write_json_atomic(run_dir / "run.json", info)
    print(f"saved {run_dir / 'model.safetensors'}", flush=True)
