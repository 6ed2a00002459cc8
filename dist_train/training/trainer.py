"""The Trainer: setup -> fit -> evaluate -> save/export -> teardown, around one Accelerator.

Read `fit` -> `run_epoch` -> `after_step` for the loop; `Stepper` (step.py) is the step body.
Rank discipline: every line marked "collective" runs on every rank at the same step; output
goes through the main process (RunLog is a no-op elsewhere); decisions are made once and
broadcast (`from_main`) or agreed (`agree_any`).
"""

from __future__ import annotations

import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from dist_train.build import Supplied, build_components
from dist_train.config.base import better, default_mode
from dist_train.config.schema import Recipe
from dist_train.data.augment import augment_batch, augment_generator
from dist_train.data.images import bad_sample_note, unit_float
from dist_train.data.loaders import fast_batches, make_loader
from dist_train.data.mix import make_mixer
from dist_train.data.stream import StreamLoader, StreamTable, stream_loader
from dist_train.errors import CollectiveFailure
from dist_train.model.finetune import save_report
from dist_train.run.rundir import RunPlan, agree_run_dir, materialize_run_dir
from dist_train.run.runlog import open_log, run_info
from dist_train.run.state import TrainState, export, resume, save
from dist_train.training import cadence, signals
from dist_train.training.distributed import agree_any, from_main, make_accelerator, plan_batches
from dist_train.training.ema import WeightAverage
from dist_train.training.evaluate import evaluate
from dist_train.training.flops import peak_tflops, train_flops_per_sample
from dist_train.training.fsdp import rank_bytes
from dist_train.training.optim import logged_lrs
from dist_train.training.profile import StepProfiler, check_ranks
from dist_train.training.step import StepOutput, Stepper, handle_nonfinite

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from dist_train.data.sources import DataBundle
    from dist_train.model.freeze import Freezing
    from dist_train.model.head import Head
    from dist_train.run.tracking import RunLog
    from dist_train.training.metrics import MetricSet

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint saved; please requeue


class Stop(Enum):
    """Why the loop ends before running out of epochs (None: keep going)."""

    FINISHED = "finished"  # the last optimizer step, or early stopping
    PREEMPTED = "preempted"  # a signal on any rank: synchronized save, exit 75, requeue


class Preempted(Exception):
    """Raised after the synchronized save; the CLI exits with EXIT_PREEMPTED."""


def train(
    recipe: Recipe,
    output_dir: str | None = None,
    restart: bool = False,
    allow_changed: bool = False,
) -> dict:
    """Train a recipe; returns the final evaluation. Same numbers on 1 or N processes."""
    trainer = Trainer(recipe, output_dir, restart=restart, allow_changed=allow_changed)
    return run(trainer).result


def run(trainer: Trainer) -> Trainer:
    """setup -> fit -> [preempt] -> export -> teardown; the finished trainer."""
    try:
        trainer.setup()
        try:
            if trainer.fit() is Stop.PREEMPTED:
                trainer.preempt()  # raises Preempted once the checkpoint is saved
            trainer.export()
        except Exception as err:
            if trainer.accelerator.num_processes > 1 and signals.is_collective_failure(err):
                raise CollectiveFailure(trainer.collective_report(err)) from None
            raise
        return trainer
    finally:
        trainer.teardown()


class Trainer:
    """One training run. Components are built in `setup`; the fields below exist after it."""

    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP-wrapped on N processes)
    head: Head
    optimizer: torch.optim.Optimizer  # accelerate's AcceleratedOptimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # accelerate's wrapper of optim.Schedule
    train_dl: DataLoader
    valid_dl: DataLoader | None
    data: DataBundle
    state: TrainState
    run: RunPlan
    run_dir: Path
    stepper: Stepper
    metrics: MetricSet | None
    freezing: Freezing | None  # freeze globs and schedule (None: everything trains)
    heartbeat: signals.Heartbeat
    total: int  # optimizer steps of the whole run
    per_epoch: int  # optimizer steps per epoch
    flops_per_sample: float | None  # training FLOPs (3x forward), for model_tflops / mfu
    peak_tflops: float | None  # per process, for mfu
    average: WeightAverage | None  # train.ema / train.swa: evaluated and exported when it exists

    def __init__(
        self,
        recipe: Recipe,
        output_dir: str | None = None,
        *,
        restart: bool = False,
        allow_changed: bool = False,
        supplied: Supplied | None = None,
    ) -> None:
        self.recipe, self.output_dir, self.supplied = recipe, output_dir, supplied
        self.restart, self.allow_changed = restart, allow_changed
        self.log: RunLog | None = None
        self.audit: TextIO | None = None
        self.result: dict = {}
        self.loss_sum = torch.zeros(())  # train loss summed on device since the last log line
        self.n_loss = 0  # micro-batches in loss_sum
        self.tick = 0.0  # when the current log interval's training time started
        self.profiler: StepProfiler | None = None

    def setup(self) -> None:
        """Accelerator, run directory plan, the build, prepare(), resume, the run's log."""
        recipe, t = self.recipe, self.recipe.train
        self.accelerator = acc = make_accelerator(recipe)
        from accelerate.utils import set_seed

        # Dropout & co. draw from the global RNGs: seeded per rank (distinct masks on each rank),
        # so a rerun is bitwise identical; a resume restores them from the checkpoint.
        set_seed(recipe.seed, device_specific=True)
        plan = plan_batches(recipe, acc.num_processes)
        check_ranks(t.profile, acc.num_processes)
        # Collective: rank 0 decides where the run goes (nothing is written yet).
        self.run = agree_run_dir(acc, recipe, self.output_dir, self.restart, self.allow_changed)
        self.run_dir = Path(self.run.run_dir)
        # collective inside: rank 0 loads data first
        built = build_components(recipe, acc, supplied=self.supplied)
        self.data, self.head, self.freezing = built.data, built.head, built.freezing
        self.total, self.per_epoch = built.total_steps, built.steps_per_epoch
        # Counted once on two rows, with no effect on the weights, statistics or random streams.
        # A model the layer list does not describe is counted (FlopCounterMode) only when a
        # known peak makes `mfu` computable.
        self.peak_tflops = peak_tflops(acc.device, t.peak_tflops)
        example = built.data.train.head(2).to(acc.device)
        self.flops_per_sample = train_flops_per_sample(
            built.model, example, counter=self.peak_tflops is not None
        )
        balanced = recipe.data.sampler == "balanced"
        workers = built.data.workers  # lazy tables: the DataLoader worker pool
        streamed = isinstance(built.data.train, StreamTable)
        if streamed:  # data.mode stream: this rank's share of the global stream, not prepared
            limit = self.per_epoch * t.grad_accum
            train_dl = stream_loader(
                built.data.train, plan.per_device, limit, recipe.seed, acc, workers
            )
        else:
            train_dl = make_loader(
                built.data.train, plan.per_device, True, True, recipe.seed, balanced, workers
            )
        valid = built.data.valid
        eval_batch = plan.eval_per_device
        valid_dl = make_loader(valid, eval_batch, False, False, workers=workers) if valid else None
        test = built.data.test
        test_dl = make_loader(test, eval_batch, False, False, workers=workers) if test else None
        # Collective: built fine, so now (and only now) the directory may be cleared/created.
        materialize_run_dir(acc, self.run, recipe)
        if acc.is_main_process and built.data.encoder is not None:
            # The column encoders fitted on the training split, for eval/predict --data.
            built.data.encoder.save(self.run_dir)
        if t.strategy == "fsdp":  # model and optimizer stay ours: training/fsdp.py says why
            self.model, self.optimizer = built.model, built.optimizer
            if streamed:
                self.train_dl, self.scheduler = train_dl, acc.prepare(built.scheduler)
            else:
                self.train_dl, self.scheduler = acc.prepare(train_dl, built.scheduler)
        elif streamed:
            self.model, self.optimizer, self.scheduler = acc.prepare(
                built.model, built.optimizer, built.scheduler
            )
            self.train_dl = train_dl
        else:
            self.model, self.optimizer, self.train_dl, self.scheduler = acc.prepare(
                built.model, built.optimizer, train_dl, built.scheduler
            )
        self.valid_dl = acc.prepare(valid_dl) if valid_dl is not None else None
        self.test_dl = acc.prepare(test_dl) if test_dl is not None else None
        self.mixer = make_mixer(recipe, self.train_dl.dataset, self.data.num_classes)
        self.state = TrainState(world_size=acc.num_processes)
        if self.run.resume_from:  # collective: every rank loads its part of the same step
            self.state = resume(acc, Path(self.run.resume_from), self.state, self._sharded())
        self.set_trainable(self.state.epoch)  # a freeze schedule: this epoch's trainable set
        self.average = WeightAverage.from_recipe(t, acc.unwrap_model(self.model))
        resumed = self.average is not None and self.run.resume_from
        notice = self.average.load(Path(self.run.resume_from)) if resumed else None
        info = run_info(acc, recipe, plan, self.total, self.per_epoch, self.model)
        info |= {"train_flops_per_sample": self.flops_per_sample, "peak_tflops": self.peak_tflops}
        info |= {"strategy": t.strategy, "per_rank_bytes": rank_bytes(self.model, self._opt())}
        info |= {"data": self.data.plan}
        self.log = open_log(acc, self.run, recipe, self.state, info, built.notes)
        if acc.is_main_process:
            save_report(self.run_dir, built.load_report)  # finetune.from: what loaded
        if self.average is not None:
            self.log.info(notice or self.average.describe())
        self.stepper = Stepper(acc, self.model, self.optimizer, self.head, t)
        self.metrics = self._metric_set()
        self.heartbeat = signals.Heartbeat(acc.process_index, acc.num_processes)
        self.audit = open_audit(self.run_dir, acc.process_index)
        self.loss_sum = torch.zeros((), device=acc.device)  # summed on device: no sync per step
        self.profiler = StepProfiler(t.profile, self.run_dir, acc.process_index, acc.device,
                                     self.state.step)  # fmt: skip

    def fit(self) -> Stop | None:
        """The loop. Periodic work is an explicit `if` at an optimizer-step boundary."""
        recipe, state, t = self.recipe, self.state, self.recipe.train
        signals.install()  # no-op if the CLI already did (a start-up signal still counts)
        self.tick = time.perf_counter()
        stop = None
        for epoch in range(state.epoch, t.epochs):
            self.set_trainable(epoch, announce=True)  # the same on every rank: epoch-determined
            stop = self.run_epoch(epoch)
            self.report_bad_samples(epoch)  # image files a worker substituted (on_bad_sample)
            if stop is Stop.PREEMPTED:
                break
            paused = time.perf_counter()  # eval and saves are not training time (samples/s)
            end_of_epoch = state.step_in_epoch >= self.per_epoch
            if end_of_epoch:
                state.epoch, state.step_in_epoch = epoch + 1, 0
            if end_of_epoch and self.average and self.average.due_at_epoch_end(epoch):
                self.average.update()  # SWA at each epoch end (no collective)
            due = cadence.due_after_epoch(t, epoch, stop is not None)
            if self.valid_dl is not None and due and state.last_eval_step != state.step:
                stop = self.evaluate(epoch) or stop  # collective: every rank evaluates
            every = recipe.checkpoint.every_epochs
            if stop or (every and end_of_epoch and (epoch + 1) % every == 0):
                self.save("checkpoint save")  # collective: every rank, same step
            if stop:
                break
            self.tick += time.perf_counter() - paused
        return stop

    def run_epoch(self, epoch: int) -> Stop | None:
        """Micro-batches of one epoch, from the resume position."""
        recipe, state = self.recipe, self.state
        accum = recipe.train.grad_accum
        state.epoch = epoch
        self.train_dl.set_epoch(epoch)  # seedable sampler: the order depends on (seed, epoch)
        if self.mixer is not None:  # before the iterator starts its workers: lazy partners
            self.mixer.start_epoch(epoch)
        skip = state.step_in_epoch * accum  # resume mid-epoch: micro-batches already trained
        batches = self._batches(epoch, skip)
        self.log.start_epoch(epoch, recipe.train.epochs, self.per_epoch, state.step_in_epoch)
        step_rows: list[torch.Tensor] = []
        stop = None
        for micro, (x, y, idx, *partners) in enumerate(batches, start=skip):
            if micro >= self.per_epoch * accum:
                break  # tail shorter than one accumulation group: dropped (see drop_last)
            if self.audit is not None:
                self.audit.write(f"{epoch} {state.step} {','.join(map(str, idx.tolist()))}\n")
            x, y = self.transform(x, y, idx, epoch, micro % accum, partners)  # mixup, augment
            boundary = (micro + 1) % accum == 0
            step_rows.append(idx)
            signals.set_phase(f"gradient all-reduce (backward) at step {state.step + 1}")
            out = self.stepper(x, y, boundary, state.step)  # collective on a boundary (DDP)
            self.loss_sum += out.loss
            self.n_loss += 1
            if boundary:
                stop = self.after_step(out, step_rows)
                step_rows = []
                if stop:
                    break
        self.log.end_epoch()
        return stop

    def transform(
        self, x, y, idx, epoch: int, micro: int, partners=()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-batch transforms, each keyed so that it is world-size invariant and needs no
        RNG state to resume: mixup/CutMix on (seed, epoch, row), augmentation on (seed, step,
        micro-batch, rank), drawn on the batch's device. `partners`: the mixing partners a
        lazy batch brought (rows.LazyRows)."""
        recipe = self.recipe
        if self.mixer is not None or recipe.data.augment:
            x = unit_float(x)  # uint8 images: mixing/augmenting needs the [0, 1] floats
        if self.mixer is not None:
            x, y = self.mixer(x, y, idx, epoch, partners)
        if recipe.data.augment:
            key = (recipe.seed, self.state.step, micro, self.accelerator.process_index)
            x = augment_batch(x, recipe.data.augment, augment_generator(*key, device=x.device))
        return x, y

    def after_step(self, out: StepOutput, step_rows: list[torch.Tensor]) -> Stop | None:
        """Bookkeeping at an optimizer-step boundary: schedule, logs, checkpoints, signals."""
        recipe, state, acc, t = self.recipe, self.state, self.accelerator, self.recipe.train
        if out.applied is False:  # the same decision on every rank (all-reduced gradients)
            handle_nonfinite(acc, t, state, self.log, self.run_dir, out, step_rows)
        else:
            state.nonfinite_streak = 0
        # The schedule counts applied updates: lr(k) is world-size independent, and a step the
        # guard or fp16's scaler skipped does not move it. state.step counts every boundary
        # (the data position; see TrainState).
        if out.updated:
            self.scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        if self.profiler is not None:
            self.profiler.step()
        if self.average is not None and self.average.due_after_step(state.step, state.epoch):
            self.average.update()  # identical on every rank (the parameters are): no collective
        if state.step % t.log_every_steps == 0 or state.step == self.total:
            signals.set_phase(f"train-loss reduce at step {state.step}")
            self._log_train(out.norm)  # collective: the loss mean over all ranks
        else:
            self.log.advance()
        finished = state.step >= self.total
        stopped = None
        if self.valid_dl is not None and cadence.due_after_step(t, state.step):
            paused = time.perf_counter()  # evaluation is not training time (samples/s)
            stopped = self.evaluate(state.epoch)  # collective: every rank evaluates
            self.tick += time.perf_counter() - paused
        every = recipe.checkpoint.every_steps
        if every and state.step % every == 0 and not (finished or stopped):
            self.save("checkpoint save")  # collective: every rank, same step (after the eval)
        # A signal may hit one rank only: every stop_check_every_steps (every step on one
        # process) the ranks agree, so all of them stop at the same step.
        if acc.num_processes == 1 or state.step % t.stop_check_every_steps == 0:
            self.heartbeat.beat(state.step)
            signals.set_phase(f"stop-request all-reduce at step {state.step}")
            if agree_any(acc, signals.stop_requested()):  # collective: all-reduce max
                return Stop.PREEMPTED
        return Stop.FINISHED if finished or stopped else None

    def evaluate(self, epoch: int) -> Stop | None:
        """Exact validation metrics (every rank updates and computes), then the best-checkpoint
        and early-stopping decisions, made on rank 0 and broadcast."""
        state, t = self.state, self.recipe.train
        signals.set_phase(f"evaluation gather at step {state.step}")
        model, weights = self.model, "raw"
        if self.average is not None and self.average.count:
            self.average.sync_buffers(self.accelerator)  # collective (batch-norm models only)
            model, weights = self.average.module, self.average.weights
        result = evaluate(model, self.valid_dl, self.head, self.metrics, self.accelerator)
        self.result = result
        state.last_eval_step = state.step
        self.scheduler.scheduler.observe(result)  # plateau: unwrap accelerate's wrapper
        samples = state.step * t.batch_size
        extra = {"weights": weights} if self.average is not None else {}
        self.log.event("eval", epoch=epoch, step=state.step, samples=samples, **result, **extra)
        mid_epoch = 0 < state.step_in_epoch < self.per_epoch
        self.log.info(format_eval(epoch, result, state.step if mid_epoch else None, weights))
        improved, stop = self._decide(result)  # collective: rank 0's decision on every rank
        if improved and self.recipe.checkpoint.best:
            # The best step must exist as a checkpoint to be kept (also between every_* saves).
            self.save("best checkpoint save")  # collective
        if stop:
            es = t.early_stopping
            self.log.info(
                f"early stopping: {es.monitor} did not improve for {es.patience} evaluations"
            )
            return Stop.FINISHED
        return None

    def set_trainable(self, epoch: int, announce: bool = False) -> list[str]:
        """A freeze schedule's requires_grad / batch-norm state for `epoch` (DDP and the
        optimizer hold the final set already: model/freeze.py); the names it unfroze, logged
        when `announce`."""
        if self.freezing is None or not self.freezing.scheduled:
            return []
        opened = self.freezing.apply(self.accelerator.unwrap_model(self.model), epoch)
        if opened and announce:
            self.log.event("unfreeze", epoch=epoch, step=self.state.step, params=len(opened))
            self.log.info(f"epoch {epoch + 1}: unfroze {len(opened)} tensors ({opened[0]} ...)")
        return opened

    def report_bad_samples(self, epoch: int) -> None:
        """data.on_bad_sample skip: the files this rank's workers substituted this epoch; every
        rank says its own (stderr), rank 0 also into the run's log."""
        note = bad_sample_note(self.train_dl.dataset)
        if note:
            print(f"rank {self.accelerator.process_index}: {note}", file=sys.stderr, flush=True)
            self.log.event("bad_samples", epoch=epoch, note=note)

    def save(self, what: str) -> Path:
        """Collective: the synchronized, atomic full-state save (every rank, same step)."""
        signals.set_phase(f"{what} at step {self.state.step}")
        extra = self.average.write if self.average is not None else None  # + averaged weights
        keep = self.recipe.checkpoint.keep
        return save(self.accelerator, self.run_dir, keep, self.state, extra, self._sharded())

    def _opt(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper

    def _sharded(self):
        """strategy fsdp: the (model, optimizer) that checkpoints write and load with DCP."""
        return (self.model, self.optimizer) if self.recipe.train.strategy == "fsdp" else None

    def preempt(self) -> None:
        """A stop signal: one synchronized save, the requeue marker, then `Preempted`."""
        self.save("preemption save")  # collective: every rank, same step
        signals.ask_for_requeue(self.accelerator)  # collective barrier
        self.log.info(
            f"stopped by a signal at step {self.state.step}; checkpoint saved, "
            f"exit {EXIT_PREEMPTED} (run the same command again to resume)"
        )
        raise Preempted(self.state.step)

    def export(self) -> None:
        """The end-of-run table, the held-out test evaluation, model.safetensors and run.json's
        final status."""
        self.log.summary(self.result, self.state.best_step)  # main process only
        test = self.evaluate_test()  # collective: every rank evaluates the test rows
        # Measured after training (the optimizer state exists now); rank 0's, the largest shard.
        self.log.event("memory", step=self.state.step, **rank_bytes(self.model, self._opt()))
        averaged = self.average is not None and self.average.count > 0
        if self.average is not None and not averaged:
            self.log.info(f"no {self.average.kind} snapshot was taken: exporting the raw weights")
        export(
            self.accelerator,  # collective barrier inside, then main process only
            self.average.module if averaged else self.model,
            self.run_dir,
            self.recipe,
            self.data,
            self.state,
            self.result,
            weights=self.average.weights if averaged else "raw",
            test=test,
        )
        self.result = {**self.result, **test}  # train()'s answer: valid/... and test/...

    def evaluate_test(self) -> dict:
        """Collective: the test rows evaluated once, exactly as validation (every row once on
        any world size), with the best checkpoint's weights when checkpoint.best kept one,
        else the final (or averaged) weights; which is printed and logged."""
        if self.test_dl is None:
            return {}
        acc, state = self.accelerator, self.state
        averaged = self.average is not None and self.average.count > 0
        model = self.average.module if averaged else self.model
        which = f"final {self.average.weights} weights" if averaged else "final weights"
        best = self.recipe.checkpoint.best
        if best and state.best_step is not None and self.recipe.train.strategy != "fsdp":
            model, file = best_weights(acc.unwrap_model(self.model), self.run_dir, state.best_step)
            which = f"best checkpoint (step {state.best_step}, {file})"
        elif best and state.best_step is not None:
            which += " (strategy fsdp: the best checkpoint's shards are not reloaded here)"
        signals.set_phase(f"test evaluation gather at step {state.step}")
        result = evaluate(
            model, self.test_dl, self.head, self._metric_set(True), acc, prefix="test"
        )
        result["test/weights"] = which
        self.log.event("test", step=state.step, **result)
        parts = [
            f"{k.removeprefix('test/')} {v:.4f}" for k, v in result.items() if isinstance(v, float)
        ]
        self.log.info(f"test ({which}): " + "  ".join(parts) + f"  (rows {result['test/rows']})")
        return result

    def teardown(self) -> None:
        """Close the log and audit file; give the signal handlers back (also after an error)."""
        if self.profiler is not None:
            self.profiler.stop()  # a window the run cut short is still written
        if self.log is not None:
            self.log.close()
        if self.audit is not None:
            self.audit.close()
        signals.restore()

    def collective_report(self, err: BaseException) -> str:
        acc, t = self.accelerator, self.recipe.train
        text = str(err).strip()
        first = text.splitlines()[0][:200] if text else type(err).__name__
        return (
            f"rank {acc.process_index}/{acc.num_processes}: lost the other ranks during "
            f"{signals.phase()} (train.collective_timeout_s={t.collective_timeout_s}). "
            f"{self.heartbeat.peers()}. A rank died or stalled: read its log; the last complete "
            f"checkpoint in {self.run_dir / 'checkpoints'} is intact and resumes with the same "
            f"command. ({first})"
        )

    def _batches(self, epoch: int, skip: int):
        """In-memory rows: whole batches sliced by the loader's own (sharded, seeded) batch
        sampler; a stream: its own position; any other loader: accelerate's iteration,
        skipping what was trained."""
        if isinstance(self.train_dl, StreamLoader):
            return self.train_dl.batches(skip)
        batches = fast_batches(self.train_dl, skip)
        if batches is not None:
            return batches
        if not skip:
            return self.train_dl
        batches = self.accelerator.skip_first_batches(self.train_dl, skip)
        # The new loader's __iter__ calls set_epoch(its own iteration count, 0): without this
        # it would replay epoch 0's order instead of this epoch's.
        batches.set_epoch(epoch)
        return batches

    def _log_train(self, norm: torch.Tensor | None) -> None:
        """Figures of the steps since the last log line. The only device reads of the loop
        happen here, once per log interval: the loss was summed on device, never per step."""
        acc, state, t = self.accelerator, self.state, self.recipe.train
        # Collective at the log interval (same step on every rank): the mean loss over ranks.
        loss = acc.reduce(self.loss_sum / max(self.n_loss, 1), reduction="mean")
        now = time.perf_counter()
        steps = max(self.n_loss // t.grad_accum, 1)  # optimizer steps since the last log
        fields = {"train/loss": float(loss)}
        fields |= logged_lrs(self.optimizer, len(self.recipe.optimizer.param_groups))
        fields["samples_per_s"] = steps * t.batch_size / max(now - self.tick, 1e-9)
        fields["step_time"] = (now - self.tick) / steps
        if self.flops_per_sample:  # model FLOPs actually achieved, and their share of the peak
            fields["model_tflops"] = self.flops_per_sample * fields["samples_per_s"] / 1e12
            if self.peak_tflops:  # per process: the global rate over every process's peak
                fields["mfu"] = fields["model_tflops"] / (self.peak_tflops * acc.num_processes)
        if norm is not None:
            fields["grad_norm"] = float(norm)
        if acc.device.type == "cuda":  # allocator statistics: no sync, no GPU work
            fields["peak_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        samples = state.step * t.batch_size
        self.log.event("train", epoch=state.epoch, step=state.step, samples=samples, **fields)
        postfix = {
            "loss": f"{fields['train/loss']:.4f}",
            "lr": f"{fields['lr']:.2e}",
            "samples/s": f"{fields['samples_per_s']:.0f}",
        }
        self.log.advance(postfix, step=state.step)
        self.loss_sum.zero_()
        self.n_loss, self.tick = 0, now

    def _decide(self, result: dict) -> tuple[bool, bool]:
        """(improved, stop): best-checkpoint and early-stopping bookkeeping. Every rank has the
        same gathered metrics, but rank 0's answer is broadcast so the ranks cannot diverge
        on a float tie: all save the same best step and leave at the same step."""
        state, best = self.state, self.recipe.checkpoint.best
        monitor = best.monitor if best else "valid/loss"
        mode = (best and best.mode) or default_mode(monitor)
        improved = better(result.get(monitor), state.best_value, mode)
        if improved:
            state.best_value, state.best_step = result[monitor], state.step
        stop = False
        es = self.recipe.train.early_stopping
        if es is not None:
            es_mode = es.mode or default_mode(es.monitor)
            if better(result.get(es.monitor), state.es_best, es_mode, es.min_delta):
                state.es_best, state.stale_evals = result[es.monitor], 0
            else:
                state.stale_evals += 1
            stop = state.stale_evals >= es.patience
        return from_main(self.accelerator, (improved, stop))  # collective: broadcast

    def _metric_set(self, test: bool = False) -> MetricSet | None:
        """Fresh metric objects for the validation (or, `test`, the test) rows."""
        supplied = self.supplied.metrics if self.supplied is not None else {}
        if test and supplied:  # the caller's objects belong to validation: copies, reset
            import copy

            supplied = {k: copy.deepcopy(m) for k, m in supplied.items()}
            for m in supplied.values():
                m.reset()
        rows = self.data.test if test else self.data.valid
        if not (self.recipe.metrics or supplied) or rows is None:
            return None
        from dist_train.training.metrics import MetricSet

        task, classes = self.recipe.data.task, self.data.num_classes
        threshold = self.recipe.data.threshold
        return MetricSet(
            self.recipe.metrics, task, classes, self.accelerator.device, threshold, supplied
        )


def best_weights(net: torch.nn.Module, run_dir: Path, step: int) -> tuple[torch.nn.Module, str]:
    """A copy of `net` holding the weights the best evaluation saw: the checkpoint of that
    step's averaged weights if it has a non-empty average (train.ema/swa evaluate those),
    else its raw weights. Every rank reads the same sealed files (no collective)."""
    import copy

    from safetensors import safe_open

    from dist_train.model.pretrained import load_weights
    from dist_train.run.checkpoint import checkpoint_dir
    from dist_train.training.ema import AVERAGED_FILE

    folder = checkpoint_dir(run_dir) / f"step-{step:06d}"
    file = "model.safetensors"
    if (folder / AVERAGED_FILE).is_file():
        with safe_open(str(folder / AVERAGED_FILE), framework="pt") as fh:
            if (fh.metadata() or {}).get("count", "0") != "0":
                file = AVERAGED_FILE
    copy_ = copy.deepcopy(net)
    copy_.load_state_dict(load_weights(str(folder / file), key="checkpoint.best"))
    return copy_, file


def open_audit(run_dir: Path, rank: int) -> TextIO | None:
    """DIST_TRAIN_AUDIT_SAMPLES=1: each rank appends `epoch step row,row,...` per micro-batch to
    RUN_DIR/samples/rank-R.log, to check exactly which rows trained (resume, elastic resume)."""
    if os.environ.get("DIST_TRAIN_AUDIT_SAMPLES") != "1":
        return None
    (run_dir / "samples").mkdir(exist_ok=True)
    return open(run_dir / "samples" / f"rank-{rank}.log", "a", buffering=1)


def format_eval(epoch: int, result: dict, step: int | None = None, weights: str = "raw") -> str:
    """The printed validation line; `epoch` is 0-based, printed from 1 like the progress bar;
    `step` for an evaluation inside the epoch; averaged weights are named."""
    parts = [
        f"{k.removeprefix('valid/')} {v:.4f}" for k, v in result.items() if isinstance(v, float)
    ]
    where = f"epoch {epoch + 1}" + (f" step {step}" if step is not None else "")
    which = f" ({weights} weights)" if weights != "raw" else ""
    return f"{where} valid{which}: " + "  ".join(parts) + f"  (rows {result['valid/rows']})"
