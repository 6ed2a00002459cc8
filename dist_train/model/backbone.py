"""Backbones built elsewhere (`model.factory`, `model.hf`, or `model.module` followed by a
head) and the one rule that reduces whatever a model returns to logits.

The backbone is built on the CPU under the caller's seed (a new classifier head is drawn
identically on every rank). transformers is imported only here, only when a recipe names
`model.hf` (or `data.text`, for its tokenizer: data/text.py).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dist_train.config.backbones import FactoryArgs, HFArgs
from dist_train.errors import UserError

_CALLABLE_PATH = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*"
    r"(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


def logits_of(output: object, where: str) -> torch.Tensor:
    """The logits in a model's output, by one rule: a tensor is the logits; otherwise its
    `logits` attribute (a transformers ModelOutput), else its "logits" key (a dict), else the
    first tensor of a tuple/list. Anything else (a ModelOutput or dict without logits, e.g. a
    base model's hidden states) is a recipe error naming `where`."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        kind = "ModelOutput" if hasattr(output, "to_tuple") else "dict"
        raise UserError(
            f"{where}: the model returns a {type(output).__name__} ({kind} without logits; "
            f"fields: {', '.join(map(str, output))}). Use a model with a classification head "
            "(model.hf with a task, or a factory returning logits), or wrap it in an "
            "nn.Module whose forward returns the logits tensor."
        )
    if isinstance(output, (tuple, list)):
        first = next((t for t in output if isinstance(t, torch.Tensor)), None)
        if first is not None:
            return first
    raise UserError(
        f"{where}: the model returns a {type(output).__name__}, not logits (a tensor, a "
        "ModelOutput/dict with `logits`, or a tuple starting with a tensor); wrap it in an "
        "nn.Module whose forward returns the logits tensor."
    )


class PixelInputs:
    """transformers vision models take the image batch as `pixel_values=`."""

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": x}


class TokenInputs:
    """Token rows are stored as one int64 tensor [N, K, max_length] (K = the tokenizer's
    outputs: input_ids, attention_mask, ...), padded once to `data.max_length`, so the data
    path (whole-batch indexing, sharding, gather, resume) stays the float-row one. Each batch
    is cut here to its longest row (dynamic padding): the positions removed are masked out
    for every row of the batch, so the logits are those of the full length up to float
    rounding, at the cost of the batch's real length."""

    def __init__(self, names: list[str], right_padded: bool) -> None:
        self.names, self.right_padded = list(names), right_padded
        self.mask = self.names.index("attention_mask") if "attention_mask" in self.names else None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.mask is not None and self.right_padded:
            # one host read per batch: the batch's real length
            x = x[:, :, : max(1, int(x[:, self.mask].sum(1).max()))]
        return {name: x[:, i] for i, name in enumerate(self.names)}


def import_callable(path: str, key: str):
    """`package.module:name[.attr]` from the environment (never a file path, never exec)."""
    if not _CALLABLE_PATH.match(path):
        raise UserError(
            f"{key} `{path}`: expected `package.module:callable` of an installed/importable "
            "module, e.g. torchvision.models:resnet18 (file paths are not accepted)."
        )
    mod_name, attr = path.split(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise UserError(
            f"{key} `{path}`: cannot import ({err}); install the package, put it on "
            "PYTHONPATH, or fix the name."
        ) from None
    if not callable(obj):
        raise UserError(f"{key} `{path}`: is not callable (a class or a function is needed).")
    return obj


def build_factory(spec: FactoryArgs, out: int) -> nn.Module:
    """`spec.path(**kwargs)`, the string "out" in kwargs replaced by the size the data needs."""
    fn = import_callable(spec.path, "model.factory.path")
    kwargs = {k: out if v == "out" else v for k, v in spec.kwargs.items()}
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as err:
        raise UserError(f"model.factory.kwargs: `{spec.path}` does not take them: {err}.") from None
    except ValueError:  # a builtin without a signature: the call itself will tell
        pass
    module = fn(**kwargs)
    if not isinstance(module, nn.Module):
        raise UserError(
            f"model.factory.path `{spec.path}`: returned a {type(module).__name__}, "
            "not an nn.Module."
        )
    return module


def build_hf(spec: HFArgs, out: int, head_follows: bool, accelerator=None):
    """(model, notes): transformers' Auto class for `spec.task`, its classifier sized from
    the data (`ignore_mismatched_sizes`: a different size is replaced by a new head). A local
    directory loads on every rank at once; a hub id is downloaded by each node's main process
    first (the others then read its cache)."""
    from dist_train.extras import require

    require("transformers", "model.hf")
    import transformers

    transformers.utils.logging.set_verbosity_error()  # our notes say what was replaced
    transformers.utils.logging.disable_progress_bar()
    auto = {
        "image_classification": transformers.AutoModelForImageClassification,
        "sequence_classification": transformers.AutoModelForSequenceClassification,
    }[spec.task]
    where = spec.pretrained
    local = Path(where).expanduser().is_dir()
    if not local and where.startswith(("/", ".", "~")):
        raise UserError(f"model.hf.pretrained `{where}`: directory not found.")
    kwargs = dict(spec.config, dtype=torch.float32, ignore_mismatched_sizes=True)
    num_labels = spec.num_labels or (None if head_follows else out)
    if num_labels:
        kwargs["num_labels"] = num_labels
    if spec.revision:
        kwargs["revision"] = spec.revision
    first = (
        accelerator.local_main_process_first()  # collective: a barrier on entry and exit
        if accelerator is not None and not local
        else contextlib.nullcontext()
    )
    model, info, error = None, None, None
    with first:
        try:
            model, info = auto.from_pretrained(
                str(Path(where).expanduser()) if local else where,
                output_loading_info=True,
                **kwargs,
            )
        except TypeError as err:  # an unknown config override reaches the model's __init__
            error = UserError(f"model.hf.config: {where} rejects {sorted(spec.config)}: {err}.")
        except (OSError, ValueError, KeyError) as err:
            # Held until every rank has left the barrier (a raise inside would strand them).
            error = UserError(
                f"model.hf.pretrained `{where}`: cannot load a {spec.task} model "
                f"({str(err).splitlines()[0][:240]}). Give a directory written by "
                "save_pretrained, or a hub id on a machine with network (no network here: "
                "download it elsewhere, save_pretrained, and copy the directory)."
            )
    if error is not None:
        raise error
    new = [k for k in info.get("missing_keys", [])] + [
        m[0] if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", [])
    ]
    notes = [
        f"model.hf: {type(model).__name__} from {where}; "
        f"{'new head: ' + ', '.join(sorted(new)) if new else 'all weights loaded'}"
    ]
    return model.train(), notes


def input_adapter(spec: HFArgs | None, input_names: list[str] | None, right_padded: bool):
    """How a batch tensor reaches the backbone: token rows as keyword arguments, images as
    `pixel_values=` for transformers, else positionally (None)."""
    if input_names:
        return TokenInputs(input_names, right_padded)
    if spec is not None and spec.task == "image_classification":
        return PixelInputs()
    return None


def build_backbone_net(cfg, data, out: int, accelerator=None):
    """(Net, notes) for a recipe with a backbone: the backbone, then `model.layers` (if any)
    as a head sized by a dry forward of the backbone. `model.init` applies only to what the
    recipe itself creates (the head, or a `model.module`), never to a factory/hf backbone's
    weights (pretrained, or the library's own initialisation)."""
    from dist_train.model.net import (
        Net,
        Standardize,
        apply_init,
        build_layers,
        import_module_class,
    )

    notes: list[str] = []
    if cfg.hf is not None:
        backbone, notes = build_hf(cfg.hf, out, bool(cfg.layers), accelerator)
        where = "model.hf"
    elif cfg.factory is not None:
        backbone, where = build_factory(cfg.factory, out), "model.factory"
    else:
        backbone, where = import_module_class(cfg.module, data.input_shape, out), "model.module"
        if cfg.init is not None:
            apply_init(backbone, cfg.init)
    inputs = input_adapter(cfg.hf, data.input_names, data.right_padded)
    norm = Standardize(*data.norm) if data.norm is not None else None
    net = Net(nn.Sequential(), norm, backbone, inputs, where)
    if cfg.layers:
        probe = torch.zeros(2, *data.input_shape, dtype=data.train.dtype)
        net.eval()
        try:
            with torch.no_grad():
                feats = net.features(net.input_norm(probe))
        finally:
            net.train()
        net.layers = build_layers(cfg.layers, tuple(feats.shape[1:]), out)
        if cfg.init is not None:
            apply_init(net.layers, cfg.init)
    return net, notes
