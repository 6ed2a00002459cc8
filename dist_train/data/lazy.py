"""`data.mode`: which path loads a source (memory or lazy), and the lazy path's bundle.

The lazy bundle is built from the target column alone: the same target encoding and the same
seeded split as the memory path decide which source rows form each split and in what order,
so row i of the lazy training table is row i of the memory one (same weights, bitwise).
Standardisation statistics come from one pass over the training rows in chunks (float64
accumulation), never the whole table at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_train.config.schema import DataConfig
from dist_train.data.rows import LazyTable, RowSource, Workers
from dist_train.errors import UserError

LAZY_KINDS = ("parquet", "disk", "csv", "json")
STATS_CHUNK = 65536  # rows per fetch of the statistics pass


@dataclass
class Mode:
    mode: str  # "memory" or "lazy"
    why: str  # the plan line's reason


def choose_mode(cfg: DataConfig) -> Mode:
    """memory or lazy for this recipe; `auto` compares an estimate made from metadata only
    (parquet footers, Arrow schemas, file sizes) with the memory budget."""
    kind = cfg.source.partition(":")[0]
    if cfg.mode == "memory":
        return Mode("memory", "data.mode memory")
    reason = _lazy_unsupported(cfg, kind)
    if cfg.mode == "lazy":
        if reason:
            raise UserError(f"data.mode lazy: {reason}; use data.mode memory (or auto).")
        return Mode("lazy", "data.mode lazy")
    if reason:
        return Mode("memory", f"auto: {reason}")
    try:
        est = estimate_bytes(cfg, kind)
    except UserError:
        raise
    except Exception:  # unreadable metadata: the memory path's reader words the parse error
        return Mode("memory", f"auto: cannot estimate the size of {cfg.source}")
    budget = memory_budget(cfg)
    sign = "<=" if est <= budget else ">"
    why = f"auto: estimated {_gib(est)} {sign} budget {_gib(budget)} per process"
    return Mode("memory" if est <= budget else "lazy", why)


def _lazy_unsupported(cfg: DataConfig, kind: str) -> str | None:
    if kind == "imagefolder":  # data/images.py: files decoded per batch in the workers
        return None
    if kind not in LAZY_KINDS:
        return f"{kind}: sources are read into memory (lazy: {', '.join(LAZY_KINDS)})"
    if cfg.valid_source and cfg.valid_source.partition(":")[0] not in LAZY_KINDS:
        return f"data.valid_source {cfg.valid_source} cannot be read lazily"
    if cfg.text is not None:
        return "data.text (token rows) is tokenized in memory"
    if cfg.task == "multilabel":
        return "multilabel targets are read in memory"
    # The column encoders (data/columns.py) and the held-out test split are fitted and applied
    # on the memory path only, so far.
    if cfg.categorical or cfg.missing != "error":
        return "data.categorical / data.missing encode columns in memory"
    if cfg.test_source or cfg.test_fraction:
        return "data.test_source / data.test_fraction are read in memory"
    return None


def memory_budget(cfg: DataConfig) -> float:
    """min(data.memory_budget_gb, 25% of RAM / processes on this node), in bytes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = float("inf")
    return min(cfg.memory_budget_gb * 2**30, 0.25 * ram / max(local, 1))


def estimate_bytes(cfg: DataConfig, kind: str) -> float:
    """rows x features x 4 bytes, without reading rows (csv/json: the file size, which is
    about what their numbers take as float32)."""
    from dist_train.data import arrow

    loc = cfg.source.partition(":")[2]
    if kind == "imagefolder":  # files x C x H x W bytes, as the memory path holds them (uint8)
        from dist_train.data.images import folder_bytes

        return folder_bytes(loc, cfg)
    if kind == "parquet":
        import pyarrow.parquet as pq

        files = arrow.parquet_files(loc, "data.source")
        rows = sum(pq.read_metadata(f).num_rows for f in files)
        names = pq.read_schema(files[0]).names
    elif kind == "disk":
        from dist_train.data.sources import from_disk

        ds = from_disk(loc, cfg.split, f"data.source `{cfg.source}`")
        rows, names = ds.num_rows, ds.column_names
    else:
        return float(os.path.getsize(loc)) if Path(loc).is_file() else 0.0
    return float(rows) * len(_feature_names(cfg, names)) * 4


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**28 else f"{n / 2**20:.3g} MiB"


def _feature_names(cfg: DataConfig, names: list[str]) -> list[str]:
    targets = cfg.target if isinstance(cfg.target, list) else [cfg.target]
    return cfg.features or [c for c in names if c not in targets]


def default_workers(cfg: DataConfig) -> Workers:
    """Cores per process (this process's CPU affinity / processes on the node): one is the
    training process's own, the rest fetch (at most 8); 1 core per process: no workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    per = max((cores or 1) // local, 1)
    n = cfg.num_workers if cfg.num_workers is not None else min(per - 1, 8)
    pin = cfg.pin_memory if cfg.pin_memory is not None else torch.cuda.is_available()
    return Workers(n, pin, cfg.persistent_workers and n > 0, cfg.prefetch_factor if n else None)


def open_rows(source: str, cfg: DataConfig, key: str, feats: list[str] | None):
    """(ArrowRows over `source`, its feature names, all its column names) — files found,
    csv/json cached once."""
    from dist_train.data import arrow

    kind, _, loc = source.partition(":")
    if not loc:
        from dist_train.data.sources import load_source

        load_source(source, cfg, key)  # the memory path's KIND:LOCATION error
    if kind == "parquet":  # each shard copied once into the Arrow cache (arrow.arrow_cache)
        shards = arrow.parquet_files(loc, key)
        files = [arrow.arrow_cache("parquet", f, cfg, key) for f in shards]
    elif kind == "disk":
        files = arrow.disk_files(loc, cfg.split, f"{key} `{source}`")
    else:
        files = [arrow.arrow_cache(kind, loc, cfg, key)]
    table = arrow.open_arrow(files)  # memory-mapped: reads the schema, not the rows
    rows, names = table.num_rows, table.column_names
    if rows == 0:
        raise UserError(f"{key} `{source}`: no rows in {len(files)} file(s); add data rows.")
    feats = feats or _feature_names(cfg, names)
    _check_columns(feats, table.schema, source)
    if cfg.shape and int(np.prod(cfg.shape)) != len(feats):
        raise UserError(
            f"data.shape {cfg.shape} holds {int(np.prod(cfg.shape))} values but rows have "
            f"{len(feats)} features."
        )
    return arrow.ArrowRows(files, feats, rows, cfg.shape), feats, names


def _check_columns(feats: list[str], schema, source: str):
    """Feature columns exist and are numbers/booleans (from the schema: nothing read)."""
    import difflib

    import pyarrow as pa

    names = schema.names
    for name in feats:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise UserError(
                f"column `{name}` not in {source}; {hint}columns: {', '.join(names[:20])}"
            )
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or kind == pa.bool_()):
            raise UserError(
                f"data.features: column `{name}` is not numeric ({kind}) in {source}; the lazy "
                "path reads numbers only: use data.mode memory (which one-hot encodes "
                "categories), or leave it out of data.features."
            )


def load_lazy(cfg: DataConfig, seed: int, why: str):
    """The lazy bundle: targets and split in memory, features left in the files."""
    from dist_train.data.sources import DataBundle, column, encode_targets, split_order

    if cfg.source.startswith("imagefolder:"):
        from dist_train.data.images import lazy_images

        bundle = lazy_images(cfg, seed, default_workers(cfg).num_workers)
        bundle.workers = default_workers(cfg)
        bundle.plan = f"data: lazy ({why}); {bundle.workers.describe()}"
        return bundle
    rows, feats, _ = open_rows(cfg.source, cfg, "data.source", None)
    y_raw = column(rows.table([cfg.target]), cfg.target, cfg.source)
    valid = None
    if cfg.valid_source:
        vrows, _, _ = open_rows(cfg.valid_source, cfg, "data.valid_source", feats)
        vy_raw = column(vrows.table([cfg.target]), cfg.target, cfg.valid_source)
        classes, y_all, keep = encode_targets(y_raw, cfg, vy_raw)
        _, vy, vkeep = encode_targets(vy_raw, cfg, None, classes)
        valid = LazyTable(vrows, np.flatnonzero(vkeep.numpy()).astype(np.int64), vy)
        train = LazyTable(rows, np.flatnonzero(keep.numpy()).astype(np.int64), y_all)
    else:
        classes, y_all, keep = encode_targets(y_raw, cfg, None)
        ids = np.flatnonzero(keep.numpy()).astype(np.int64)
        split_seed = seed if cfg.split_seed is None else cfg.split_seed
        t, v = split_order(len(y_all), cfg.valid_fraction, split_seed)
        if v is None:
            train = LazyTable(rows, ids, y_all)
        else:
            train = LazyTable(rows, ids[t.numpy()], y_all[t])
            valid = LazyTable(rows, ids[v.numpy()], y_all[v])
    norm = standardize_stats(train.source, train.ids) if cfg.standardize else None
    bundle = DataBundle(train, valid, rows.input_shape, classes, feats, norm)
    bundle.workers = default_workers(cfg)
    bundle.plan = f"data: lazy ({why}); {bundle.workers.describe()}"
    return bundle


def load_lazy_table(
    source: str, cfg: DataConfig, classes: list | None, feats: list[str], require_target: bool
) -> tuple[LazyTable, bool]:
    """`sources.load_table` (eval/predict `--data`) on the lazy path: every row of `source`
    in file order (predict writes them in that order), targets encoded with the run's classes;
    a file without the target column is accepted when `require_target` is False."""
    from dist_train.data.sources import column, encode_targets, numeric_target

    if source.startswith("imagefolder:"):
        from dist_train.data.images import lazy_image_table

        return lazy_image_table(source, cfg, classes, require_target)
    rows, _, names = open_rows(source, cfg, "--data", feats)
    every = np.arange(len(rows), dtype=np.int64)
    if not require_target and cfg.target not in names:
        return LazyTable(rows, every, torch.zeros(len(rows), dtype=torch.int64)), False
    y_raw = column(rows.table([cfg.target]), cfg.target, source)
    if cfg.task == "regression":
        y = torch.from_numpy(numeric_target(y_raw, cfg).astype(np.float32))
        return LazyTable(rows, every, y), True
    _, y, keep = encode_targets(y_raw, cfg, None, classes)
    return LazyTable(rows, np.flatnonzero(keep.numpy()).astype(np.int64), y), True


def standardize_stats(source: RowSource, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of the rows `ids`, per feature (per channel for [C, H, W] rows),
    as the memory path's `_fit_standardize`, in one pass over chunks in file order: float64
    running sums merged per chunk (Chan et al.), so the table is never materialised."""
    order = np.sort(ids)
    count, mean, m2 = 0, None, None
    for start in range(0, len(order), STATS_CHUNK):
        x = source.fetch(order[start : start + STATS_CHUNK]).to(torch.float64)
        if x.dim() == 4:  # per channel: every pixel of every row is one sample
            x = x.transpose(0, 1).reshape(x.shape[1], -1).T
        n = x.shape[0]
        cm = x.mean(0)
        cm2 = ((x - cm) ** 2).sum(0)
        if mean is None:
            count, mean, m2 = n, cm, cm2
            continue
        delta, total = cm - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + cm2 + delta**2 * (count * n / total)
        count = total
    std = (m2 / max(count - 1, 1)).sqrt()
    mean, std = mean.to(torch.float32), std.to(torch.float32)
    if len(source.input_shape) == 3:  # as _fit_standardize: [C, 1, 1]
        mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))
