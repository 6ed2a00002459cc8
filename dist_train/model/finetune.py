"""Fine-tuning: load pretrained weights safely, reinitialise a new head, freeze layers.

Applied to the bare model BEFORE accelerate wraps it, so DDP never registers frozen
parameters (no unused-parameter errors) and the optimizer never sees them. Weights load only
through safetensors or `torch.load(weights_only=True)`: a tampered pickle cannot run code.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from dist_train.config.schema import FinetuneConfig
from dist_train.errors import UserError


def load_weights(path_str: str, key: str = "finetune.from") -> dict[str, torch.Tensor]:
    """A state dict from model.safetensors, a checkpoint/run directory, or a torch.save file
    (`key` names the recipe key or flag in error messages)."""
    path = Path(path_str)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise UserError(
                f"{key} {path}: no model.safetensors in this directory; "
                "point at a run directory, a checkpoint directory or a weights file."
            )
        path = candidate
    if not path.is_file():
        raise UserError(
            f"{key} {path}: file not found; give the path of a "
            "model.safetensors, a checkpoint directory or a .pt state dict."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{key} {path}: not a valid safetensors file ({err}).") from None
    else:
        state = _torch_load(path, key)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _torch_load(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything beyond tensors and containers
        raise UserError(
            f"{key} {path}: refused to load: it holds pickled Python objects, not just "
            f"tensors ({str(err).splitlines()[0][:120]}). Unpickling could run arbitrary code; "
            "save a state dict instead: torch.save(model.state_dict(), path), or use "
            "safetensors."
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):  # training-script checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{key} {path}: expected a state dict (name -> tensor).")
    return obj


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def prepare_finetune(model: nn.Module, cfg: FinetuneConfig | None, verbose: bool) -> list[str]:
    """Load, reinit, freeze; returns human-readable notes (the kept/reinit/missing table)."""
    if cfg is None:
        return []
    source = load_weights(cfg.from_)
    own = model.state_dict()
    kept, reinit, missing, mismatched = [], [], [], []
    for name, tensor in own.items():
        if _matches(name, cfg.reinit):
            reinit.append(name)
        elif name not in source:
            missing.append(name)
        elif source[name].shape != tensor.shape:
            mismatched.append(
                f"{name}: checkpoint {list(source[name].shape)} vs model {list(tensor.shape)}"
            )
        else:
            kept.append(name)
    unexpected = [k for k in source if k not in own]
    if mismatched and not cfg.allow_shape_mismatch:
        raise UserError(
            f"finetune.from {cfg.from_}: shapes differ from this recipe's model:\n    "
            + "\n    ".join(mismatched)
            + '\n  list them in finetune.reinit (e.g. a new head: "layers.6.*") or set '
            "finetune.allow_shape_mismatch: true to reinitialise them."
        )
    if not kept:
        raise UserError(
            f"finetune.from {cfg.from_}: no tensor matches this model (e.g. model "
            f"has {list(own)[:3]}, file has {list(source)[:3]}); wrong architecture?"
        )
    model.load_state_dict({k: source[k] for k in kept}, strict=False)
    frozen = freeze(model, cfg.freeze)
    reinit += [m.split(":")[0] for m in mismatched]
    notes = [
        f"finetune: {len(kept)} tensors loaded from {cfg.from_}, {len(reinit)} "
        f"reinitialized, {len(missing)} missing, {len(unexpected)} unexpected; "
        f"{frozen} parameters frozen"
    ]
    for label, names in (
        ("reinitialized", reinit),
        ("missing", missing),
        ("unexpected", unexpected),
    ):
        if names:
            notes.append(f"  {label}: {', '.join(names)}")
    return notes


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """requires_grad=False on matching parameters; matching batch-norm layers stay in eval
    mode so their running statistics (buffers) are frozen too. Returns the frozen count."""
    if not patterns:
        return 0
    count = 0
    for name, p in model.named_parameters():
        if _matches(name, patterns):
            p.requires_grad_(False)
            count += p.numel()
    if count == 0:
        raise UserError(
            f"finetune.freeze {patterns}: matches no parameter; names look like "
            f"{[n for n, _ in model.named_parameters()][:4]}."
        )
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and _bn_frozen(mod_name, mod, patterns):
            mod.__class__ = _frozen_class(type(mod))
            mod.eval()
    return count


def _bn_frozen(mod_name: str, mod: nn.Module, patterns: list[str]) -> bool:
    params = list(mod.parameters())
    if params:
        return all(not p.requires_grad for p in params)
    return _matches(f"{mod_name}.running_mean", patterns)


_FROZEN: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """A subclass whose train() always means eval(): running stats never update."""
    if cls not in _FROZEN:

        def train(self, mode: bool = True):
            return super(_FROZEN[cls], self).train(False)

        _FROZEN[cls] = type(f"Frozen{cls.__name__}", (cls,), {"train": train})
    return _FROZEN[cls]
