"""Lazy-path fetch throughput: rows/s of shuffled batches fetched by `ArrowRows` (a parquet
file through its one-time Arrow cache, a datasets `disk:` directory) against slicing the same
rows from memory (the memory path's `TensorRows`) and against pyarrow.dataset's own `take` on
the parquet file (why parquet goes through the cache), in one process, no workers.

    python benchmarks/lazy_fetch.py [--rows 200000] [--features 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=500, help="batches timed per case")
    args = ap.parse_args()
    import datasets
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from dist_train.data.arrow import ArrowRows, arrow_cache

    datasets.disable_progress_bars()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features)).astype(np.float32)
    names = [f"f{i}" for i in range(args.features)]
    table = pa.table({n: x[:, i] for i, n in enumerate(names)})
    order = torch.randperm(args.rows, generator=torch.Generator().manual_seed(0)).numpy()
    batches = [order[i : i + args.batch] for i in range(0, args.batch * args.batches, args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pq.write_table(table, root / "big.parquet")  # pyarrow's default row groups (1M rows)
        datasets.Dataset(table).save_to_disk(str(root / "disk"))
        disk = [str(p) for p in sorted((root / "disk").glob("*.arrow"))]
        cfg = SimpleNamespace(cache_dir=str(root / "cache"))
        start = time.perf_counter()
        cached = arrow_cache("parquet", str(root / "big.parquet"), cfg, "data.source")
        print(f"parquet -> Arrow cache, once: {time.perf_counter() - start:.2f} s")
        dataset = pads.dataset(str(root / "big.parquet"))
        cases = {
            "memory (TensorRows slice)": None,
            "lazy parquet (Arrow cache)": ArrowRows([cached], names, args.rows).fetch,
            "lazy disk: (datasets' Arrow files)": ArrowRows(disk, names, args.rows).fetch,
            "pyarrow.dataset take on the parquet": lambda ids: dataset.take(pa.array(ids)),
        }
        xt = torch.from_numpy(x)
        for name, fetch in cases.items():
            fetch = fetch or (lambda ids: xt[torch.from_numpy(ids)])
            fetch(batches[0])  # open files, warm the page cache
            n = len(batches) if "pyarrow" not in name else 10  # ~0.3 s a batch
            start = time.perf_counter()
            for ids in batches[:n]:
                fetch(ids)
            dt = time.perf_counter() - start
            print(f"{name:36s} {n * args.batch / dt:12,.0f} rows/s")


if __name__ == "__main__":
    main()
