"""Sharded checkpoints of `train.strategy: fsdp` with torch.distributed.checkpoint (DCP).

Every rank writes its own shards of the model and optimizer into `<checkpoint>/sharded/`
(no gather to rank 0), inside the temp directory that run/checkpoint.py then fsyncs, renames
and marks COMPLETE: the same atomicity as the accelerate checkpoints. The schedule, the
loaders' positions and the RNG states are still accelerate's files beside it.

Loading reshards: DCP's metadata describes the global tensors, so each rank reads the rows of
its current shard whatever world size wrote them (2 ranks -> 1 or 3). Model and optimizer
state go through `get_state_dict` / `set_state_dict` (keys are parameter names, not optimizer
indices). One process is not sharded (training/fsdp.py) and loads the same files into plain
tensors.

Switching strategy on resume is refused (exit 2): a DDP checkpoint has no `sharded/` files
and an FSDP one has no accelerate model file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.errors import UserError

SHARDED = "sharded"


def save_sharded(model, optimizer, tmp: Path) -> None:
    """Collective: every rank writes its shard files (DCP's own gather of the small metadata
    then lets rank 0 write `.metadata`)."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dist_cp.save(state, checkpoint_id=str(tmp / SHARDED), no_dist=_single())


def load_sharded(model, optimizer, path: Path) -> None:
    """Collective: load (and reshard) the model and optimizer state saved by `save_sharded`."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # get_state_dict creates the optimizer's state (a zero-lr step) so there is a place to
    # load into; the values are all overwritten below.
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dist_cp.load(state, checkpoint_id=str(path / SHARDED), no_dist=_single())
    except Exception as err:
        raise UserError(
            f"checkpoint {path}: the sharded model/optimizer cannot be loaded "
            f"({str(err).splitlines()[0][:160]}). Delete this checkpoint directory to resume "
            "from the previous one, or pass --restart."
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def _single() -> bool:
    """One process (no process group): DCP reads and writes without collectives."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def check_strategy(path: Path, fsdp: bool) -> None:
    """Resuming with another train.strategy than the checkpoint's is refused, naming the fix."""
    saved_fsdp = (path / SHARDED).is_dir()
    if saved_fsdp == fsdp:
        return
    was, now = ("fsdp", "ddp") if saved_fsdp else ("ddp", "fsdp")
    raise UserError(
        f"checkpoint {path} was written with train.strategy {was}, this run uses {now}: a "
        "checkpoint resumes only with the strategy that wrote it. Set "
        f"train.strategy={was} to resume, or pass --restart to start over (or start from its "
        "weights with finetune.from=RUN/model.safetensors)."
    )


def full_model_state(model) -> dict[str, torch.Tensor] | None:
    """A sharded model's full state dict on rank 0 (collective: every rank sends its shards;
    the others get {}); None for a plain model (the caller takes its own state_dict)."""
    from dist_train.training.fsdp import is_sharded

    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
