"""Sharded evaluation with exact metrics: N rows counted exactly N times on any world size."""

from __future__ import annotations

import torch

from .build import Head
from .metrics import MetricSet


def gathered_outputs(model, loader, accelerator):
    """Yield (outputs, targets, row indices) batches gathered from every rank in dataset order.

    Collective: every rank iterates the same number of batches. `gather_for_metrics` drops the
    duplicates the sampler added to even out the last batch, so the union is exactly the rows.
    """
    net = accelerator.unwrap_model(model)  # the bare module: no DDP buffer broadcast in eval
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for x, y, idx in loader:
                out = net(x)
                yield accelerator.gather_for_metrics((out, y, idx))
    finally:
        net.train(was_training)


def evaluate(model, loader, head: Head, metrics: MetricSet | None, accelerator) -> dict:
    """`valid/loss` averaged over samples (not batches) plus every metric; equal on all ranks."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for out, y, _ in gathered_outputs(model, loader, accelerator):
        loss_sum += head.loss_fn(out.float(), y, reduction="sum").double()
        count += len(y)
        if metrics is not None:
            metrics.update(head.scores(out), y)
    result: dict = {"valid/loss": float(loss_sum) / max(count, 1), "valid/rows": count}
    if metrics is not None:
        result |= {f"valid/{k}": v for k, v in metrics.compute().items()}
    return result
