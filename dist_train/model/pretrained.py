"""Pretrained weights from the files users have, read safely, and renamed by prefix rules.

Accepted: a `.safetensors` file; a run or checkpoint directory (its model.safetensors); a
transformers `save_pretrained` directory (model.safetensors or pytorch_model.bin, each possibly
sharded with an `.index.json`); a `torch.save` state dict, optionally wrapped in a training
script's checkpoint dict. Weights load only through safetensors or
`torch.load(weights_only=True)`: a tampered pickle cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_train.errors import UserError

# In the order a directory is searched: ours and transformers' single files, then shards.
DIR_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Training scripts often save {"epoch": ..., "model_state_dict": {...}, "optimizer": ...}.
WRAPPERS = ("state_dict", "model", "model_state_dict")


def load_weights(path_str: str, key: str = "finetune.from") -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from any accepted source; `module.` (DDP's prefix) is
    stripped. `key` names the recipe key or flag in error messages."""
    path = Path(path_str)
    if path.is_dir():
        found = next((path / f for f in DIR_FILES if (path / f).is_file()), None)
        if found is None:
            raise UserError(
                f"{key} {path}: no model.safetensors in this directory (nor "
                f"{', '.join(DIR_FILES[1:])}); point at a run directory, a checkpoint "
                "directory, a transformers save_pretrained directory or a weights file."
            )
        path = found
    if not path.is_file():
        raise UserError(
            f"{key} {path}: file not found; give the path of a model.safetensors, a checkpoint "
            "directory, a transformers directory or a .pt state dict."
        )
    if path.name.endswith(".index.json"):
        state = _sharded(path, key)
    else:
        state = _one_file(path, key)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _one_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{key} {path}: not a valid safetensors file ({err}).") from None
    return _torch_load(path, key)


def _sharded(index: Path, key: str) -> dict[str, torch.Tensor]:
    """transformers' sharded checkpoints: `weight_map` names the shard of every tensor."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{key} {index}: not a shard index (no weight_map: {err}).") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index.parent / shard
        if not shard_path.is_file() or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise UserError(f"{key} {index}: shard {shard} is missing from {index.parent}.")
        state |= _one_file(shard_path, key)
    return state


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
    for wrapper in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{key} {path}: expected a state dict (name -> tensor).")
    return obj


def apply_key_map(
    state: dict[str, torch.Tensor], rules: dict[str, str | None], source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename tensors by the first rule whose prefix starts their name (a None target drops
    them); returns the renamed dict and the dropped names. A rule that renames nothing, or two
    names renamed onto one, is a mistake in `finetune.key_map` (exit 2)."""
    if not rules:
        return state, []
    used = dict.fromkeys(rules, 0)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    for name, tensor in state.items():
        rule = next((r for r in rules if name.startswith(r)), None)
        if rule is None:
            new = name
        else:
            used[rule] += 1
            if rules[rule] is None:
                dropped.append(name)
                continue
            new = rules[rule] + name[len(rule) :]
        if new in out:
            raise UserError(
                f"finetune.key_map: `{origin[new]}` and `{name}` from {source} both become "
                f"`{new}`; make the rules more specific (first match wins)."
            )
        out[new], origin[new] = tensor, name
    unused = [r for r, n in used.items() if n == 0]
    if unused:
        raise UserError(
            f"finetune.key_map: rule {unused[0]!r} matches no tensor name in {source} "
            f"(names there look like {list(state)[:4]}); rules match name prefixes, first "
            "match wins: fix or remove the rule."
        )
    return out, dropped
