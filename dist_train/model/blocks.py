"""The model's blocks, and activation checkpointing over them (`train.activation_checkpointing`).

A *block* is the unit that activation checkpointing recomputes (and that FSDP shards as one):

- a layer list (`model.layers`, or a `module` that is an `nn.Sequential`): consecutive layers
  up to and including an activation (relu, leaky_relu, gelu, tanh, sigmoid, softmax), plus the
  parameter-free layers right after it (dropout, pooling, flatten); what follows the last
  activation is the last block. `linear, batchnorm1d, gelu, dropout` is one block: its
  intermediate tensors are recomputed in backward instead of being kept;
- any other model: the modules whose class name is listed in `train.fsdp.wrap`, else the
  items of transformer layer lists found by attribute name (`encoder.layer`, `model.layers`,
  `transformer.h`, `blocks`: any `nn.ModuleList` attribute called layer/layers/h/blocks).

Checkpointing never renames a parameter: the forward of the block (or of the Sequential that
runs the groups) is replaced on the instance, so checkpoints, freeze globs and the export keep
`layers.0.weight`. The replacement is a bound method, so `copy.deepcopy` (DDP's probe) rebinds
it to the copy.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dist_train.errors import UserError

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softmax)
# Parameter-free layers that stay with the activation they follow.
TRAILING = (nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity)
LAYER_LISTS = ("layer", "layers", "h", "blocks")  # transformer conventions (HF, GPT-2, ViT)


def sequential_groups(seq: nn.Sequential) -> list[list[int]]:
    """Indices of `seq`'s children, grouped into blocks (see the module docstring)."""
    groups: list[list[int]] = [[]]
    closed = False  # the current group ended at an activation; trailing layers may still join
    for i, layer in enumerate(seq):
        if closed and not isinstance(layer, TRAILING):
            groups.append([])
            closed = False
        groups[-1].append(i)
        closed = closed or isinstance(layer, ACTIVATIONS)
    return [g for g in groups if g]


def module_blocks(model: nn.Module, wrap: list[str]) -> list[nn.Module]:
    """Blocks of a model that is not a layer list: classes named in `wrap`, else the items of
    transformer layer lists. Outermost matches only (a block inside a block is not another)."""
    if wrap:
        found, inside = [], set()
        for name, mod in model.named_modules():
            if type(mod).__name__ in wrap and not any(name.startswith(p + ".") for p in inside):
                found.append(mod)
                inside.add(name)
        return found
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LISTS:
            return list(mod)
    return []


def body_of(model: nn.Module) -> nn.Module:
    """The recipe's network inside `Net` (its `layers`), or the model itself."""
    return getattr(model, "layers", model)


def apply_activation_checkpointing(model: nn.Module, wrap: list[str]) -> int:
    """Wrap every block's forward in `torch.utils.checkpoint` (non-reentrant); returns the
    number of blocks. A model with no block found is a recipe error naming the fix."""
    body = body_of(model)
    if isinstance(body, nn.Sequential) and not wrap:
        body._ac_groups = sequential_groups(body)
        body.forward = types.MethodType(_checkpointed_sequential, body)
        return len(body._ac_groups)
    blocks = module_blocks(model, wrap)
    if not blocks:
        raise UserError(
            "train.activation_checkpointing: found no blocks in the model (no class named in "
            "train.fsdp.wrap, no `layer`/`layers`/`h`/`blocks` module list); list the block "
            "class names in train.fsdp.wrap, e.g. [BertLayer], or set it to false."
        )
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """The block's class forward, recomputed in backward (not in eval: nothing to save)."""
    inner = types.MethodType(type(self).forward, self)
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=_contexts(self), **kwargs)


def _checkpointed_sequential(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for group in self._ac_groups:
        layers = [self[i] for i in group]
        if torch.is_grad_enabled():
            x = checkpoint(_run, layers, x, use_reentrant=False, context_fn=_contexts(*layers))
        else:
            x = _run(layers, x)
    return x


def _run(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _contexts(*modules: nn.Module):
    """Checkpoint's (forward, recompute) contexts. The recompute must not update batchnorm
    running statistics a second time (the weights would differ from a run without
    checkpointing): their buffers are put back after it. Dropout masks are replayed by
    checkpoint's own RNG state (preserve_rng_state)."""
    norms = [
        m
        for mod in modules
        for m in mod.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not norms:
        return _no_contexts
    return lambda: (contextlib.nullcontext(), _keep_buffers(norms))


def _no_contexts():
    return contextlib.nullcontext(), contextlib.nullcontext()


@contextlib.contextmanager
def _keep_buffers(modules: list[nn.Module]) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
