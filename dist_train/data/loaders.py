"""In-memory tables -> whole batches, in exactly the order accelerate's prepared loader gives.

A table that fits in memory is two tensors; a batch is one indexing op (`__getitems__`), not
per-row access + collation (5-100x faster), and the DataLoader stays a standard one, so
accelerate still shards it, seeds its sampler and evens out the last round for the gather.
"""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, Sampler, SequentialSampler

from dist_train.data.balance import BalancedSampler
from dist_train.data.rows import LazyRows, LazyTable, Workers
from dist_train.data.sources import Table


class TensorRows(torch.utils.data.Dataset):
    """Rows held as tensors; `__getitems__` lets DataLoader fetch a whole batch in one op."""

    def __init__(self, table: Table) -> None:
        self.x, self.y = table.x, table.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i], torch.tensor(i)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """(features, targets, row indices): the indices let predict keep the input order and
        the sample audit record exactly which rows each step trained on."""
        idx = torch.as_tensor(indices)
        if self.x.device.type != "cpu":  # rows live on the accelerator: ship only the indices
            idx = idx.pin_memory().to(self.x.device, non_blocking=True)  # async, no host sync
        return self.x[idx], self.y[idx], idx

    def place(self, device: torch.device, budget: float = 0.25) -> None:
        """Accelerator only: move the rows to `device` once when they take at most `budget` of
        its free memory (batches are then sliced there, no host-to-device copy per step);
        otherwise `fast_batches` copies each batch through pinned memory, asynchronously."""
        if device.type != "cuda" or self.x.device == device:
            return
        free, _ = torch.cuda.mem_get_info(device)
        if self.x.nbytes + self.y.nbytes <= budget * free:
            self.x, self.y = self.x.to(device), self.y.to(device)


def fast_batches(loader, skip: int = 0):
    """Batches of an accelerate-prepared training loader over `TensorRows`, sliced straight
    from the tensors; None for any other loader (iterate the loader itself then).

    The index lists come from the loader's own batch sampler: accelerate's shard of it on N
    processes and the seedable sampler keyed on (seed, epoch) (the caller's `set_epoch`
    applies), so the rows, their order and the sharding are exactly those of iterating the
    loader. What it leaves out is per-batch machinery this data does not need: DataLoader's
    iterator and fetcher, DataLoaderShard's one-batch prefetch, `send_to_device` and state
    bookkeeping (~40 us per batch here, 4% of an MLP step at batch 64). `skip` drops the first
    batches (mid-epoch resume) without reading their rows."""
    from accelerate.data_loader import DataLoaderShard

    if not isinstance(loader, DataLoaderShard) or loader.rng_types:  # rng_types: synced per epoch
        return None
    dataset, sampler = loader.dataset, loader.batch_sampler
    if type(dataset) is not TensorRows or sampler is None or loader.collate_fn is not whole_batch:
        return None
    device = getattr(loader, "device", None) or torch.device("cpu")
    dataset.place(device)
    return _slices(dataset, sampler, skip, device)


def _slices(dataset: TensorRows, sampler, skip: int, device: torch.device):
    copy = device.type != "cpu" and dataset.x.device != device  # rows on the host only
    for i, indices in enumerate(index_batches(sampler)):
        if i < skip:
            continue
        x, y, idx = dataset.__getitems__(indices)
        if copy:  # pinned staging buffer -> async copy (the caching allocator keeps it alive)
            x, y, idx = (t.pin_memory().to(device, non_blocking=True) for t in (x, y, idx))
        yield x, y, idx


def index_batches(batch_sampler):
    """The batch sampler's index batches, as tensors.

    One process (a plain BatchSampler over the sequential or accelerate's seedable sampler):
    the order is `torch.randperm(n)` from a generator seeded with (seed + epoch), exactly what
    the seedable sampler draws, so the batches are slices of that one tensor, without building
    a Python list of ints per batch and converting it back (~30 us per batch). Any other
    sampler (accelerate's shard of it on N processes) is iterated as it is."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = getattr(batch_sampler, "sampler", None)
    if type(batch_sampler) is not BatchSampler or type(sampler) not in (
        SequentialSampler,
        SeedableRandomSampler,
        BalancedSampler,
    ):
        yield from batch_sampler
        return
    n, bs = len(sampler), batch_sampler.batch_size
    if type(sampler) is SequentialSampler:
        order = torch.arange(n)
    elif type(sampler) is BalancedSampler:  # its own (seed, epoch) draw, as its __iter__
        order = sampler.order()
    else:
        if sampler.replacement or n != len(sampler.data_source):
            yield from batch_sampler
            return
        seed = sampler.epoch + sampler.initial_seed  # as SeedableRandomSampler.__iter__
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    stop = n - n % bs if batch_sampler.drop_last else n
    for start in range(0, stop, bs):
        yield order[start : start + bs]
    if type(sampler) is SeedableRandomSampler:
        sampler.set_epoch(sampler.epoch + 1)  # as its __iter__ does once exhausted


class ShuffledRows(Sampler[int]):
    """The lazy path's shuffle: exactly accelerate's SeedableRandomSampler order for the same
    seed (`torch.randperm(n)` from a generator seeded with seed + epoch), handed out in 64k
    chunks instead of one Python list of all n row ids (RandomSampler's `.tolist()`: ~36
    bytes per row, 190 MiB per process for 5.2M rows, the bulk of what a lazy table's memory
    grew by with its row count); 4 bytes per row remain, the permutation as int32 (torch draws
    the same permutation for either integer type: tested against the sampler).

    A sampler of its own, so accelerate does not swap it for its seedable one; like that one,
    and like `BalancedSampler`, it follows `set_epoch` and is cut into per-rank batches by
    accelerate's BatchSamplerShard, so 1 and N processes and a mid-epoch resume see the
    memory path's rows in its order (tested bitwise against it)."""

    CHUNK = 1 << 16

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.dtype = torch.int32 if n < 2**31 else torch.int64

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen, dtype=self.dtype)
        for chunk in order.split(self.CHUNK):
            yield from chunk.tolist()
        self.epoch += 1  # as SeedableRandomSampler once exhausted (set_epoch overrides it)


def whole_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Identity collate: `__getitems__` already returns the stacked batch."""
    return batch


def make_loader(
    table: Table | LazyTable,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    balanced: bool = False,
    workers: Workers | None = None,
):
    """`balanced` (training, `data.sampler: balanced`): rows drawn by `BalancedSampler`, which
    accelerate shards like the seedable shuffle (a sampler it does not replace).

    A `LazyTable` gets the same order (`ShuffledRows`: accelerate's seedable permutation,
    without its list of every row id) and batching over `LazyRows`: the DataLoader hands each
    worker one batch's index list and the worker fetches it with `__getitems__`, so the rows
    and their order are those of the memory path; `workers` sets the worker pool."""
    if not isinstance(table, Table | LazyTable):  # a stream (data/stream.py) has no row access
        from dist_train.errors import UserError

        raise UserError(
            "this command reads rows by index; data.mode stream trains only (set data.mode "
            "lazy or memory for it)."
        )
    lazy = isinstance(table, LazyTable)
    sampler = None
    if balanced:
        sampler = BalancedSampler(table.y, seed)
    elif lazy and shuffle:
        sampler = ShuffledRows(len(table), seed)
    extra = (workers or Workers()).loader_kwargs() if lazy else {}
    # An own generator: DataLoader otherwise draws its worker base seed from the GLOBAL RNG
    # each time an epoch's iterator is created, shifting dropout masks after a mid-epoch resume.
    return torch.utils.data.DataLoader(
        LazyRows(table) if lazy else TensorRows(table),
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=whole_batch,
        generator=torch.Generator().manual_seed(seed),
        **extra,
    )
