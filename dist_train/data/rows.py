"""Lazy tables: rows fetched from their files when a batch asks for them, not loaded up front.

The memory path (`sources.Table`: two tensors) and the lazy path share everything that decides
*which* rows a step trains on: the split, the targets and the seedable per-epoch permutation.
Only the fetch differs. A `LazyTable` keeps the targets of its split in memory (one small
column: class weights, the balanced sampler and the class list work unchanged) and the source
row ids of its rows; `LazyRows.__getitems__` fetches one whole batch of features from the
`RowSource`, inside a DataLoader worker when `data.num_workers > 0`.

A `RowSource` is pickled into every worker process, so it holds only paths and column names
and opens its files (memory maps, Arrow datasets) lazily, once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class RowSource(Protocol):
    """Random access to the feature rows of one source, by source row id (map-style).

    `fetch(ids)` returns the features of those rows, in that order, as one tensor
    [len(ids), *input_shape] of `dtype` (float32 for tables; uint8 CHW for decoded images,
    converted on the device). Must be picklable without open file handles."""

    input_shape: tuple[int, ...]
    dtype: torch.dtype

    def __len__(self) -> int: ...

    def fetch(self, ids: np.ndarray) -> torch.Tensor: ...


@dataclass
class LazyTable:
    """One split of a lazy source: source row ids (after the split and any class filter) and
    their targets, in memory; features come from `source` on demand."""

    source: RowSource
    ids: np.ndarray  # int32 (int64 past 2^31 rows) [N]: source row id of split row i
    y: torch.Tensor  # as sources.Table.y, for the same N rows
    rows: np.ndarray | None = None  # as sources.Table: eval/predict --data file row numbers
    note: str | None = None  # as sources.Table: what the column encoders counted (printed)

    def __post_init__(self) -> None:
        # 4 bytes a row, not 8 (under 2^31 source rows): with its target and its place in the
        # epoch's permutation, what a lazy table holds per row; a fetch widens a batch's ids.
        if self.ids.dtype != np.int32 and (len(self.ids) == 0 or int(self.ids.max()) < 2**31):
            self.ids = self.ids.astype(np.int32)

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> torch.Tensor:
        """Features of the first `n` rows (probes: DDP's unused-parameter check, FLOPs)."""
        return self.source.fetch(self.ids[:n])

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype


class LazyRows(torch.utils.data.Dataset):
    """`__getitems__` fetches a whole batch from the source: (features, targets, row indices),
    exactly what `loaders.TensorRows` returns, so the trainer, the sample audit and predict's
    input order are the same on both paths (indices are split-local row numbers).

    With `fetch_partners` (mixup/CutMix, data/mix.py) the batch also carries each row's mixing
    partner: (..., partner row indices, their features, their targets), fetched here, in the
    DataLoader worker, instead of by the training process at every step (for an image folder:
    a second batch of JPEGs decoded on the critical path). The partners depend on the epoch,
    which the training process writes into a shared-memory scalar before each epoch's
    iterator starts (`set_epoch`); a worker reads it per batch."""

    def __init__(self, table: LazyTable) -> None:
        self.source, self.ids, self.y = table.source, table.ids, table.y
        self.partners = None  # epoch -> partner row index of every row (set by the mixer)
        self._epoch: torch.Tensor | None = None
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, partners) last drawn

    def __len__(self) -> int:
        return len(self.y)

    def fetch_partners(self, partners) -> None:
        """Batches carry mixing partners from now on; `partners(epoch)` -> int array [N]."""
        self.partners = partners
        # Shared memory: created before the workers fork (or are spawned), so a worker and
        # the training process see the same scalar.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before an epoch's iterator starts: its workers are idle then
        (DataLoader resumes them after this), so every batch of the epoch reads `epoch`."""
        if self._epoch is not None:
            self._epoch.fill_(epoch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.source.fetch(self.ids[i : i + 1])[0], self.y[i], torch.tensor(i)

    def __getitems__(self, indices) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        batch = (self.source.fetch(self.ids[idx.numpy()]), self.y[idx], idx)
        if self.partners is None:
            return batch
        epoch = int(self._epoch)
        if self._order is None or self._order[0] != epoch:  # once per epoch and process
            self._order = (epoch, np.asarray(self.partners(epoch)))
        partner = torch.from_numpy(self._order[1][idx.numpy()])
        return *batch, partner, self.source.fetch(self.ids[partner.numpy()]), self.y[partner]


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1/Ctrl-C to the training process: SLURM and
    torchrun signal every process of the job, and a worker dying of it would abort the epoch
    with "DataLoader worker killed" before the training process could save and exit 75. A
    worker still ends with its training process (DataLoader's parent watchdog)."""
    import signal

    from dist_train.training.signals import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing terminates its daemonic children with SIGTERM, then
    joins them without a timeout; DataLoader workers ignore SIGTERM (above), so a worker whose
    loader is still alive then (a persistent pool, a half-read iterator in a notebook or test
    process) would hang the exit forever. This runs first (atexit is last-in, first-out) and
    kills them, which is what the SIGTERM was for."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_exit_hook: list[bool] = []  # kill_workers_at_exit registered in this process


@dataclass(frozen=True)
class Workers:
    """DataLoader worker settings of the lazy path (`data.num_workers` & co., resolved)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None

    def loader_kwargs(self) -> dict:
        """DataLoader keyword arguments; the worker-only ones only when there are workers
        (DataLoader refuses prefetch_factor / persistent_workers with num_workers 0)."""
        kwargs: dict = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            if not _exit_hook:  # once per process, after multiprocessing's own exit hook
                import atexit

                atexit.register(kill_workers_at_exit)
                _exit_hook.append(True)
            kwargs["persistent_workers"] = self.persistent_workers
            kwargs["prefetch_factor"] = self.prefetch_factor
            kwargs["worker_init_fn"] = ignore_stop_signals
        return kwargs

    def describe(self) -> str:
        if self.num_workers == 0:
            return "0 workers (fetch in the training process)"
        return (
            f"{self.num_workers} workers/process, prefetch {self.prefetch_factor}, "
            f"pin_memory {'on' if self.pin_memory else 'off'}, "
            f"persistent {'on' if self.persistent_workers else 'off'}"
        )
