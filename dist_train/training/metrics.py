"""torchmetrics by name, task-aware, fed with already-gathered tensors.

Exactness across processes: evaluation gathers (outputs, targets) with accelerate's
`gather_for_metrics`, which drops the samples the distributed sampler duplicated to even out
the last batch; every rank then updates identical metric objects with `sync_on_compute=False`
(torchmetrics' own sync would count those duplicates).
"""

from __future__ import annotations

import torch

from dist_train.config.tasks import split_metric


class MetricSet:
    """`names` as in the recipe (`accuracy@5`: top-5 accuracy); `num_classes` is the number of
    labels for multilabel; `threshold` turns binary/multilabel probabilities into 0/1;
    `supplied`: dist_train.fit's torchmetrics objects by name, cloned for this run."""

    def __init__(
        self,
        names: list[str],
        task: str,
        num_classes: int,
        device: torch.device,
        threshold: float = 0.5,
        supplied: dict | None = None,
    ):
        self.task, self.names, self.num_classes, self.device = task, names, num_classes, device
        self.threshold = threshold
        self.supplied = supplied or {}
        self._metrics: dict | None = None

    @property
    def metrics(self) -> dict:
        """Built at the first update, so `import torchmetrics` (3.7 s here with the `[all]`
        extras: its package `__init__` imports scipy.signal, matplotlib and transformers
        whenever they are installed) waits for the first evaluation instead of delaying the
        first step. Not on a background thread started earlier: with small CPU steps the two
        threads take turns on the GIL, which made the whole process slower than this serial
        import (benchmarks/run.py startup_mlp_bs64, README Performance)."""
        if self._metrics is None:
            self._metrics = {name: self._build(name).to(self.device) for name in self.names}
            self._metrics |= {k: own_copy(m).to(self.device) for k, m in self.supplied.items()}
        return self._metrics

    def _build(self, name: str):
        import torchmetrics

        kw: dict = {"sync_on_compute": False}
        if self.task == "multiclass":
            kw |= {"task": "multiclass", "num_classes": self.num_classes}
        elif self.task == "binary":
            kw |= {"task": "binary"}
        elif self.task == "multilabel":
            kw |= {"task": "multilabel", "num_labels": self.num_classes}
        # A decision threshold for the 0/1 metrics (AUROC ranks the probabilities instead).
        cut = kw | ({"threshold": self.threshold} if self.task in ("binary", "multilabel") else {})
        base, k = split_metric(name)
        makers = {
            "accuracy": lambda: torchmetrics.Accuracy(**cut, **({"top_k": k} if k else {})),
            "precision": lambda: torchmetrics.Precision(**_avg(cut)),
            "recall": lambda: torchmetrics.Recall(**_avg(cut)),
            "f1": lambda: torchmetrics.F1Score(**_avg(cut)),
            "auroc": lambda: torchmetrics.AUROC(**kw),
            "confusion_matrix": lambda: torchmetrics.ConfusionMatrix(**cut),
            "mse": lambda: torchmetrics.MeanSquaredError(sync_on_compute=False),
            "mae": lambda: torchmetrics.MeanAbsoluteError(sync_on_compute=False),
            "r2": lambda: torchmetrics.R2Score(sync_on_compute=False),
        }
        return makers[base]()

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        """`scores`: probabilities for classification, predictions for regression."""
        for metric in self.metrics.values():
            metric.update(scores, targets)

    def compute(self) -> dict[str, float | list]:
        out: dict[str, float | list] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            out[name] = value.tolist() if value.numel() > 1 else float(value)
            metric.reset()
        return out


def own_copy(metric):
    """A fresh clone (the caller's object keeps its state; every run starts from zero) that
    computes on the gathered rows it is given, like ours: torchmetrics' own sync would count
    the sampler's padded duplicates and run a collective of its own."""
    metric = metric.clone()
    metric.reset()
    metric.sync_on_compute = metric._to_sync = False  # _to_sync: what compute() reads
    metric.dist_sync_on_step = False
    return metric


def _avg(kw: dict) -> dict:
    """Macro averages over classes / labels (torchmetrics' wrappers default to micro)."""
    return kw | {"average": "macro"} if kw.get("task") in ("multiclass", "multilabel") else kw
