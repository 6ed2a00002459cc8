"""The layer vocabulary of a recipe's `model.layers`, as typed argument models (no torch import).

A layer is written as a bare name (`relu`), a name with its main argument (`linear: 64`,
`dropout: 0.2`) or a name with a mapping (`conv2d: {out: 16, kernel: 3, padding: 1}`).
`models.py` maps each name to an `nn.Module` constructor; this file only decides what a
recipe may say, so validation and the reference docs never need torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LinearArgs(_Args):
    out: Annotated[int, Field(ge=1)] | Literal["out"] = Field(
        description="output features; `out` = inferred from the data (classes, or 1)"
    )
    bias: bool = Field(True, description="add a learnable bias")


class Conv2dArgs(_Args):
    out: int = Field(description="output channels", ge=1)
    kernel: int = Field(3, description="square kernel size", ge=1)
    stride: int = Field(1, ge=1, description="stride")
    padding: int | Literal["same", "valid"] = Field(0, description="zero padding, or same/valid")
    bias: bool = Field(True, description="add a learnable bias")


class PoolArgs(_Args):
    kernel: int = Field(2, ge=1, description="window size")
    stride: int | None = Field(None, ge=1, description="stride (default: kernel)")
    padding: int = Field(0, ge=0, description="implicit padding")


class DropoutArgs(_Args):
    p: float = Field(0.5, ge=0.0, lt=1.0, description="probability of zeroing an activation")


class LeakyReluArgs(_Args):
    negative_slope: float = Field(0.01, ge=0.0, description="slope for negative inputs")


class SoftmaxArgs(_Args):
    dim: int = Field(-1, description="dimension that sums to 1")


class BatchNormArgs(_Args):
    momentum: float = Field(0.1, gt=0.0, le=1.0, description="running-stats momentum")
    eps: float = Field(1e-5, gt=0.0, description="added to the variance")


class NoArgs(_Args):
    pass


class EmbeddingArgs(_Args):
    dim: int = Field(ge=1, description="size of each category's learned vector")


class ModuleArgs(_Args):
    path: str = Field(description="`package.module:ClassName` of an importable nn.Module")
    kwargs: dict = Field(default_factory=dict, description="constructor keyword arguments")


# name -> (argument model, name of the argument a scalar shorthand fills, one-line doc)
LAYERS: dict[str, tuple[type[_Args], str | None, str]] = {
    "linear": (LinearArgs, "out", "fully connected layer (nn.Linear); input size inferred"),
    "conv2d": (Conv2dArgs, "out", "2-D convolution (nn.Conv2d); input channels inferred"),
    "max_pool2d": (PoolArgs, "kernel", "2-D max pooling"),
    "avg_pool2d": (PoolArgs, "kernel", "2-D average pooling"),
    "flatten": (NoArgs, None, "flatten all but the batch dimension"),
    "batchnorm": (BatchNormArgs, None, "batch norm, 1d or 2d chosen from the input"),
    "batchnorm1d": (BatchNormArgs, None, "nn.BatchNorm1d"),
    "batchnorm2d": (BatchNormArgs, None, "nn.BatchNorm2d"),
    "dropout": (DropoutArgs, "p", "zero activations with probability p (train mode only)"),
    "relu": (NoArgs, None, "max(x, 0)"),
    "leaky_relu": (LeakyReluArgs, "negative_slope", "x if x > 0 else slope * x"),
    "sigmoid": (NoArgs, None, "1 / (1 + exp(-x)); final layer for `bce` loss"),
    "softmax": (SoftmaxArgs, "dim", "probabilities summing to 1 (not before cross_entropy)"),
    "tanh": (NoArgs, None, "hyperbolic tangent"),
    "gelu": (NoArgs, None, "Gaussian error linear unit"),
    "embedding": (
        EmbeddingArgs,
        "dim",
        "first layer of a table model: each data.categorical `codes` column (1..K, 0 unseen) "
        "-> a learned vector of `dim`, concatenated after the other features",
    ),
    "module": (ModuleArgs, "path", "your own nn.Module by import path (see model.module)"),
}


class LayerSpec(BaseModel):
    """One validated layer: its registry name and typed arguments."""

    model_config = ConfigDict(frozen=True)
    kind: str
    args: _Args

    @model_serializer
    def _as_recipe(self) -> str | dict:
        # Written back in recipe form, with every argument, so a resolved recipe reproduces the run.
        data = self.args.model_dump()
        return {self.kind: data} if data else self.kind


def parse_layer(raw: object) -> tuple[str, dict]:
    """`relu` / `{linear: 64}` / `{conv2d: {...}}` -> (name, kwargs); ValueError if malformed."""
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, dict) and len(raw) == 1:
        ((name, value),) = raw.items()
        if not isinstance(name, str):
            raise ValueError(f"layer name must be a string, got {name!r}")
        if isinstance(value, dict):
            return name, value
        if name not in LAYERS:
            return name, {}
        _, shorthand, _ = LAYERS[name]
        if shorthand is None:
            raise ValueError(
                f"`{name}` takes no scalar argument; write `{name}` or `{name}: {{...}}`"
            )
        return name, {shorthand: value}
    raise ValueError(
        "a layer is a name (`relu`), a name with its main argument (`linear: 64`) "
        f"or a name with a mapping (`conv2d: {{out: 16, kernel: 3}}`); got {raw!r}"
    )
