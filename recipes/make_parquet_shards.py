"""Write a table too large to want in memory as a directory of parquet shards:

  python recipes/make_parquet_shards.py                 # data/shards/part-0000{0..7}.parquet
  python recipes/make_parquet_shards.py --rows 2000000 --shards 40 --out data/shards-2m

200,000 rows by default: 32 float32 features (scikit-learn's `make_classification`: 12
informative, 8 redundant, 4 classes, 2 clusters each, 2% of the labels flipped) and an int64
`label`, in 8 shards written with 16k-row row groups. The rows are drawn by a seeded generator,
so the output is the same on every machine (nothing is downloaded); `data/` is git-ignored.
recipes/parquet_shards_lazy.yaml trains on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_shards(out: Path, rows: int = 200_000, shards: int = 8, seed: int = 0) -> int:
    """Write `rows` rows into `shards` parquet files under `out`; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=32,
        n_informative=12,
        n_redundant=8,
        n_classes=4,
        n_clusters_per_class=2,
        flip_y=0.02,
        class_sep=1.0,
        random_state=seed,
    )
    x = x.astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):  # a rerun with fewer shards leaves no stale one
        old.unlink()
    names = [f"f{i:02d}" for i in range(x.shape[1])]
    for k, part in enumerate(np.array_split(np.arange(rows), shards)):
        table = pa.table({**{n: x[part, i] for i, n in enumerate(names)}, "label": y[part]})
        pq.write_table(table, out / f"part-{k:05d}.parquet", row_group_size=16_384)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shards", help="output directory")
    parser.add_argument("--rows", type=int, default=200_000, help="rows in all")
    parser.add_argument("--shards", type=int, default=8, help="parquet files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = write_shards(Path(args.out), args.rows, args.shards, args.seed)
    print(f"wrote {n} rows in {args.shards} shards to {args.out}/")


if __name__ == "__main__":
    main()
