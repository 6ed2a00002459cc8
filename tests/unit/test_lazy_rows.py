"""The lazy-table interface (data/rows.py): batches fetched by source row id, in the memory
path's order, with DataLoader workers."""

import numpy as np
import torch

from dist_train.data.loaders import make_loader
from dist_train.data.rows import LazyTable, Workers
from dist_train.data.sources import Table


class ArraySource:
    """A RowSource over an array (picklable, as the worker processes need)."""

    input_shape = (3,)
    dtype = torch.float32

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def fetch(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.x[np.asarray(ids)])


def test_lazy_loader_gives_the_memory_loaders_batches_with_workers():
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    ids = np.array([5, 3, 19, 0, 7, 11, 2, 14, 9, 1, 4], dtype=np.int64)  # a split's rows
    y = torch.arange(len(ids))
    lazy = LazyTable(ArraySource(x), ids, y)
    memory = Table(torch.from_numpy(x[ids]), y)
    assert torch.equal(lazy.head(2), memory.head(2)) and len(lazy) == len(memory) == 11
    workers = Workers(num_workers=2, persistent_workers=True, prefetch_factor=2)
    got = list(make_loader(lazy, 4, True, True, seed=3, workers=workers))
    want = list(make_loader(memory, 4, True, True, seed=3))
    assert len(got) == len(want) == 2
    for (gx, gy, gi), (wx, wy, wi) in zip(got, want, strict=True):
        assert torch.equal(gx, wx) and torch.equal(gy, wy) and torch.equal(gi, wi)
