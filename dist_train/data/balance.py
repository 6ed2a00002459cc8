"""Class imbalance from the training split: `balanced` loss weights and the balanced sampler.

Every rank holds the whole training split (sources.load_data is identical on every rank; a
rank's shard is only chosen by the sampler), so the counts below, and the weights and draws
made from them, are the same on every rank without a collective.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def balanced_class_weights(y: torch.Tensor, num_classes: int) -> list[float]:
    """scikit-learn's `balanced`: n_rows / (n_classes x rows of the class). A class absent from
    the training split has no rows to weight: it is refused (its weight would be infinite)."""
    counts = torch.bincount(y.long(), minlength=num_classes)  # y: [N] class indices
    if bool((counts == 0).any()):
        missing = [i for i, c in enumerate(counts.tolist()) if c == 0]
        raise ValueError(
            f"loss.class_weights: balanced needs every class in the training split; class "
            f"index(es) {missing} have no training row; give explicit weights"
        )
    return (len(y) / (num_classes * counts.double())).tolist()


def balanced_pos_weight(y: torch.Tensor) -> float | list[float]:
    """negatives / positives of the training split: one number (binary [N]) or one per label
    (multilabel [N, L])."""
    pos = y.double().sum(0)
    neg = len(y) - pos
    if bool((pos == 0).any()) or bool((neg == 0).any()):
        raise ValueError(
            "loss.pos_weight: balanced needs positive and negative training rows (for every "
            "label); give explicit weights"
        )
    ratio = neg / pos
    return ratio.tolist() if y.dim() == 2 else float(ratio)


class BalancedSampler(Sampler[int]):
    """Rows drawn with replacement, each class equally likely, uniformly within a class (so a
    row's probability is inversely proportional to its class's frequency); `len(labels)` rows
    per epoch.

    The draw depends only on (seed, epoch), like accelerate's SeedableRandomSampler, and is
    the one global sequence of row ids: on N processes accelerate's BatchSamplerShard cuts it
    into per-rank batches exactly as it cuts the shuffled permutation, so 1 and N processes
    train on the same rows, and a mid-epoch resume skips the same micro-batches."""

    def __init__(self, labels: torch.Tensor, seed: int) -> None:
        labels = labels.long()
        counts = torch.bincount(labels)
        self.present = torch.nonzero(counts).squeeze(1)  # classes with training rows
        self.counts = counts[self.present]
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # class blocks in `rows`
        self.rows = torch.argsort(labels, stable=True)  # row ids grouped by class
        self.n, self.seed, self.epoch = len(labels), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def order(self) -> torch.Tensor:
        """This epoch's row ids: a class per draw, then a row of that class (vectorised, so it
        scales to any number of rows, unlike torch.multinomial over rows)."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        cls = torch.randint(len(self.counts), (self.n,), generator=gen)
        counts = self.counts[cls]
        within = (torch.rand(self.n, generator=gen, dtype=torch.float64) * counts).long()
        return self.rows[self.starts[cls] + torch.minimum(within, counts - 1)]

    def __iter__(self):
        return iter(self.order().tolist())


def loss_weights(loss_cfg, task: str, y: torch.Tensor, num_classes: int):
    """(class_weights, pos_weight, notes): the recipe's `loss.class_weights` / `loss.pos_weight`
    as numbers, `balanced` computed from the training targets `y`; the notes say which
    weights the run uses (printed with the plan)."""
    from dist_train.errors import UserError

    cw, pw, notes = loss_cfg.class_weights, loss_cfg.pos_weight, []
    try:
        if cw == "balanced":
            cw = balanced_class_weights(y, num_classes)
        if pw == "balanced":
            pw = balanced_pos_weight(y)
    except ValueError as err:
        raise UserError(f"{err}.") from None
    if isinstance(pw, (int, float)) and task == "multilabel":
        pw = [float(pw)] * num_classes  # one number for every label
    if cw is not None:
        notes.append(_note("class weights", cw, loss_cfg.class_weights, len(y)))
    if pw is not None:
        notes.append(_note("pos_weight", pw, loss_cfg.pos_weight, len(y)))
    return cw, pw, notes


def _note(what: str, values, setting, rows: int) -> str:
    shown = (
        "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
        if isinstance(values, list)
        else (f"{values:.4g}")
    )
    source = f"balanced, from {rows} training rows" if setting == "balanced" else "from the recipe"
    return f"loss: {what} {shown} ({source})"


def sampler_note(y: torch.Tensor) -> str:
    counts = torch.bincount(y.long())
    present = counts[counts > 0]
    return (
        f"data: balanced sampler, {len(present)} classes drawn equally often ({len(y)} rows per "
        f"epoch, with replacement; training rows per class {counts.tolist()})"
    )
