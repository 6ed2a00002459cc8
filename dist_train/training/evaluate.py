"""Sharded evaluation with exact metrics: N rows counted exactly N times on any world size."""

from __future__ import annotations

import torch

from dist_train.build import Head
from dist_train.data.loaders import fast_batches
from dist_train.training.metrics import MetricSet

# Rows buffered between loss/metric updates. The sums behind every metric (counts, confusion
# matrix, squared errors, AUROC's stored scores) do not depend on how rows are grouped, so
# updating once per chunk gives the same result as per batch while paying torchmetrics'
# input validation (~100 us) and the softmax launch once per chunk instead of once per batch.
CHUNK_ROWS = 16_384


def gathered_outputs(model, loader, accelerator):
    """Yield (outputs, targets, row indices) for every row exactly once, gathered from every
    rank, in dataset order.

    On N processes the sampler evens out the last round by repeating rows from the start
    (every rank must run the same number of batches for the gather); the gathered rounds are
    consecutive runs of the dataset, so those repeats are exactly what comes after the
    dataset's length, and are cut there (what `gather_for_metrics` does, without depending on
    the DataLoaderShard iterator, which in-memory tables bypass).
    """
    net = accelerator.unwrap_model(model)  # the bare module: no DDP buffer broadcast in eval
    rows_left = len(loader.dataset)
    batches = fast_batches(loader)  # in-memory rows: sliced directly, no per-batch machinery
    multi = accelerator.num_processes > 1
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for x, y, idx in loader if batches is None else batches:
                out = net(x)
                if multi:  # collective: same batch count and batch size on every rank
                    out, y, idx = accelerator.gather((out, y, idx))
                if len(y) > rows_left:  # the last round's padding (see above)
                    out, y, idx = out[:rows_left], y[:rows_left], idx[:rows_left]
                rows_left -= len(y)
                if len(y):
                    yield out, y, idx
    finally:
        net.train(was_training)


def evaluate(
    model,
    loader,
    head: Head,
    metrics: MetricSet | None,
    accelerator,
    chunk_rows=CHUNK_ROWS,
    prefix: str = "valid",
) -> dict:
    """`valid/loss` averaged over samples (not batches) plus every metric; equal on all ranks
    (each rank updates identical metric objects from the same gathered rows). `prefix`:
    `test` for the held-out test split."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count, outs, ys = 0, [], []

    def update() -> None:
        nonlocal loss_sum
        out, y = torch.cat(outs), torch.cat(ys)
        outs.clear(), ys.clear()
        # per-row losses summed in float64: the mean over 10^6 rows keeps its digits
        loss_sum += head.loss_fn(out.float(), y, reduction="none").double().sum()
        if metrics is not None:
            metrics.update(head.scores(out), y)

    # Metric states are created at their first update; all of them live in inference mode
    # (an in-place update of an inference tensor outside it is an error).
    with torch.inference_mode():
        buffered = 0
        for out, y, _ in gathered_outputs(model, loader, accelerator):
            outs.append(out), ys.append(y)
            count, buffered = count + len(y), buffered + len(y)
            if buffered >= chunk_rows:
                update()
                buffered = 0
        if outs:
            update()
        result: dict = {f"{prefix}/loss": float(loss_sum) / max(count, 1), f"{prefix}/rows": count}
        if metrics is not None:
            result |= {f"{prefix}/{k}": v for k, v in metrics.compute().items()}
    return result
