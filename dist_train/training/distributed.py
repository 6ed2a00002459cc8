"""The one Accelerator, the batch plan, DDP's unused-parameter probe, and rank agreement."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from dist_train.config.base import batch_split_error, per_device_batch
from dist_train.config.schema import Recipe
from dist_train.errors import UserError


def forget_previous_accelerator() -> None:
    """A second training in the same process (Python API, sweeps in a notebook) may ask for
    another precision; accelerate's AcceleratorState singleton would refuse ("AcceleratorState
    has already been initialized and cannot be changed"). accelerate has no public reset, so
    this uses the private `AcceleratorState._reset_state()` (kept: without it the second
    `train()` fails; tests/unit/test_trainer.py checks both that it still exists and that two
    precisions train in one process). The process-level PartialState (the group) is kept."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # clears the singleton's dict; a no-op the first time


def make_accelerator(recipe: Recipe):
    """CPU-only machines get `cpu=True`, which makes a multi-process launch a gloo job of world
    size N (without it, accelerate starts N silent world-size-1 jobs)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    precision = recipe.train.mixed_precision
    if cpu and precision == "fp16":
        raise UserError(
            "train.mixed_precision: fp16 needs a CUDA GPU (it relies on a gradient "
            'scaler and fp16 kernels); on a CPU use bf16 or "no".'
        )
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    forget_previous_accelerator()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        # Seedable sampler: the shuffle order depends only on (seed, epoch), never on the world
        # size, which is what makes resume and elastic resume exact.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        # Our schedule is stepped once per optimizer step (accelerate's wrapper would step it
        # once per process).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=recipe.train.collective_timeout_s))
        ],
    )
    if cpu:
        _cpu_processes(accelerator, recipe.train.threads)
    return accelerator


def _cpu_processes(accelerator, threads: int | None) -> None:
    """More gloo ranks than cores only adds all-reduce and context-switch cost: say so once.
    Without `train.threads`, each rank gets its share of the cores (torch would otherwise give
    every rank all of them: N x cores threads fighting over the cores)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if local > 1 and not threads:
        torch.set_num_threads(max(1, (cores or 1) // local))
    if local > (cores or local) and accelerator.is_main_process:
        warnings.warn(
            f"{local} processes on {cores} CPU cores: each step will be slower than with "
            f"{cores} (gloo all-reduce per step, ranks competing for cores). On one machine, one "
            "process using all cores (train.threads) is usually fastest.",
            stacklevel=3,
        )


def place_model(model: torch.nn.Module, device: torch.device, compile: bool) -> torch.nn.Module:
    """The model on its device before the optimizer exists (accelerate's prepare would move it
    later; fused optimizer kernels need the parameters there at construction). `compile` uses
    `Module.compile()`, in place: parameter names stay `layers.0.weight` in checkpoints and the
    export (a `torch.compile(model)` wrapper would prefix them with `_orig_mod.`)."""
    if device.type != "cpu":
        model = model.to(device)
    if compile:
        model.compile()
    return model


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    global_batch: int
    grad_accum: int
    per_device: int
    eval_per_device: int


def plan_batches(recipe: Recipe, world_size: int) -> BatchPlan:
    """`train.batch_size` is global: per-device batch = batch_size / (world_size * grad_accum)."""
    t = recipe.train
    error = batch_split_error(t.batch_size, world_size, t.grad_accum)
    if error:
        raise UserError(error)
    return BatchPlan(
        world_size,
        t.batch_size,
        t.grad_accum,
        per_device_batch(t.batch_size, world_size, t.grad_accum),
        eval_per_device(recipe, world_size),
    )


def eval_per_device(recipe: Recipe, world_size: int) -> int:
    """Evaluation batch per process: the global eval batch split over the ranks, rounded up
    (evaluation drops nothing: the padding of the last batch is removed when gathering)."""
    eval_global = recipe.data.eval_batch_size or recipe.train.batch_size
    return max(1, -(-eval_global // world_size))


def configure_ddp(accelerator, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, head):
    """Find trainable parameters that get no gradient (unused branches, a head the loss never
    reaches): DDP then needs find_unused_parameters, else it fails with "Expected to have
    finished reduction". Probed on a CPU copy (before placement) so batchnorm statistics and
    the model's gradients stay untouched. The same model on every rank: the same answer."""
    from accelerate.utils import DistributedDataParallelKwargs

    probe = copy.deepcopy(model)
    head.loss_fn(probe(x), y).backward()
    unused = [n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        if accelerator.is_main_process:  # said once, not once per rank
            print(
                f"note: {len(unused)} trainable parameters get no gradient ({unused[:3]}...); "
                "DDP runs with find_unused_parameters=True",
                flush=True,
            )
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)


def agree_any(accelerator, flag: bool) -> bool:
    """True on every rank if it is true on any rank (all-reduce max). Collective."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def from_main(accelerator, value):
    """Rank 0's value on every rank (a decision made once, then broadcast). Collective."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
