"""Creates the one Accelerator, prepares everything, and runs the one readable training loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_train import build
from dist_train.config.schema import Recipe, default_mode
from dist_train.data.augment import augment_batch, augment_generator
from dist_train.data.loaders import fast_batches, make_loader
from dist_train.errors import CollectiveFailure, UserError
from dist_train.run.io import (
    agree_run_dir,
    configure_ddp,
    export,
    materialize_run_dir,
    open_log,
    resume,
    save,
)
from dist_train.run.tracking import RunLog
from dist_train.training import signals
from dist_train.training.distributed import (
    agree_any,
    from_main,
    make_accelerator,
    place_model,
    plan_batches,
)
from dist_train.training.evaluate import evaluate
from dist_train.training.flops import peak_tflops, train_flops_per_sample
from dist_train.training.step import StepOutput, handle_nonfinite, train_step

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint saved; please requeue


@dataclass
class TrainState:
    """Counters saved with every checkpoint (as JSON) and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done inside `epoch`
    world_size: int = 1
    best_value: float | None = None
    best_step: int | None = None
    es_best: float | None = None  # best early-stopping monitor value so far
    stale_evals: int = 0  # evaluations without improvement (early stopping)
    nonfinite_streak: int = 0  # consecutive steps skipped for a NaN/inf gradient
    run_id: str | None = None  # tracker run continued after resume
    history: list = field(default_factory=list)  # world sizes this run has used


def train(
    recipe: Recipe,
    output_dir: str | None = None,
    restart: bool = False,
    allow_changed: bool = False,
) -> dict:
    """Train a recipe; returns the final evaluation. Same numbers on 1 or N processes."""
    accelerator = make_accelerator(recipe)
    from accelerate.utils import set_seed

    # Dropout & co. draw from the global RNGs: seeded per rank (distinct masks on each rank),
    # so a rerun is bitwise identical; a resume restores them from the checkpoint.
    set_seed(recipe.seed, device_specific=True)
    plan = plan_batches(recipe, accelerator.num_processes)
    run = agree_run_dir(accelerator, recipe, output_dir, restart, allow_changed)
    run_dir = Path(run.run_dir)
    data = _load_data_once(accelerator, recipe)
    head = build.make_head(recipe)
    model = build.build_net(recipe, data, head)
    from dist_train.model.finetune import prepare_finetune

    notes = prepare_finetune(model, recipe.finetune, accelerator.is_main_process)
    if accelerator.num_processes > 1:
        configure_ddp(accelerator, model, data, head)  # probes a CPU copy: before placement
    # On a GPU the model moves there before the optimizer is built (fused optimizer kernels
    # need the parameters' device); `train.compile` compiles it in place (clean state dicts).
    model = place_model(model, accelerator.device, recipe.train.compile)
    # Counted once on two rows, with no effect on the weights, statistics or random streams.
    flops = train_flops_per_sample(model, data.train.x[:2].to(accelerator.device))
    peak = peak_tflops(accelerator.device, recipe.train.peak_tflops)
    optimizer = build.build_optimizer(model, recipe.optimizer)
    total = build.total_steps(recipe, len(data.train.y))
    if total == 0:
        raise UserError(
            f"train.batch_size {recipe.train.batch_size} is larger than the "
            f"{len(data.train.y)} training rows; lower it."
        )
    scheduler = build.build_scheduler(optimizer, recipe.scheduler, total, recipe.optimizer.lr)
    train_dl = make_loader(data.train, plan.per_device, True, True, seed=recipe.seed)
    valid_dl = make_loader(data.valid, plan.eval_per_device, False, False) if data.valid else None
    materialize_run_dir(accelerator, run, recipe)  # built fine: now the directory may change
    model, optimizer, train_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, scheduler
    )
    valid_dl = accelerator.prepare(valid_dl) if valid_dl is not None else None
    state = TrainState(world_size=accelerator.num_processes)
    if run.resume_from:
        state = resume(accelerator, Path(run.resume_from), state)
    per_epoch = build.steps_per_epoch(len(data.train.y), recipe.train.batch_size)
    log = open_log(
        accelerator,
        run_dir,
        recipe,
        run,
        state,
        total,
        plan,
        model,
        notes,
        steps_per_epoch=per_epoch,
        flops=(flops, peak),
    )
    loop = Loop(
        recipe,
        accelerator,
        model,
        head,
        optimizer,
        scheduler,
        train_dl,
        valid_dl,
        state,
        log,
        run_dir,
        total,
        per_epoch,
        audit=_open_audit(run_dir, accelerator.process_index),
        heartbeat=signals.Heartbeat(accelerator.process_index, accelerator.num_processes),
        flops_per_sample=flops,
        peak_tflops=peak,
    )
    try:
        return fit(loop, data)
    except Exception as err:
        if accelerator.num_processes > 1 and signals.is_collective_failure(err):
            raise CollectiveFailure(_collective_report(loop, err)) from None
        raise
    finally:
        log.close()
        if loop.audit is not None:
            loop.audit.close()


def _collective_report(loop: Loop, err: BaseException) -> str:
    acc, t = loop.accelerator, loop.recipe.train
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (
        f"rank {acc.process_index}/{acc.num_processes}: lost the other ranks during "
        f"{signals.phase()} (train.collective_timeout_s={t.collective_timeout_s}). "
        f"{loop.heartbeat.peers()}. A rank died or stalled: read its log; the last complete "
        f"checkpoint in {loop.run_dir / 'checkpoints'} is intact and resumes with the same "
        f"command. ({first})"
    )


def _load_data_once(accelerator, recipe):
    """Rank 0 loads first (the datasets cache is written once, then reused). A data error is
    held until everyone has left the barrier, then raised on every rank alike: otherwise rank 0
    would exit mid-barrier and the others would die with a gloo traceback."""
    data, error = None, None
    with accelerator.main_process_first():
        try:
            data = build.build_data(recipe)
        except UserError as err:
            error = err
    if error is not None:
        raise error
    return data


@dataclass
class Loop:
    """What the loop works with; one object so the step functions stay small."""

    recipe: Recipe
    accelerator: object
    model: object
    head: object
    optimizer: object
    scheduler: object
    train_dl: object
    valid_dl: object
    state: TrainState
    log: RunLog
    run_dir: Path
    total: int
    per_epoch: int
    audit: object = None
    metrics: object = None
    heartbeat: object = None
    loss_sum: object = None  # train loss summed on device since the last log line
    n_loss: int = 0
    tick: float = 0.0
    flops_per_sample: float | None = None  # training FLOPs (3x forward), for model_tflops / mfu
    peak_tflops: float | None = None  # per process, for mfu
    result: dict = field(default_factory=dict)


def fit(loop: Loop, data) -> dict:
    """The loop. Periodic work is an explicit `if` at an optimizer-step boundary."""
    recipe, state, t = loop.recipe, loop.state, loop.recipe.train
    signals.install()  # no-op if the CLI already did; covers the Python API
    loop.metrics = _metric_set(recipe, data, loop.accelerator)
    loop.loss_sum = torch.zeros((), device=loop.accelerator.device)  # no sync per step
    loop.tick = time.perf_counter()
    outcome = None
    for epoch in range(state.epoch, t.epochs):
        outcome = run_epoch(loop, epoch)
        if outcome == "preempted":
            break
        paused = time.perf_counter()  # eval and saves are not training time (samples/s)
        end_of_epoch = state.step_in_epoch >= loop.per_epoch
        if end_of_epoch:
            state.epoch, state.step_in_epoch = epoch + 1, 0
        if loop.valid_dl is not None and (outcome or (epoch + 1) % t.eval_every_epochs == 0):
            outcome = _evaluate(loop, epoch) or outcome
        every = recipe.checkpoint.every_epochs
        if outcome or (every and end_of_epoch and (epoch + 1) % every == 0):
            signals.set_phase(f"checkpoint save at step {state.step}")
            save(loop.accelerator, loop.run_dir, recipe, state)
        if outcome:
            break
        loop.tick += time.perf_counter() - paused
    if outcome == "preempted":
        _preempted_exit(loop)
    loop.log.summary(loop.result, state.best_step)  # end-of-run table, main process only
    export(loop.accelerator, loop.model, loop.run_dir, recipe, data, state, loop.result)
    return loop.result


def run_epoch(loop: Loop, epoch: int) -> str | None:
    """Micro-batches of one epoch (from the resume position); 'finished' / 'preempted' / None."""
    recipe, state, acc = loop.recipe, loop.state, loop.accelerator
    accum = recipe.train.grad_accum
    state.epoch = epoch
    loop.train_dl.set_epoch(epoch)  # seedable sampler: the order depends on (seed, epoch) only
    skip = state.step_in_epoch * accum  # resume mid-epoch: micro-batches already trained
    # In-memory rows: whole batches sliced by the loader's own (sharded, seeded) batch sampler.
    batches = fast_batches(loop.train_dl, skip)
    if batches is None:  # any other loader: accelerate's iteration
        batches = loop.train_dl
    if batches is loop.train_dl and skip:
        batches = acc.skip_first_batches(loop.train_dl, skip)
        # The new loader's __iter__ calls set_epoch(its own iteration count, 0): without this
        # it would replay epoch 0's order instead of this epoch's.
        batches.set_epoch(epoch)
    loop.log.start_epoch(epoch, recipe.train.epochs, loop.per_epoch, state.step_in_epoch)
    step_rows: list = []
    outcome = None
    for micro, (x, y, idx) in enumerate(batches, start=skip):
        if micro >= loop.per_epoch * accum:
            break  # tail shorter than one accumulation group: dropped (see drop_last)
        if loop.audit is not None:
            loop.audit.write(f"{epoch} {state.step} {','.join(map(str, idx.tolist()))}\n")
        if recipe.data.augment:
            gen = augment_generator(recipe.seed, state.step, micro % accum, acc.process_index)
            x = augment_batch(x, recipe.data.augment, gen)
        boundary = (micro + 1) % accum == 0
        step_rows.append(idx)
        signals.set_phase(f"gradient all-reduce (backward) at step {state.step + 1}")
        out = train_step(loop, x, y, boundary)
        loop.loss_sum += out.loss
        loop.n_loss += 1
        if boundary:
            outcome = after_step(loop, out, step_rows)
            step_rows = []
            if outcome:
                break
    loop.log.end_epoch()
    return outcome


def after_step(loop: Loop, out: StepOutput, step_rows: list) -> str | None:
    """Bookkeeping at an optimizer-step boundary: schedule, logs, checkpoints, signals."""
    recipe, state, acc, t = loop.recipe, loop.state, loop.accelerator, loop.recipe.train
    if out.applied is False:
        handle_nonfinite(loop, out, step_rows)
    else:
        state.nonfinite_streak = 0
    loop.scheduler.step()  # once per optimizer step: lr(k) is world-size independent
    state.step += 1
    state.step_in_epoch += 1
    if state.step % t.log_every_steps == 0 or state.step == loop.total:
        signals.set_phase(f"train-loss reduce at step {state.step}")
        loop.tick = _log_train(loop, out.norm)
        loop.loss_sum.zero_()
        loop.n_loss = 0
    else:
        loop.log.advance()
    finished = state.step >= loop.total
    every = recipe.checkpoint.every_steps
    if every and state.step % every == 0 and not finished:
        signals.set_phase(f"checkpoint save at step {state.step}")
        save(acc, loop.run_dir, recipe, state)
    # Collective check every 10 steps (every step on one process): a signal that hit any
    # rank stops all of them at the same step.
    if acc.num_processes == 1 or state.step % 10 == 0:
        loop.heartbeat.beat(state.step)
        signals.set_phase(f"stop-request all-reduce at step {state.step}")
        if agree_any(acc, signals.stop_requested()):
            return "preempted"
    return "finished" if finished else None


def _evaluate(loop: Loop, epoch: int) -> str | None:
    state, t = loop.state, loop.recipe.train
    signals.set_phase(f"evaluation gather at step {state.step}")
    result = evaluate(loop.model, loop.valid_dl, loop.head, loop.metrics, loop.accelerator)
    loop.result = result
    loop.scheduler.scheduler.observe(result)  # plateau: unwrap accelerate's wrapper
    loop.log.event(
        "eval", epoch=epoch, step=state.step, samples=state.step * t.batch_size, **result
    )
    loop.log.info(_format_eval(epoch, result))
    improved, stop = _early_stop(loop.accelerator, loop.recipe, state, result)
    if improved and loop.recipe.checkpoint.best:
        # The best step must exist as a checkpoint to be kept (also between every_* saves).
        signals.set_phase(f"best checkpoint save at step {state.step}")
        save(loop.accelerator, loop.run_dir, loop.recipe, state)
    if stop:
        loop.log.info(
            f"early stopping: {t.early_stopping.monitor} did not improve for "
            f"{t.early_stopping.patience} evaluations"
        )
        return "finished"
    return None


def _preempted_exit(loop: Loop) -> None:
    signals.set_phase(f"preemption save at step {loop.state.step}")
    save(loop.accelerator, loop.run_dir, loop.recipe, loop.state)  # every rank, same step
    _ask_for_requeue(loop.accelerator)
    loop.log.info(
        f"stopped by a signal at step {loop.state.step}; checkpoint saved, "
        f"exit {EXIT_PREEMPTED} (run the same command again to resume)"
    )
    raise Preempted(loop.state.step)


def _open_audit(run_dir: Path, rank: int):
    """DIST_TRAIN_AUDIT_SAMPLES=1: each rank appends `epoch step row,row,...` per micro-batch to
    RUN_DIR/samples/rank-R.log, to check exactly which rows trained (resume, elastic resume)."""
    import os

    if os.environ.get("DIST_TRAIN_AUDIT_SAMPLES") != "1":
        return None
    (run_dir / "samples").mkdir(exist_ok=True)
    return open(run_dir / "samples" / f"rank-{rank}.log", "a", buffering=1)


def _ask_for_requeue(accelerator) -> None:
    """Launchers turn a rank's exit 75 into 1, so the SLURM job script also looks for this file
    (its path is in DIST_TRAIN_REQUEUE_FILE) to know the stop was a clean, saved preemption."""
    import os

    marker = os.environ.get("DIST_TRAIN_REQUEUE_FILE")
    if marker and accelerator.is_main_process:
        Path(marker).write_text("saved\n")
    accelerator.wait_for_everyone()  # no rank exits before the marker exists


class Preempted(Exception):
    """Raised after the synchronized save; the CLI exits with EXIT_PREEMPTED."""


def _log_train(loop: Loop, norm) -> float:
    """Figures of the steps since the last log line. The only device reads of the loop happen
    here, once per log interval: the loss was summed on device, never read per step."""
    accelerator, log, state, t = loop.accelerator, loop.log, loop.state, loop.recipe.train
    tick, n_loss = loop.tick, loop.n_loss
    # Collective at the log interval (same step on every rank): the mean loss over all ranks.
    loss = accelerator.reduce(loop.loss_sum / max(n_loss, 1), reduction="mean")
    now = time.perf_counter()
    steps = max(n_loss // t.grad_accum, 1)  # optimizer steps since the last log (n_loss: micro)
    fields = {
        "train/loss": float(loss),
        "lr": loop.optimizer.param_groups[0]["lr"],
        "samples_per_s": steps * t.batch_size / max(now - tick, 1e-9),
        "step_time": (now - tick) / steps,
    }
    if loop.flops_per_sample:  # model FLOPs actually achieved, and their share of the peak
        fields["model_tflops"] = loop.flops_per_sample * fields["samples_per_s"] / 1e12
        if loop.peak_tflops:  # per process: the global rate over every process's peak
            peak = loop.peak_tflops * accelerator.num_processes
            fields["mfu"] = fields["model_tflops"] / peak
    if norm is not None:
        fields["grad_norm"] = float(norm)
    if accelerator.device.type == "cuda":  # allocator statistics: no sync, no GPU work
        fields["peak_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    log.event(
        "train", epoch=state.epoch, step=state.step, samples=state.step * t.batch_size, **fields
    )
    log.advance(
        {
            "loss": f"{fields['train/loss']:.4f}",
            "lr": f"{fields['lr']:.2e}",
            "samples/s": f"{fields['samples_per_s']:.0f}",
        },
        step=state.step,
    )
    return now


def _format_eval(epoch: int, result: dict) -> str:
    parts = [
        f"{k.removeprefix('valid/')} {v:.4f}" for k, v in result.items() if isinstance(v, float)
    ]
    return f"epoch {epoch + 1} valid: " + "  ".join(parts) + f"  (rows {result['valid/rows']})"


def _metric_set(recipe: Recipe, data, accelerator):
    if not recipe.metrics or data.valid is None:
        return None
    from dist_train.training.metrics import MetricSet

    return MetricSet(recipe.metrics, recipe.data.task, data.num_classes, accelerator.device)


def _early_stop(accelerator, recipe: Recipe, state: TrainState, result: dict) -> tuple:
    """Best-checkpoint and early-stopping bookkeeping, decided on rank 0 and broadcast so every
    rank saves the same best step and leaves the loop at the same step. (improved, stop)"""
    best = recipe.checkpoint.best
    monitor = best.monitor if best else "valid/loss"
    improved = _better(
        result.get(monitor), state.best_value, (best and best.mode) or default_mode(monitor), 0.0
    )
    if improved:
        state.best_value, state.best_step = result[monitor], state.step
    stop = False
    es = recipe.train.early_stopping
    if es is not None:
        if _better(
            result.get(es.monitor), state.es_best, es.mode or default_mode(es.monitor), es.min_delta
        ):
            state.es_best, state.stale_evals = result[es.monitor], 0
        else:
            state.stale_evals += 1
        stop = state.stale_evals >= es.patience
    return from_main(accelerator, (improved, stop))  # collective: rank 0's decision for all


def _better(value, best, mode: str, delta: float) -> bool:
    if value is None:
        return False
    return best is None or (value < best - delta if mode == "min" else value > best + delta)
