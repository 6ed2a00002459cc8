"""`train.strategy: fsdp`: torch's FSDP2 (`fully_shard`) per block, then the root.

Why `fully_shard` directly and not accelerate's FSDP plugin: accelerate ignores that plugin on
a CPU (`Accelerator(cpu=True)` stays MULTI_CPU/DDP), so the plugin path could never run in
tests here; calling `fully_shard` ourselves is one code path for gloo (CPU) and NCCL (GPU).
Accelerate still owns the process group, the device, the seedable data loaders, the lr
schedule's wrapper and the RNG states; the model and the optimizer are not given to
`prepare()` (it would wrap the sharded model in DDP).

What makes it equal to DDP / one process: FSDP2 reduce-scatters gradients as a mean over
ranks, exactly as DDP all-reduces them, and every rank's loss is the mean over its own rows of
the global batch; accumulation skips the reduce-scatter on non-final micro-batches
(`set_requires_gradient_sync(False)`); the norm of DTensor gradients (clipping, the non-finite
guard) is the global one (a full reduction), so every rank decides alike.

One process (world size 1) has nothing to shard: the model stays plain; its checkpoints are
still sharded-format (DCP), so they load on any world size.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from dist_train.errors import UserError
from dist_train.model.blocks import body_of, module_blocks, sequential_groups


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_units(model: nn.Module, wrap: list[str]) -> list[nn.Module | list[nn.Module]]:
    """The blocks of model/blocks.py that own parameters: a layer list's groups (each a list
    of modules, sharded as one unit) or module blocks; the root takes whatever is left."""
    body = body_of(model)
    if isinstance(body, nn.Sequential) and not wrap:
        groups = [[body[i] for i in g] for g in sequential_groups(body)]
        return [g for g in groups if any(True for m in g for _ in m.parameters())]
    return [b for b in module_blocks(model, wrap) if any(True for _ in b.parameters())]


def shard_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """`fully_shard` each block, then the root (in place: parameter names are unchanged, the
    parameters become DTensors holding this rank's rows). `cfg`: the recipe's TrainConfig."""
    if cfg.mixed_precision == "fp16":
        raise UserError(
            "train.mixed_precision: fp16 with train.strategy fsdp is not supported (it needs a "
            "sharded grad scaler); use bf16, or strategy ddp."
        )
    if world_size() == 1:
        return _autocast(model, cfg.mixed_precision, device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(device.type, (world_size(),))
    bf16 = cfg.mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32,  # gradients are averaged over ranks in fp32
    )
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.fsdp.cpu_offload else None
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": cfg.fsdp.reshard_after_forward,
        "mp_policy": policy,
        "offload_policy": offload or OffloadPolicy(),
    }
    for unit in shard_units(model, cfg.fsdp.wrap):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _autocast(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """One process is not sharded and not given to accelerate's prepare(): its forward gets
    the bf16 autocast prepare() would add (the sharded path casts by MixedPrecisionPolicy)."""
    if precision != "bf16":
        return model
    from accelerate.utils import convert_outputs_to_fp32

    cast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    model.forward = types.MethodType(convert_outputs_to_fp32(cast(type(model).forward)), model)
    return model


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """A non-final micro-batch: gradients accumulate unsharded on each rank, without the
    reduce-scatter (the final micro-batch reduces the sum once)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (collective for a partial/sharded one), a tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over every rank's gradient shards: torch's norm of DTensors reduces across
    ranks (collective; every rank calls it at the same step), then the replicated value."""
    if not grads:
        return torch.zeros(())
    return full_value(torch.nn.utils.get_total_norm(grads))


def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip by the global norm of the sharded gradients (collective)."""
    return full_value(torch.nn.utils.clip_grad_norm_(params, max_norm))


def bad_grad_names(model: nn.Module) -> list[str]:
    """Parameters with a non-finite gradient on any rank (collective: the skip decision is
    rank-identical, so every rank reaches this gather)."""
    local = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())
    ]
    if world_size() == 1:
        return local
    every: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(every, local)
    return sorted({n for names in every for n in names})


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rank_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """This rank's bytes of parameters, gradients (one per trainable parameter element) and
    optimizer state (measured from its tensors, after a step; before one, the slots its
    algorithm keeps: Adam 2, SGD with momentum 1)."""
    params = [_local(p) for p in model.parameters()]
    trainable = [_local(p) for p in model.parameters() if p.requires_grad]
    out = {
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.numel() * p.element_size() for p in trainable),
    }
    if optimizer is not None:
        state = [
            _local(v)
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ]
        if state:
            out["optimizer"] = sum(v.numel() * v.element_size() for v in state)
        else:
            out["optimizer"] = _slots(optimizer) * out["grads"]
    return out


def _slots(optimizer: torch.optim.Optimizer) -> int:
    name = type(optimizer).__name__.lower()
    if name.startswith("adam"):
        return 2
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    return int(bool(group.get("momentum"))) + int(name == "rmsprop")


def format_bytes(figures: dict) -> str:
    return ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in figures.items())
