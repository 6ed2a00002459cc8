"""How raw model outputs meet targets: the loss, and scores for metrics and predictions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
