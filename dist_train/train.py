"""Creates the one Accelerator, prepares everything, and runs the one readable training loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import build, lifecycle
from .augment import augment_batch, augment_generator
from .config import Recipe, default_mode
from .data import make_loader
from .errors import UserError
from .evaluate import evaluate
from .runtime import agree_any, from_main, make_accelerator, plan_batches
from .run_io import agree_run_dir, configure_ddp, export, open_log, resume, save
from .tracking import RunLog

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
    run_id: str | None = None  # tracker run continued after resume
    history: list = field(default_factory=list)  # world sizes this run has used


def train(recipe: Recipe, output_dir: str | None = None, restart: bool = False,
          allow_changed: bool = False) -> dict:
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
    from .finetune import prepare_finetune

    notes = prepare_finetune(model, recipe.finetune, accelerator.is_main_process)
    optimizer = build.build_optimizer(model, recipe.optimizer)
    total = build.total_steps(recipe, len(data.train.y))
    if total == 0:
        raise UserError(f"train.batch_size {recipe.train.batch_size} is larger than the "
                        f"{len(data.train.y)} training rows; lower it.")
    scheduler = build.build_scheduler(optimizer, recipe.scheduler, total, recipe.optimizer.lr)
    train_dl = make_loader(data.train, plan.per_device, True, True, seed=recipe.seed)
    valid_dl = make_loader(data.valid, plan.eval_per_device, False, False) if data.valid else None
    if accelerator.num_processes > 1:
        configure_ddp(accelerator, model, data, head)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl,
                                                                scheduler)
    valid_dl = accelerator.prepare(valid_dl) if valid_dl is not None else None
    state = TrainState(world_size=accelerator.num_processes)
    if run.resume_from:
        state = resume(accelerator, Path(run.resume_from), state)
    log = open_log(accelerator, run_dir, recipe, run, state, total, plan, model, notes)
    audit = _open_audit(run_dir, accelerator.process_index)
    try:
        result = fit(recipe, accelerator, model, head, optimizer, scheduler, train_dl, valid_dl,
                     state, log, run_dir, total, data, audit)
    finally:
        log.close()
        if audit is not None:
            audit.close()
    return result


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


def fit(recipe, accelerator, model, head, optimizer, scheduler, train_dl, valid_dl,
        state: TrainState, log: RunLog, run_dir: Path, total: int, data, audit=None) -> dict:
    """The loop. Periodic work is an explicit `if` at an optimizer-step boundary."""
    t = recipe.train
    lifecycle.install()  # no-op if the CLI already did; covers the Python API
    accum = t.grad_accum
    per_epoch = build.steps_per_epoch(len(data.train.y), t.batch_size)
    metrics = _metric_set(recipe, data, accelerator)
    loss_sum = torch.zeros((), device=accelerator.device)  # on device: no sync per step
    n_loss, tick, result = 0, time.perf_counter(), {}
    finished = preempted = False
    for epoch in range(state.epoch, t.epochs):
        state.epoch = epoch
        train_dl.set_epoch(epoch)  # seedable sampler: the order depends on (seed, epoch) only
        skip = state.step_in_epoch * accum  # resume mid-epoch: micro-batches already trained
        batches = train_dl
        if skip:
            batches = accelerator.skip_first_batches(train_dl, skip)
            # The new loader's __iter__ calls set_epoch(its own iteration count, 0): without
            # this it would replay epoch 0's order instead of this epoch's.
            batches.set_epoch(epoch)
        log.start_epoch(epoch, t.epochs, per_epoch, state.step_in_epoch)
        for micro, (x, y, idx) in enumerate(batches, start=skip):
            if micro >= per_epoch * accum:
                break  # tail shorter than one accumulation group: dropped (see drop_last)
            if audit is not None:
                audit.write(f"{epoch} {state.step} {','.join(map(str, idx.tolist()))}\n")
            if recipe.data.augment:
                gen = augment_generator(recipe.seed, state.step, micro % accum,
                                        accelerator.process_index)
                x = augment_batch(x, recipe.data.augment, gen)
            boundary = (micro + 1) % accum == 0
            want_norm = boundary and (state.step + 1) % t.log_every_steps == 0
            loss, norm = train_step(model, x, y, head, optimizer, accelerator, boundary,
                                    accum, t.max_grad_norm, want_norm)
            loss_sum += loss
            n_loss += 1
            if not boundary:
                continue
            scheduler.step()  # once per optimizer step: lr(k) is world-size independent
            state.step += 1
            state.step_in_epoch += 1
            if state.step % t.log_every_steps == 0 or state.step == total:
                tick = _log_train(accelerator, log, state, loss_sum, n_loss, norm, optimizer,
                                  tick, t)
                loss_sum.zero_()
                n_loss = 0
            else:
                log.advance()
            finished = state.step >= total
            every = recipe.checkpoint.every_steps
            if every and state.step % every == 0 and not finished:
                save(accelerator, run_dir, recipe, state)
            # Collective check every 10 steps (every step on one process): a signal that hit
            # any rank stops all of them at the same step.
            if accelerator.num_processes == 1 or state.step % 10 == 0:
                if agree_any(accelerator, lifecycle.stop_requested()):
                    preempted = True
            if finished or preempted:
                break
        log.end_epoch()
        if preempted:
            break
        end_of_epoch = state.step_in_epoch >= per_epoch
        if end_of_epoch:
            state.epoch, state.step_in_epoch = epoch + 1, 0
        if valid_dl is not None and (finished or (epoch + 1) % t.eval_every_epochs == 0):
            result = evaluate(model, valid_dl, head, metrics, accelerator)
            scheduler.scheduler.observe(result)  # plateau: unwrap accelerate's wrapper
            log.event("eval", epoch=epoch, step=state.step,
                      samples=state.step * t.batch_size, **result)
            log.info(_format_eval(epoch, result))
            if _early_stop(accelerator, recipe, state, result):
                log.info(f"early stopping: {t.early_stopping.monitor} did not improve for "
                         f"{t.early_stopping.patience} evaluations")
                finished = True
        ce = recipe.checkpoint.every_epochs
        if finished or (ce and end_of_epoch and (epoch + 1) % ce == 0):
            save(accelerator, run_dir, recipe, state)
        if finished:
            break
    if preempted:
        save(accelerator, run_dir, recipe, state)  # collective: every rank, same step
        _ask_for_requeue(accelerator)
        log.info(f"stopped by a signal at step {state.step}; checkpoint saved, "
                 f"exit {EXIT_PREEMPTED} (run the same command again to resume)")
        raise Preempted(state.step)
    log.summary(result, state.best_step)  # end-of-run table, main process only
    export(accelerator, model, run_dir, recipe, data, state, result)
    return result


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


def train_step(model, x, y, head, optimizer, accelerator, boundary: bool, accum: int,
               max_grad_norm: float | None, want_norm: bool):
    """One micro-batch: forward, backward (DDP all-reduce only on the accumulation boundary),
    and on the boundary clip + optimizer step. Returns the un-scaled loss on device."""
    if boundary:
        out = model(x)
        loss = head.loss_fn(out, y)
        accelerator.backward(loss / accum)
    else:
        with accelerator.no_sync(model):  # skip the gradient all-reduce until the boundary
            out = model(x)
            loss = head.loss_fn(out, y)
            accelerator.backward(loss / accum)
        return loss.detach(), None
    norm = None
    if max_grad_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    elif want_norm:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm


def _log_train(accelerator, log, state, loss_sum, n_loss, norm, optimizer, tick, t) -> float:
    """Figures of the steps since the last log line. The only device reads of the loop happen
    here, once per log interval: the loss was summed on device, never read per step."""
    # Collective at the log interval (same step on every rank): the mean loss over all ranks.
    loss = accelerator.reduce(loss_sum / max(n_loss, 1), reduction="mean")
    now = time.perf_counter()
    steps = max(n_loss // t.grad_accum, 1)  # optimizer steps since the last log (n_loss: micro)
    fields = {"train/loss": float(loss), "lr": optimizer.param_groups[0]["lr"],
              "samples_per_s": steps * t.batch_size / max(now - tick, 1e-9),
              "step_time": (now - tick) / steps}
    if norm is not None:
        fields["grad_norm"] = float(norm)
    if accelerator.device.type == "cuda":  # allocator statistics: no sync, no GPU work
        fields["peak_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    log.event("train", epoch=state.epoch, step=state.step, samples=state.step * t.batch_size,
              **fields)
    log.advance({"loss": f"{fields['train/loss']:.4f}", "lr": f"{fields['lr']:.2e}",
                 "samples/s": f"{fields['samples_per_s']:.0f}"}, step=state.step)
    return now


def _format_eval(epoch: int, result: dict) -> str:
    parts = [f"{k.removeprefix('valid/')} {v:.4f}" for k, v in result.items()
             if isinstance(v, float)]
    return f"epoch {epoch + 1} valid: " + "  ".join(parts) + f"  (rows {result['valid/rows']})"


def _metric_set(recipe: Recipe, data, accelerator):
    if not recipe.metrics or data.valid is None:
        return None
    from .metrics import MetricSet

    return MetricSet(recipe.metrics, recipe.data.task, data.num_classes, accelerator.device)


def _early_stop(accelerator, recipe: Recipe, state: TrainState, result: dict) -> bool:
    """Best-checkpoint and early-stopping bookkeeping; the stop decision is made on rank 0 and
    broadcast so every rank leaves the loop at the same step."""
    best = recipe.checkpoint.best
    monitor = best.monitor if best else "valid/loss"
    if _better(result.get(monitor), state.best_value, (best and best.mode) or
               default_mode(monitor), 0.0):
        state.best_value, state.best_step = result[monitor], state.step
    es = recipe.train.early_stopping
    if es is None:
        return False
    if _better(result.get(es.monitor), state.es_best, es.mode or default_mode(es.monitor),
               es.min_delta):
        state.es_best, state.stale_evals = result[es.monitor], 0
    else:
        state.stale_evals += 1
    return from_main(accelerator, state.stale_evals >= es.patience)


def _better(value, best, mode: str, delta: float) -> bool:
    if value is None:
        return False
    return best is None or (value < best - delta if mode == "min" else value > best + delta)
