"""How raw model outputs meet targets: the loss, and scores for metrics and predictions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Head:
    """How raw model outputs meet targets: the loss, and scores for metrics / predictions.

    `class_weights` (cross_entropy) and `pos_weight` (bce_with_logits; one per label for
    multilabel) are resolved numbers here: `balanced` was computed from the training split
    by `data/balance.py`."""

    task: str
    loss: str
    label_smoothing: float = 0.0
    pos_weight: float | list[float] | None = None
    class_weights: list[float] | None = None
    _consts: dict = field(default_factory=dict, repr=False, compare=False)

    def _const(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A weight list as a tensor on `like`'s device and dtype, made once (not per step:
        on a GPU that would be a host-to-device copy every step)."""
        key = (name, like.device, like.dtype)
        if key not in self._consts:
            self._consts[key] = like.new_tensor(getattr(self, name))
        return self._consts[key]

    @property
    def out_features(self) -> int:
        if self.task in ("multiclass", "multilabel"):
            return 0  # one output per class / label: the data says how many
        return 2 if self.loss == "cross_entropy" else 1

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.loss == "cross_entropy":
            if self.class_weights is None:
                return F.cross_entropy(
                    out, y, label_smoothing=self.label_smoothing, reduction=reduction
                )
            per_row = F.cross_entropy(
                out,
                y,
                weight=self._const("class_weights", out),
                label_smoothing=self.label_smoothing,
                reduction="none",
            )
            # The mean over rows, not torch's sum(w * loss) / sum(w): a per-batch weight sum
            # would make each rank's (and each micro-batch's) loss a different average, so
            # 1 and N processes would no longer agree. Over the training split, balanced
            # weights average 1, so the loss keeps its scale.
            return per_row if reduction == "none" else per_row.mean()
        if self.task == "multilabel":
            return self._multilabel_loss(out, y, reduction)
        out, yf = out.squeeze(-1), y.to(out.dtype)
        if self.loss == "bce_with_logits":
            pw = None if self.pos_weight is None else self._const("pos_weight", out)
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

    def _multilabel_loss(self, out: torch.Tensor, y: torch.Tensor, reduction: str):
        """[N, L] outputs against [N, L] 0/1 targets; per row the mean over labels, so the
        validation loss (per-row losses averaged over rows) equals the training loss."""
        yf = y.to(out.dtype)
        if self.loss == "bce":
            per = F.binary_cross_entropy(out.float(), yf.float(), reduction="none")
        else:
            pw = None if self.pos_weight is None else self._const("pos_weight", out)
            per = F.binary_cross_entropy_with_logits(out, yf, pos_weight=pw, reduction="none")
        return per.mean(-1) if reduction == "none" else per.mean()

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        """Class probabilities (multiclass [N, K]; binary: P(class 1) [N]; multilabel: P(label)
        [N, L]) or predictions."""
        out = out.float()
        if self.task == "multiclass":
            return out.softmax(-1)
        if self.task == "multilabel":
            return out if self.loss == "bce" else out.sigmoid()
        if self.task == "binary":
            if self.loss == "cross_entropy":
                return out.softmax(-1)[:, 1]
            return out.squeeze(-1) if self.loss == "bce" else out.squeeze(-1).sigmoid()
        return out.squeeze(-1)
