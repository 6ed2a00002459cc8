"""Layer list -> nn.Module with inferred sizes, init schemes, user modules, summary table."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dist_train.config.layers import LayerSpec, ModuleArgs
from dist_train.config.schema import InitConfig, InitScheme
from dist_train.data.images import unit_float
from dist_train.errors import UserError

_IMPORT_PATH = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)


class Standardize(nn.Module):
    """z-scores raw features with train-split statistics, stored as buffers so the exported
    model.safetensors predicts from raw inputs without a separate preprocessing file."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Net(nn.Module):
    """`input_norm` (optional), `backbone` (optional: a factory/hf/module model, its output
    reduced to logits), then `layers`: parameter names read `layers.0.weight` as the recipe's
    layer list is numbered and `backbone.<its own names>`, so freeze globs match what the user
    wrote. `inputs` (not a module) turns a batch tensor into the backbone's keyword arguments."""

    def __init__(
        self,
        layers: nn.Module,
        input_norm: nn.Module | None = None,
        backbone: nn.Module | None = None,
        inputs=None,
        where: str = "model",
    ) -> None:
        super().__init__()
        self.input_norm = input_norm if input_norm is not None else nn.Identity()
        if backbone is not None:  # registered only when there is one: state dicts unchanged
            self.backbone = backbone
        self.layers = layers
        self.has_backbone, self.inputs, self.where = backbone is not None, inputs, where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 image batches become [0, 1] floats here, on the batch's device: the one place
        # every path (training, eval, predict, probes, the exported model) goes through
        x = self.input_norm(unit_float(x))
        if self.has_backbone:
            x = self.features(x)
        return self.layers(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        from dist_train.model.backbone import logits_of

        out = self.backbone(**self.inputs(x)) if self.inputs is not None else self.backbone(x)
        return logits_of(out, self.where)


def build_model(
    layers: Sequence[LayerSpec] | None,
    module: ModuleArgs | None,
    init: InitConfig | None,
    input_shape: tuple[int, ...],
    out_features: int,
    norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_layer: Callable[[int, nn.Module], nn.Module] | None = None,
    codes: list[tuple[int, int]] | None = None,
) -> Net:
    """Build on the CPU, under the caller's seed, so every rank starts from identical weights.
    `on_layer(i, layer)`: what to keep of each built layer list entry (model/meta.py).
    `codes`: (feature position, categories) of the data's `codes` columns (an embedding)."""
    if module is not None:
        body = import_module_class(module, input_shape, out_features)
    else:
        body = build_layers(layers or [], input_shape, out_features, on_layer, codes)
    if init is not None:
        apply_init(body, init)
    return Net(body, Standardize(*norm) if norm is not None else None)


def build_layers(
    specs: Sequence[LayerSpec],
    input_shape: tuple[int, ...],
    out: int,
    on_layer: Callable[[int, nn.Module], nn.Module] | None = None,
    codes: list[tuple[int, int]] | None = None,
) -> nn.Module:
    seq = nn.Sequential()
    x = torch.zeros(2, *input_shape)  # batch of 2 so batchnorm accepts the probe in train mode
    for i, spec in enumerate(specs):
        layer = _make_layer(spec, tuple(x.shape[1:]), out, i, codes)
        try:
            with torch.no_grad():
                x = layer(x)
        except RuntimeError as err:
            raise UserError(
                f"model.layers[{i}] ({spec.kind}): cannot take an input of shape "
                f"{list(x.shape[1:])}: {str(err).splitlines()[0]}"
            ) from None
        seq.append(on_layer(i, layer) if on_layer is not None else layer)
    return seq


def _make_layer(spec: LayerSpec, shape: tuple[int, ...], out: int, i: int, codes=None) -> nn.Module:
    a, kind, where = spec.args, spec.kind, f"model.layers[{i}] ({spec.kind})"
    if kind == "embedding":
        if not codes:
            raise UserError(
                f"{where}: embeds the data's category codes, but no feature column is "
                "encoded as codes; list columns in data.categorical as `codes` (e.g. "
                "{city: codes}) or remove the layer."
            )
        if i != 0 or len(shape) != 1:
            raise UserError(
                f"{where}: must be the first layer, reading the table's feature row (it "
                "needs the positions of the code columns); move it to model.layers[0]."
            )
        return EmbedCodes(codes, shape[0], a.dim)
    if kind == "linear":
        if len(shape) != 1:
            raise UserError(
                f"{where}: receives a {len(shape)}-D input {list(shape)}; "
                "add `- flatten` before it."
            )
        return nn.Linear(shape[0], out if a.out == "out" else a.out, bias=a.bias)
    if kind == "conv2d":
        if len(shape) != 3:
            raise UserError(
                f"{where}: needs [channels, height, width] input, got {list(shape)}; "
                "set data.shape (e.g. [1, 8, 8]) for image rows."
            )
        return nn.Conv2d(shape[0], a.out, a.kernel, a.stride, a.padding, bias=a.bias)
    if kind in ("max_pool2d", "avg_pool2d"):
        cls = nn.MaxPool2d if kind == "max_pool2d" else nn.AvgPool2d
        return cls(a.kernel, a.stride, a.padding)
    if kind.startswith("batchnorm"):
        dims = {"batchnorm1d": 1, "batchnorm2d": 3}.get(kind, len(shape))
        if len(shape) != dims or dims not in (1, 3):
            raise UserError(
                f"{where}: input of shape {list(shape)} does not fit; "
                "use batchnorm1d after linear, batchnorm2d after conv2d."
            )
        cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        return cls(shape[0], eps=a.eps, momentum=a.momentum)
    if kind == "module":
        return import_module_class(a, shape, out)
    simple = {
        "flatten": lambda: nn.Flatten(),
        "dropout": lambda: nn.Dropout(a.p),
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(a.negative_slope),
        "sigmoid": lambda: nn.Sigmoid(),
        "softmax": lambda: nn.Softmax(dim=a.dim),
        "tanh": lambda: nn.Tanh(),
        "gelu": lambda: nn.GELU(),
    }
    return simple[kind]()


class EmbedCodes(nn.Module):
    """Category codes (1..K; 0 = unseen at fit time) -> learned vectors. The code columns'
    vectors are concatenated after the other features: [B, F] -> [B, F - C + C * dim]."""

    def __init__(self, codes: list[tuple[int, int]], width: int, dim: int) -> None:
        super().__init__()
        positions = [p for p, _ in codes]
        rest = [j for j in range(width) if j not in set(positions)]
        # Index lists as non-persistent buffers: they follow .to(device), stay out of the
        # weights file (they come from the data's encoder, columns.json).
        self.register_buffer("positions", torch.tensor(positions, dtype=torch.long), False)
        self.register_buffer("rest", torch.tensor(rest, dtype=torch.long), False)
        # code 0 (a category unseen at fit time) is the zero vector, never trained
        self.tables = nn.ModuleList(nn.Embedding(k + 1, dim, padding_idx=0) for _, k in codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.index_select(1, self.positions).round().long()
        parts = [x.index_select(1, self.rest)]
        for j, table in enumerate(self.tables):
            # a code outside 0..K cannot come from the encoder; clamp instead of an index error
            parts.append(table(ids[:, j].clamp(0, table.num_embeddings - 1)))
        return torch.cat(parts, 1)


def import_module_class(spec: ModuleArgs, input_shape: tuple[int, ...], out: int) -> nn.Module:
    """The escape hatch: an nn.Module subclass importable from the environment (never a file
    path, never exec). `input_shape` / `out_features` are filled in if the class takes them."""
    if not _IMPORT_PATH.match(spec.path):
        raise UserError(
            f"model module path `{spec.path}`: expected `package.module:ClassName` "
            "of an installed/importable module (file paths are not accepted)."
        )
    mod_name, cls_name = spec.path.split(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise UserError(
            f"model module `{spec.path}`: cannot import ({err}); install the package "
            "or put it on PYTHONPATH."
        ) from None
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise UserError(f"model module `{spec.path}`: is not an nn.Module subclass.")
    kwargs = dict(spec.kwargs)
    params = inspect.signature(cls).parameters
    if "input_shape" in params:
        kwargs.setdefault("input_shape", tuple(input_shape))
    if "out_features" in params:
        kwargs.setdefault("out_features", out)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise UserError(
            f"model module `{spec.path}` kwargs: {err}; arguments: {list(params)}"
        ) from None
    return cls(**kwargs)


def init_fn(scheme: InitScheme):
    if scheme.name == "default":
        return None
    kw = scheme.model_dump(exclude={"name"}, exclude_none=True)
    fn = getattr(nn.init, scheme.name + "_")
    allowed = inspect.signature(fn).parameters
    bad = [k for k in kw if k not in allowed]
    if bad:
        raise UserError(
            f"model.init: `{scheme.name}` does not take {bad}; it takes "
            f"{[p for p in allowed if p != 'tensor']}."
        )
    return lambda t: fn(t, **kw)


def apply_init(body: nn.Module, init: InitConfig) -> None:
    weight_fn = init_fn(init.weight) if init.weight else None
    bias_fn = init_fn(init.bias) if init.bias else None
    for mod in body.modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        with torch.no_grad():
            if weight_fn:
                weight_fn(mod.weight)
            if bias_fn and mod.bias is not None:
                bias_fn(mod.bias)


def summary_rows(
    model: Net, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> list[tuple[str, str, str, int, int]]:
    """(name, type, output shape, trainable, frozen) per top-level layer; a backbone gets a
    row per top-level child, its output shape on the last one."""
    rows, x = [], torch.zeros(2, *input_shape, dtype=dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = model.input_norm(x)
        if model.has_backbone:
            x = model.features(x)
            children = list(model.backbone.named_children()) or [("", model.backbone)]
            for i, (name, part) in enumerate(children):
                n_train = sum(p.numel() for p in part.parameters() if p.requires_grad)
                n_frozen = sum(p.numel() for p in part.parameters() if not p.requires_grad)
                shape = str(list(x.shape[1:])) if i == len(children) - 1 else ""
                full = f"backbone.{name}" if name else "backbone"
                rows.append((full, type(part).__name__, shape, n_train, n_frozen))
        for name, layer in model.layers.named_children():
            x = layer(x)
            n_train = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            n_frozen = sum(p.numel() for p in layer.parameters() if not p.requires_grad)
            rows.append(
                (f"layers.{name}", type(layer).__name__, str(list(x.shape[1:])), n_train, n_frozen)
            )
    model.train(was_training)
    return rows


def format_summary(
    model: Net, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> str:
    rows = summary_rows(model, input_shape, dtype)
    head = ("layer", "type", "output shape", "trainable", "frozen")
    table = [head] + [(n, t, s, f"{a:,}", f"{b:,}") for n, t, s, a, b in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lines += [
        "-" * len(lines[0]),
        f"input {list(input_shape)}; parameters: "
        f"{trainable + frozen:,} total, {trainable:,} trainable, {frozen:,} frozen",
    ]
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen_names:
        lines.append("frozen: " + ", ".join(frozen_names))
    return "\n".join(lines)
