"""Recipe sections for models built elsewhere: `model.factory` (any callable returning an
nn.Module) and `model.hf` (transformers' Auto classes). No torch or transformers import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dist_train.config.base import Strict


class FactoryArgs(Strict):
    path: str = Field(
        description="`package.module:callable` returning an nn.Module (a class or a function, "
        "e.g. torchvision.models:resnet18)"
    )
    kwargs: dict = Field(
        default_factory=dict,
        description="keyword arguments; the string `out` as a value becomes the size the data "
        "needs (classes, or 1), e.g. {num_classes: out}",
    )


class HFArgs(Strict):
    pretrained: str = Field(
        description="a local save_pretrained directory, or a hub id (downloaded once per node "
        "by its main process, where there is network)"
    )
    task: Literal["image_classification", "sequence_classification"] = Field(
        description="AutoModelForImageClassification or AutoModelForSequenceClassification"
    )
    num_labels: int | None = Field(
        None,
        ge=1,
        description="width of the model's own classifier (default: what the data needs, "
        "or the checkpoint's own when model.layers follow); a size change replaces the head",
    )
    config: dict = Field(
        default_factory=dict,
        description="config overrides passed to from_pretrained, e.g. {hidden_dropout_prob: 0}",
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
