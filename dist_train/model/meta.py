"""Large-model start-up for `train.strategy: fsdp`: the model is built on the meta device and
each rank materialises only its own shards, with the weights of the plain build, bitwise.

How the weights stay identical: the plain build (build.build_net) draws every initial value
from one CPU generator seeded with `seed`, in a fixed order: each layer's constructor, the
shape probe that follows it (dropout draws there too), then `model.init` over the layers.
Here the same code runs in the same order under the same seed, one layer at a time: each
layer is built in full on the CPU, this rank's rows of every parameter are kept (FSDP2's
dim-0 `torch.chunk` split), and the layer moves to the meta device, freeing its memory.
`model.init` is replayed one parameter at a time (a full CPU tensor, the init function, this
rank's rows kept). Peak memory: the largest layer, plus this rank's shards; never the whole
model. After `fully_shard`, `to_empty` allocates the local shards and they are filled.

Used for layer lists on more than one process without `finetune` (pretrained weights are a
full state dict: those models are built plainly, then sharded); other models build plainly.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_train.model.net import Net, build_model, init_fn


def wanted(recipe, world_size: int) -> bool:
    return (
        recipe.train.strategy == "fsdp"
        and world_size > 1
        and recipe.model is not None
        and recipe.model.layers is not None
        # a layer list alone: a backbone (factory/hf/module) builds its own weights
        and recipe.model.factory is None
        and recipe.model.hf is None
        and recipe.model.module is None
        and recipe.finetune is None
    )


def chunk(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows, as FSDP2's Shard(0) placement holds them (empty past the last)."""
    if t.dim() == 0:
        return t.detach().clone()
    parts = torch.chunk(t.detach(), world, dim=0)
    return parts[rank].clone() if rank < len(parts) else t.detach()[0:0].clone()


class LocalBuild:
    """Collects this rank's shards (parameters) and the full buffers while the layers of a
    layer list are built one by one; each built layer is handed back on the meta device."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.store: dict[str, torch.Tensor] = {}

    def keep(self, prefix: str, module: nn.Module) -> nn.Module:
        for name, p in module.named_parameters():
            self.store[prefix + name] = chunk(p, self.rank, self.world)
        for name, b in module.named_buffers():
            self.store[prefix + name] = b.detach().clone()
        return module.to("meta")

    def replay_init(self, body: nn.Module, init) -> None:
        """`net.apply_init`'s draws, in its order (weight then bias of each Linear/Conv2d),
        one full parameter at a time."""
        weight_fn = init_fn(init.weight) if init.weight else None
        bias_fn = init_fn(init.bias) if init.bias else None
        for name, mod in body.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            for attr, fn in (("weight", weight_fn), ("bias", bias_fn)):
                param = getattr(mod, attr)
                if fn is None or param is None:
                    continue
                full = torch.empty(param.shape, dtype=param.dtype)
                with torch.no_grad():
                    fn(full)
                self.store[f"layers.{name}.{attr}"] = chunk(full, self.rank, self.world)


def build_local_net(recipe, data, head, rank: int, world: int) -> tuple[Net, dict]:
    """(the Net on the meta device, {name: this rank's shard or full buffer})."""
    from dist_train.build import check_output

    local = LocalBuild(rank, world)
    out = head.out_features or data.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # the plain build's seed, the same draws in order
        net = build_model(
            recipe.model.layers,
            None,
            None,
            data.input_shape,
            out,
            data.norm,
            on_layer=lambda i, layer: local.keep(f"layers.{i}.", layer),
            codes=data.codes,
        )
        if recipe.model.init is not None:
            local.replay_init(net.layers, recipe.model.init)
    local.keep("input_norm.", net.input_norm)
    check_output(net, data.input_shape, out, recipe)  # on meta: shapes only
    return net, local.store


def materialize(model: nn.Module, store: dict[str, torch.Tensor], device: torch.device) -> None:
    """After `fully_shard`: allocate the local shards on `device` and fill them."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.to_local() if hasattr(p, "to_local") else p).copy_(store[name])
        for name, b in model.named_buffers():
            b.copy_(store[name])
