"""The only place config meets constructors: data, model, loss head, optimizer, schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_train.config.schema import Recipe
from dist_train.data.sources import DataBundle, load_data
from dist_train.errors import UserError
from dist_train.model.net import Net, build_model


@dataclass
class Head:
    """How raw model outputs meet targets: the loss, and scores for metrics / predictions."""

    task: str
    loss: str
    label_smoothing: float = 0.0
    pos_weight: float | None = None

    @property
    def out_features(self) -> int:
        return 0 if self.task == "multiclass" else (2 if self.loss == "cross_entropy" else 1)

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(
                out, y, label_smoothing=self.label_smoothing, reduction=reduction
            )
        out, yf = out.squeeze(-1), y.to(out.dtype)
        if self.loss == "bce_with_logits":
            pw = None if self.pos_weight is None else out.new_tensor(self.pos_weight)
            return F.binary_cross_entropy_with_logits(out, yf, pos_weight=pw, reduction=reduction)
        fn = {
            "bce": F.binary_cross_entropy,
            "mse": F.mse_loss,
            "l1": F.l1_loss,
            "smooth_l1": F.smooth_l1_loss,
            "huber": F.huber_loss,
        }[self.loss]
        return fn(
            out.float() if self.loss == "bce" else out,
            yf.float() if self.loss == "bce" else yf,
            reduction=reduction,
        )

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        """Class probabilities (multiclass [N, K]; binary: P(class 1) [N]) or predictions."""
        out = out.float()
        if self.task == "multiclass":
            return out.softmax(-1)
        if self.task == "binary":
            if self.loss == "cross_entropy":
                return out.softmax(-1)[:, 1]
            return out.squeeze(-1) if self.loss == "bce" else out.squeeze(-1).sigmoid()
        return out.squeeze(-1)


def make_head(recipe: Recipe) -> Head:
    return Head(
        recipe.data.task, recipe.loss.name, recipe.loss.label_smoothing, recipe.loss.pos_weight
    )


def build_data(recipe: Recipe) -> DataBundle:
    return load_data(recipe.data, recipe.seed)


def build_net(recipe: Recipe, data: DataBundle, head: Head) -> Net:
    """Seeded construction: every rank (and every rerun) starts from the same weights."""
    out = head.out_features or data.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = build_model(
            recipe.model.layers,
            recipe.model.module,
            recipe.model.init,
            data.input_shape,
            out,
            data.norm,
        )
    _check_output(net, data.input_shape, out, recipe)
    return net


def _check_output(net: Net, input_shape: tuple[int, ...], out: int, recipe: Recipe) -> None:
    """The model must emit one score per class (or 1): caught here, not at the first eval."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        got = tuple(net(torch.zeros(2, *input_shape)).shape[1:])
    net.train(was_training)
    if got != (out,):
        need = f"{out} ({recipe.data.task}, loss {recipe.loss.name})"
        raise UserError(
            f"model: the last layer outputs shape {list(got)} per row but the task "
            f"needs {need}; end model.layers with `- linear: out` (plus sigmoid "
            "for loss bce)."
        )


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the partial last batch is dropped so every step sees exactly
    `batch_size` samples on any world size (what makes 1 and N processes agree)."""
    return n_train // batch_size


def total_steps(recipe: Recipe, n_train: int) -> int:
    per_epoch = steps_per_epoch(n_train, recipe.train.batch_size)
    total = per_epoch * recipe.train.epochs
    return min(total, recipe.train.max_steps) if recipe.train.max_steps else total


def epochs_needed(recipe: Recipe, n_train: int) -> int:
    per_epoch = max(steps_per_epoch(n_train, recipe.train.batch_size), 1)
    return min(recipe.train.epochs, math.ceil(total_steps(recipe, n_train) / per_epoch))


def build_optimizer(model: Net, cfg) -> torch.optim.Optimizer:
    from dist_train.training.optim import build_optimizer as _make

    return _make(model, cfg)


def build_scheduler(optimizer, cfg, total: int, peak_lr: float):
    from dist_train.training.optim import build_scheduler as _make

    return _make(optimizer, cfg, total, peak_lr)
