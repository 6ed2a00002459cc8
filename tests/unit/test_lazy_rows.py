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
    """Both prepared by accelerate as training prepares them (its seedable sampler for the
    memory table, `ShuffledRows` for the lazy one), over two epochs and a resume skip."""
    from accelerate import Accelerator, DataLoaderConfiguration

    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=3)
    )
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    ids = np.array([5, 3, 19, 0, 7, 11, 2, 14, 9, 1, 4], dtype=np.int64)  # a split's rows
    y = torch.arange(len(ids))
    lazy = LazyTable(ArraySource(x), ids, y)
    memory = Table(torch.from_numpy(x[ids]), y)
    assert torch.equal(lazy.head(2), memory.head(2)) and len(lazy) == len(memory) == 11
    workers = Workers(num_workers=2, persistent_workers=True, prefetch_factor=2)
    lazy_dl = acc.prepare(make_loader(lazy, 4, True, True, seed=3, workers=workers))
    memory_dl = acc.prepare(make_loader(memory, 4, True, True, seed=3))
    seen = []
    for epoch in (0, 1):
        lazy_dl.set_epoch(epoch)
        memory_dl.set_epoch(epoch)
        got, want = list(lazy_dl), list(memory_dl)
        assert len(got) == len(want) == 2
        for (gx, gy, gi), (wx, wy, wi) in zip(got, want, strict=True):
            assert torch.equal(gx, wx) and torch.equal(gy, wy) and torch.equal(gi, wi)
        seen.append(torch.cat([gi for _, _, gi in got]))
    assert not torch.equal(seen[0], seen[1])  # each epoch its own order
    skipped = acc.skip_first_batches(lazy_dl, 1)
    skipped.set_epoch(1)
    (rest,) = list(skipped)
    assert torch.equal(rest[2], seen[1][4:])


EXIT_WITH_LIVE_WORKERS = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_lazy_rows import ArraySource
from dist_train.data.loaders import make_loader
from dist_train.data.rows import LazyTable, Workers
x = np.arange(60, dtype=np.float32).reshape(20, 3)
table = LazyTable(ArraySource(x), np.arange(20), torch.arange(20))
loader = make_loader(table, 4, True, True, workers=Workers(1, persistent_workers=True,
                                                           prefetch_factor=2))
it = iter(loader)
next(it)  # a half-read iterator and its worker, alive at interpreter exit
print("read one batch", flush=True)
"""


def test_a_live_worker_pool_does_not_hang_the_interpreter_exit(tmp_path):
    """Workers ignore SIGTERM (stop signals are the training process's), so multiprocessing's
    exit hook (SIGTERM, then join without a timeout) would wait forever for a worker whose
    loader is still alive; rows.kill_workers_at_exit kills them first."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "exit.py"
    script.write_text(EXIT_WITH_LIVE_WORKERS)
    here = str(Path(__file__).resolve().parent)
    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run(
        [sys.executable, str(script), here],
        capture_output=True,
        text=True,
        timeout=60,  # a hang is a TimeoutExpired here, not a stuck suite
        env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0 and "read one batch" in r.stdout, r.stderr[-2000:]


def test_shuffled_rows_is_the_seedable_samplers_order_without_its_list(monkeypatch):
    """The lazy path's sampler hands out accelerate's seedable permutation for (seed, epoch),
    in chunks (here 7 rows: chunk borders anywhere), follows set_epoch, and advances the epoch
    once exhausted exactly as SeedableRandomSampler does."""
    from accelerate.data_loader import SeedableRandomSampler

    from dist_train.data.loaders import ShuffledRows

    monkeypatch.setattr(ShuffledRows, "CHUNK", 7)
    n, seed = 103, 11
    ours, theirs = ShuffledRows(n, seed), SeedableRandomSampler(range(n), data_seed=seed)
    for epoch in (0, 3):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        got, want = list(ours), list(theirs)
        assert got == want and sorted(got) == list(range(n))
        assert list(ours) == list(theirs) != want  # both moved on to epoch + 1
    assert len(ours) == n
    big = ShuffledRows(200_003, seed)  # int32 draws: the int64 permutation, at any size
    assert list(big) == list(SeedableRandomSampler(range(200_003), data_seed=seed))
