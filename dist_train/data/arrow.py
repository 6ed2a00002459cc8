"""Arrow-backed row sources of the lazy path: parquet files/shard directories/globs, `disk:`
(datasets' own memory-mapped Arrow files) and the one-time Arrow cache of csv/json files.

`ArrowRows.fetch(ids)` is an Arrow `take` of the feature columns, converted column by column
into one float32 array: the only copy is the batch itself. Each process (training process or
DataLoader worker) opens the files itself on first use; nothing open is pickled.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dist_train.errors import UserError

GLOB_CHARS = "*?["


def parquet_files(loc: str, key: str) -> list[str]:
    """A parquet file, every `*.parquet` under a directory (recursively), or a glob's matches;
    sorted, so every process (and the memory path) numbers the rows the same way."""
    path = Path(loc)
    if path.is_file():
        return [loc]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise UserError(
                f"{key} `parquet:{loc}`: the directory holds no *.parquet files; point it at "
                "a directory of parquet shards, one file, or a glob such as data/*.parquet."
            )
        return files
    if any(c in loc for c in GLOB_CHARS):
        files = sorted(f for f in glob.glob(loc, recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(
                f"{key} `parquet:{loc}`: the glob matches no files; check the pattern "
                "(relative paths are from the current directory)."
            )
        return files
    raise UserError(
        f"{key} `parquet:{loc}`: file {loc} not found; check the path (a file, a directory "
        "of shards or a glob; relative paths are from the current directory)."
    )


def read_parquet(files: list[str]):
    """The memory path's read of one or more parquet files, concatenated in `files` order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) for f in files]
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    # Decoding buffers are freed but kept by arrow's allocator: hand them back to the OS
    # (~50 MiB per 25 MiB of table here) rather than carry them all run.
    pa.default_memory_pool().release_unused()
    return table


def disk_files(loc: str, split: str, key: str) -> list[str]:
    """The Arrow files behind a `datasets.save_to_disk` directory (memory-mapped by datasets
    itself); save_to_disk writes the rows flattened, in order, so row i is row i of the files."""
    from dist_train.data.sources import _from_disk

    ds = _from_disk(loc, split, key)
    files = [f["filename"] for f in ds.cache_files]
    if not files or ds._indices is not None:  # an in-memory or index-mapped dataset
        raise UserError(
            f"{key} `disk:{loc}`: not a flat save_to_disk directory (no Arrow files); "
            "use data.mode memory for it."
        )
    return files


def cache_root(cfg) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dist_train"


def arrow_cache(kind: str, loc: str, cfg, key: str) -> str:
    """csv/json -> one Arrow stream file, written once (the caller runs this on the main process
    first, inside `main_process_first`; the others then find it). Keyed on the file's absolute
    path, size and mtime, so an edited file gets a new cache and an unchanged one is reused.
    Parsed by `datasets`, the memory path's reader, so both paths see the same values."""
    from dist_train.data.sources import load_source

    if not Path(loc).is_file():
        load_source(f"{kind}:{loc}", cfg, key)  # raises the memory path's "not found" error
    st = os.stat(loc)
    ident = f"{kind}|{os.path.abspath(loc)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = cache_root(cfg)
    out = root / f"{Path(loc).stem}-{digest}.arrow"
    if out.is_file():
        return str(out)
    root.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa

    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(kind, data_files=loc, split="train", cache_dir=str(work))
        except Exception:
            ds = None
        if ds is None or ds.num_rows == 0:
            load_source(f"{kind}:{loc}", cfg, key)  # the memory path's one-paragraph error
            raise UserError(f"{key} `{kind}:{loc}`: no rows; add data rows.")
        tmp = work / "rows.arrow"
        table = ds.data.table
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=65536):
                w.write_batch(batch)
        del ds, table
        os.replace(tmp, out)  # atomic: a reader never sees a half-written cache
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(out)


def open_arrow(files: list[str]):
    """Arrow stream files (datasets' and our cache's format) as one memory-mapped table."""
    import pyarrow as pa

    tables = [pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


class ArrowRows:
    """A `rows.RowSource` over parquet files (`fmt` "parquet", read through pyarrow.dataset) or
    Arrow stream files ("arrow", memory-mapped): float32 features of `columns`, reshaped to
    `shape` when given."""

    dtype = torch.float32

    def __init__(
        self, files: list[str], fmt: str, columns: list[str], num_rows: int, shape=None
    ) -> None:
        self.files, self.fmt, self.columns, self.num_rows = files, fmt, columns, num_rows
        self.input_shape = tuple(shape) if shape else (len(columns),)
        self._data = None
        self._pid = None

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict:
        # Workers reopen the files themselves: open Arrow objects are not shipped.
        return {**self.__dict__, "_data": None, "_pid": None}

    def _open(self):
        # Reopened after a fork too: Arrow's file handles and thread pools are per process.
        if self._data is None or self._pid != os.getpid():
            if self.fmt == "parquet":
                import pyarrow.dataset as pads

                self._data = pads.dataset(self.files, format="parquet")
            else:
                self._data = open_arrow(self.files).select(self.columns)
            self._pid = os.getpid()
        return self._data

    def table(self, columns: list[str]):
        """Whole columns (the targets: one small column), without the features."""
        data = self._open()
        if self.fmt == "parquet":
            return data.to_table(columns=columns)
        return open_arrow(self.files).select(columns)

    def fetch(self, ids: np.ndarray) -> torch.Tensor:
        import pyarrow as pa

        ids = np.asarray(ids, dtype=np.int64)
        data = self._open()
        index = pa.array(ids)
        rows = data.take(index, columns=self.columns) if self.fmt == "parquet" else data.take(index)
        out = np.empty((len(ids), len(self.columns)), dtype=np.float32)
        for j, name in enumerate(self.columns):  # column by column: one copy, the batch
            out[:, j] = rows.column(name).to_numpy()
        if np.isnan(out).any():
            row, col = (int(v) for v in np.argwhere(np.isnan(out))[0])
            raise UserError(
                f"data: feature `{self.columns[col]}` is missing/NaN in row {int(ids[row])} "
                "of the source; clean the file or drop the column from data.features."
            )
        x = torch.from_numpy(out)
        return x.reshape(-1, *self.input_shape) if len(self.input_shape) > 1 else x
