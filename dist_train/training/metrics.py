"""torchmetrics by name, task-aware, fed with already-gathered tensors.

Exactness across processes: evaluation gathers (outputs, targets) with accelerate's
`gather_for_metrics`, which drops the samples the distributed sampler duplicated to even out
the last batch; every rank then updates identical metric objects with `sync_on_compute=False`
(torchmetrics' own sync would count those duplicates).
"""

from __future__ import annotations

import torch


class MetricSet:
    def __init__(
        self,
        names: list[str],
        task: str,
        num_classes: int,
        device: torch.device,
        supplied: dict | None = None,
    ):
        """`supplied`: dist_train.fit's torchmetrics objects by name, cloned for this run."""
        self.task, self.names, self.num_classes, self.device = task, names, num_classes, device
        self.supplied = supplied or {}
        self._metrics: dict | None = None

    @property
    def metrics(self) -> dict:
        """Built at the first update, so `import torchmetrics` (~1.2 s, ~100 MiB) stays off the
        path to the first training step (the metric set is created before the loop starts).
        Importing only the needed classes from their submodules would not make it cheaper: any
        torchmetrics module first runs the package `__init__`, which imports scipy.signal and
        `torchmetrics.functional` (the audio package), and matplotlib.pyplot when installed."""
        if self._metrics is None:
            self._metrics = self._build(self.names, self.task, self.num_classes, self.device)
            self._metrics |= {k: own_copy(m).to(self.device) for k, m in self.supplied.items()}
        return self._metrics

    @staticmethod
    def _build(names: list[str], task: str, num_classes: int, device: torch.device) -> dict:
        import torchmetrics

        kw = {"sync_on_compute": False}
        if task == "multiclass":
            kw |= {"task": "multiclass", "num_classes": num_classes}
        elif task == "binary":
            kw |= {"task": "binary"}
        makers = {
            "accuracy": lambda: torchmetrics.Accuracy(**kw),
            "precision": lambda: torchmetrics.Precision(**_avg(kw)),
            "recall": lambda: torchmetrics.Recall(**_avg(kw)),
            "f1": lambda: torchmetrics.F1Score(**_avg(kw)),
            "auroc": lambda: torchmetrics.AUROC(**kw),
            "confusion_matrix": lambda: torchmetrics.ConfusionMatrix(**kw),
            "mse": lambda: torchmetrics.MeanSquaredError(sync_on_compute=False),
            "mae": lambda: torchmetrics.MeanAbsoluteError(sync_on_compute=False),
            "r2": lambda: torchmetrics.R2Score(sync_on_compute=False),
        }
        return {name: makers[name]().to(device) for name in names}

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
    return kw | {"average": "macro"} if kw.get("task") == "multiclass" else kw
