"""The training counters, and the three things a run does with its state: save, resume, export.

Built on run/checkpoint.py (atomic save, safe loads, the safetensors export); this module only
knows which counters a run keeps and what a finished run records in run.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dist_train.config.recipe import recipe_hash
from dist_train.errors import UserError
from dist_train.run import checkpoint


@dataclass
class TrainState:
    """Counters saved with every checkpoint (as JSON) and restored on resume.

    `step` counts optimizer-step boundaries: one per `train.batch_size` samples trained,
    including steps whose update was skipped (non-finite gradient, or fp16's grad scaler
    finding an overflow). It sets the data position, the log/checkpoint cadence and
    `train.max_steps`. The lr schedule counts only applied updates (its own counter).
    `epoch` is 0-based here and in metrics.jsonl; printed progress says `epoch 1/N` for it."""

    step: int = 0  # optimizer-step boundaries done (applied or skipped)
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer-step boundaries done inside `epoch`
    world_size: int = 1
    best_value: float | None = None
    best_step: int | None = None
    es_best: float | None = None  # best early-stopping monitor value so far
    stale_evals: int = 0  # evaluations without improvement (early stopping)
    last_eval_step: int | None = None  # step of the latest evaluation (each step counts once)
    nonfinite_streak: int = 0  # consecutive steps skipped for a NaN/inf gradient
    run_id: str | None = None  # tracker run continued after resume
    history: list = field(default_factory=list)  # world sizes this run has used


def save(
    accelerator, run_dir: Path, keep: int, state: TrainState, extra=None, sharded=None
) -> Path:
    """Collective: the synchronized, atomic full-state save (every rank, same step). `extra`
    writes more files into the checkpoint directory (main process; e.g. averaged weights);
    `sharded`: (model, optimizer) of strategy fsdp, written by every rank with DCP."""
    shards = None
    if sharded is not None:
        from dist_train.run import dcp

        shards = lambda tmp: dcp.save_sharded(*sharded, tmp)  # noqa: E731
    return checkpoint.save_checkpoint(
        accelerator, run_dir, asdict(state), keep, state.best_step, extra, shards
    )


def resume(accelerator, path: Path, state: TrainState, sharded=None) -> TrainState:
    """Load model/optimizer/schedule/scaler/RNG through accelerate, then our JSON counters.
    `sharded`: (model, optimizer) of strategy fsdp, loaded (resharded) from DCP files."""
    saved = checkpoint.read_state(path)
    accelerator.wait_for_everyone()  # collective: the checkpoint was sealed before anyone loads
    check_rng_file(path, accelerator.process_index)
    from dist_train.run import dcp

    dcp.check_strategy(path, sharded is not None)
    if sharded is not None:
        dcp.load_sharded(*sharded, path)  # collective: every rank reads the shards it needs
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


def check_rng_file(path: Path, rank: int) -> None:
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


def export(
    accelerator,
    model,
    run_dir: Path,
    recipe,
    data,
    state: TrainState,
    result: dict,
    weights="raw",
    test: dict | None = None,
):
    """model.safetensors from the unwrapped model (no `module.` prefix), then run.json done.
    `weights` says which (raw, or an average: training/ema.py); it goes into the metadata.
    A sharded model is gathered first (collective: every rank sends its shards to rank 0)."""
    from dist_train.run import dcp

    full = dcp.full_model_state(model)
    accelerator.wait_for_everyone()  # collective: all ranks finished their last step
    if not accelerator.is_main_process:
        return
    net = accelerator.unwrap_model(model)
    meta = {
        "recipe_hash": recipe_hash(recipe),
        "input_shape": json.dumps(list(data.input_shape)),
        "classes": json.dumps(data.classes),
        "task": recipe.data.task,
        "step": str(state.step),
        "weights": weights,
    }
    tensors = full if full is not None else net.state_dict()
    checkpoint.export_model(tensors, run_dir / "model.safetensors", meta)
    info = json.loads((run_dir / "run.json").read_text())
    info |= {
        "status": "finished",
        "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": state.step,
        "best_value": state.best_value,
        "best_step": state.best_step,
        "final": {k: v for k, v in result.items() if not isinstance(v, list)},
    }
    if test:  # the held-out test rows, evaluated once (trainer.evaluate_test)
        info["test"] = {k: v for k, v in test.items() if not isinstance(v, list)}
    checkpoint.write_json_atomic(run_dir / "run.json", info)
    print(f"saved {run_dir / 'model.safetensors'}", flush=True)
