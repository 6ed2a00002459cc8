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
        if cfg.test_source or cfg.test_fraction:
            return "image folders: data.test_source / data.test_fraction are read in memory"
        return None
    if kind not in LAZY_KINDS:
        return f"{kind}: sources are read into memory (lazy: {', '.join(LAZY_KINDS)})"
    for key, other in (("valid_source", cfg.valid_source), ("test_source", cfg.test_source)):
        if other and other.partition(":")[0] not in LAZY_KINDS:
            return f"data.{key} {other} cannot be read lazily"
    if cfg.text is not None:
        return "data.text (token rows) is tokenized in memory"
    if cfg.task == "multilabel":
        return "multilabel targets are read in memory"
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


def default_workers(cfg: DataConfig, decode: bool = False) -> Workers:
    """Cores per process (this process's CPU affinity / processes on the node): one is the
    training process's own, the rest fetch (at most 8); 1 core per process: no workers.
    Tables (not `decode`: images) with 2 cores per process get none either: reading a batch
    from a packed cache takes ~0.5 ms (256 rows of 1 KiB), and a worker process competes with
    the step's threads for the 2 cores (measured, benchmarks/parquet_scale.py, 256-float rows,
    batch 256: 26k samples/s without a worker, 15k with one). Decoding images is the work
    workers exist for."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    per = max((cores or 1) // local, 1)
    default = min(per - 1, 8) if decode or per > 2 else 0
    n = cfg.num_workers if cfg.num_workers is not None else default
    pin = cfg.pin_memory if cfg.pin_memory is not None else torch.cuda.is_available()
    return Workers(n, pin, cfg.persistent_workers and n > 0, cfg.prefetch_factor if n else None)


def open_rows(source: str, cfg: DataConfig, key: str, feats: list[str] | None):
    """(ArrowRows over `source`, its feature names, all its column names) — files found,
    csv/json cached once; no encoder yet (`encoded` adds the fitted one)."""
    from dist_train.data import arrow
    from dist_train.data.columns import plain_kinds

    kind, _, loc = source.partition(":")
    if not loc:
        from dist_train.data.sources import load_source

        load_source(source, cfg, key)  # the memory path's KIND:LOCATION error
    schema = None
    if kind == "parquet":  # each shard copied once into the Arrow cache (arrow.arrow_cache)
        shards = arrow.parquet_files(loc, key)
        schema = arrow.parquet_schema(shards[0], f"{key} `{source}`")  # the footer only
        feats = feats or _feature_names(cfg, schema.names)
        _check_columns(feats, schema, source)
        plain = plain_kinds(schema, feats, cfg) is not None
        pack = feats if plain else None  # cached row-major (arrow module doc)
        files = [arrow.arrow_cache("parquet", f, cfg, key, pack) for f in shards]
    elif kind == "disk":
        files = arrow.disk_files(loc, cfg.split, f"{key} `{source}`")
    else:
        files = [arrow.arrow_cache(kind, loc, cfg, key)]
    table = arrow.open_arrow(files)  # memory-mapped: reads the schema, not the rows
    if table.num_rows == 0:
        raise UserError(f"{key} `{source}`: no rows in {len(files)} file(s); add data rows.")
    if schema is None:  # disk/csv/json: the files hold the source's own columns
        schema = table.schema
        feats = feats or _feature_names(cfg, schema.names)
        _check_columns(feats, schema, source)
    return arrow.ArrowRows(files, feats, table.num_rows, None), feats, schema.names


def _check_columns(feats: list[str], schema, source: str):
    """Feature columns exist and are numbers, booleans or strings (categories: one-hot unless
    data.categorical says codes), from the schema: nothing read."""
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
        known = (
            pa.types.is_integer(kind)
            or pa.types.is_floating(kind)
            or kind == pa.bool_()
            or pa.types.is_string(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_dictionary(kind)
        )
        if not known:  # the memory path's words (columns._kind)
            raise UserError(
                f"data.features: column `{name}` of {source} holds {kind} values, neither "
                "numbers, booleans nor strings; leave it out of data.features (images: "
                "imagefolder:, text: data.text)."
            )


def plain_encoder(rows, cfg: DataConfig):
    """The encoder of a table of numbers and booleans under data.missing error, from the
    schema alone (columns.plain_kinds), so such a table needs no fitting pass and keeps the
    fast gather; None when a column needs fitting."""
    from dist_train.data import columns
    from dist_train.data.arrow import packed_kinds

    kinds = packed_kinds(rows.files)  # a packed cache: what it packed (plain by construction)
    if kinds is None:
        kinds = columns.plain_kinds(arrow_schema(rows), rows.columns, cfg)
    else:
        kinds = {name: kinds[name] for name in rows.columns}
    return columns.plain_encoder(kinds)


def arrow_schema(rows):
    from dist_train.data.arrow import open_arrow

    return open_arrow(rows.files).schema


def encoded(rows, encoder, cfg: DataConfig):
    """`rows` fetching the encoder's features (a plain encoder: the fast numeric gather),
    shaped by data.shape (checked against the encoded width, as the memory path does)."""
    from dist_train.data.arrow import ArrowRows

    plain = all(c.kind in ("number", "bool") for c in encoder.columns)
    plain = plain and encoder.missing == "error"
    out = ArrowRows(rows.files, encoder.names, rows.num_rows, None, None if plain else encoder)
    width = out.input_shape[0]
    if cfg.shape:
        if int(np.prod(cfg.shape)) != width:
            raise UserError(
                f"data.shape {cfg.shape} holds {int(np.prod(cfg.shape))} values but rows have "
                f"{width} features."
            )
        out.input_shape = tuple(cfg.shape)
    return out


def scan_gaps(rows, cfg: DataConfig, source: str) -> np.ndarray | None:
    """bool [rows]: rows with a missing feature cell, in one pass over the record batches (as
    the memory path's `gaps` over the whole table: under data.missing error the first one is a
    UserError naming its file row); None when nothing needs the scan (impute; a numeric table
    under error: the gaps its cache counted when it was converted, `arrow.first_gap`, decide
    it without reading the rows; datasets' own `disk:` files have no such count, and their
    fetch checks each batch)."""
    from dist_train.data.arrow import first_gap
    from dist_train.data.columns import gaps, missing_cell

    if cfg.missing == "impute":
        return None
    if cfg.missing == "error" and plain_encoder(rows, cfg):
        found = first_gap(rows.files, rows.columns)
        if found is not None:
            raise missing_cell(found[1], found[0], source)
        return None
    out = np.zeros(len(rows), dtype=bool)
    for start, batch in rows.batches():
        end = start + batch.num_rows
        out[start:end] = gaps(batch, rows.columns, cfg.missing, cfg.categorical, source, start)
    return out if cfg.missing == "drop" else None


def _kept(keep: torch.Tensor, y: torch.Tensor, miss: np.ndarray | None):
    """(source row ids, targets, rows dropped): the rows the target encoding kept, less those
    with a missing feature under data.missing drop (as sources._keep)."""
    # int32 under 2^31 rows: the ids are held for the whole run (rows.LazyTable)
    wide = np.int32 if len(keep) < 2**31 else np.int64
    if bool(keep.all()):  # the usual case: no int64 temporary of every row
        kept = np.arange(len(keep), dtype=wide)
    else:
        kept = np.flatnonzero(keep.numpy()).astype(wide)
    if miss is None:
        return kept, y, 0
    present = ~miss[kept]
    if bool(present.all()):
        return kept, y, 0
    return kept[present], y[torch.from_numpy(present)], int((~present).sum())


def _gathered(values: np.ndarray, order: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """`values[order]`, gathered a chunk at a time: numpy widens an int32 index array to
    int64 first, a temporary of 8 bytes a row at the load's peak; in chunks it stays 8 MiB."""
    out = np.empty((len(order), *values.shape[1:]), dtype=values.dtype)
    for start in range(0, len(order), chunk):
        out[start : start + chunk] = values[order[start : start + chunk]]
    return out


def gap_cells(table) -> dict[str, int]:
    """Missing cells per column of an Arrow table: nulls, and NaN in float columns (what
    the encoders impute)."""
    from dist_train.data.columns import column_gaps

    found = column_gaps(table)
    return {name: found[name][0] if name in found else 0 for name in table.column_names}


def _fit(rows, ids: np.ndarray, cfg: DataConfig):
    """The encoder fitted on the training rows `ids`, in the memory path's order and chunks
    (sources._chunks: the same float64 sums, so the same fill values), and the training
    split's counts (cells imputed)."""
    from dist_train.data.columns import Counts, TableEncoder
    from dist_train.data.sources import TAKE_CHUNK

    cells = dict.fromkeys(rows.columns, 0)

    def chunks():
        for start in range(0, len(ids), TAKE_CHUNK):
            part = rows.take_table(ids[start : start + TAKE_CHUNK])
            if cfg.missing == "impute":
                for name, count in gap_cells(part).items():
                    cells[name] += count
            yield part

    encoder = TableEncoder.fit_batches(
        chunks(), rows.columns, cfg.missing, cfg.categorical, cfg.source
    )
    counts = Counts(rows=len(ids), imputed={k: v for k, v in cells.items() if v})
    return encoder, counts


def _counts(table: LazyTable, encoder, what: str):
    """What encoding a split's rows counts (imputed cells, unseen categories), in chunks;
    None when the encoder can count neither."""
    from dist_train.data.columns import Counts
    from dist_train.data.sources import TAKE_CHUNK

    if encoder.missing != "impute" and all(c.kind != "category" for c in encoder.columns):
        return None
    counts = Counts()
    raw = table.source
    for start in range(0, len(table.ids), TAKE_CHUNK):
        part = raw.take_table(table.ids[start : start + TAKE_CHUNK])
        counts.add(encoder.encode(part, what)[2])
    return counts


def load_lazy(cfg: DataConfig, seed: int, why: str):
    """The lazy bundle: targets and split in memory, features left in the files and encoded
    per fetch by the column encoders fitted on the training split (data/columns.py), with the
    memory path's row filtering (targets, data.missing drop), split, counts and notes."""
    from dist_train.data.arrow import release_freed_memory
    from dist_train.data.sources import DataBundle, column, encode_targets, split_permutation

    if cfg.source.startswith("imagefolder:"):
        from dist_train.data.images import lazy_images

        bundle = lazy_images(cfg, seed, default_workers(cfg, decode=True).num_workers)
        bundle.workers = default_workers(cfg, decode=True)
        bundle.plan = f"data: lazy ({why}); {bundle.workers.describe()}"
        return bundle
    rows, feats, _ = open_rows(cfg.source, cfg, "data.source", None)
    miss = scan_gaps(rows, cfg, cfg.source)
    y_raw = column(rows.table([cfg.target]), cfg.target, cfg.source)
    extra = {}  # data.valid_source / data.test_source: (raw rows, gap mask, raw targets)
    for key in ("valid_source", "test_source"):
        other = getattr(cfg, key)
        if other:
            orows, _, _ = open_rows(other, cfg, f"data.{key}", feats)
            ymiss = scan_gaps(orows, cfg, other)
            extra[key] = (orows, ymiss, column(orows.table([cfg.target]), cfg.target, other))
    vy_raw = extra["valid_source"][2] if "valid_source" in extra else None
    classes, y_all, keep = encode_targets(y_raw, cfg, vy_raw)
    del y_raw  # 8 bytes a row, freed before the split gathers its copies (the load's peak)
    ids, y_all, dropped = _kept(keep, y_all, miss)
    del keep, miss
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    fraction = 0.0 if cfg.valid_source else cfg.valid_fraction
    wide = torch.int32 if len(y_all) < 2**31 else torch.int64
    perm, n_test, n_valid = split_permutation(
        len(y_all), fraction, cfg.test_fraction, split_seed, wide
    )
    if perm is not None:  # ids and targets in the split's order: each split is a slice
        ids = _gathered(ids, perm.numpy())
        y_all = torch.from_numpy(_gathered(y_all.numpy(), perm.numpy()))
        del perm
    cut = n_test + n_valid  # the permutation's test rows, then its validation rows
    spans = {"test split": (0, n_test), "valid split": (n_test, cut), "train split": (cut, None)}
    notes = []
    if dropped:
        notes.append(
            f"data.missing drop: {dropped} rows of {cfg.source} left out (a feature cell missing)"
        )
    encoder = plain_encoder(rows, cfg)
    train_counts = None
    if encoder is None:  # strings, categories, gaps: one chunked pass over the training rows
        encoder, train_counts = _fit(rows, ids[cut:], cfg)
    source = encoded(rows, encoder, cfg)

    def part(what):
        lo, hi = spans[what]
        if hi == lo:
            return None
        if hi is None:  # the training rows: views of the gathered arrays, no second copy
            table = LazyTable(source, ids[lo:], y_all[lo:])
        else:  # small: their own copies (a view would pickle the whole array into workers)
            table = LazyTable(source, ids[lo:hi].copy(), y_all[lo:hi].clone())
        counts = train_counts if what == "train split" else _counts(table, encoder, what)
        line = counts.describe(what) if counts is not None else None
        if line:
            notes.append(line)
        return table

    train, valid, test = part("train split"), part("valid split"), part("test split")
    for key, name in (("valid_source", "valid"), ("test_source", "test")):
        if key not in extra:
            continue
        orows, omiss, oy_raw = extra[key]
        _, oy, okeep = encode_targets(oy_raw, cfg, None, classes)
        oids, oy, odropped = _kept(okeep, oy, omiss)
        if odropped:
            notes.append(f"data.missing drop: {odropped} rows of {getattr(cfg, key)} left out")
        table = LazyTable(encoded(orows, encoder, cfg), oids, oy)
        counts = _counts(table, encoder, f"{name} source")
        line = counts.describe(f"{name} source") if counts is not None else None
        if line:
            notes.append(line)
        valid, test = (table, test) if name == "valid" else (valid, table)
    if test is not None:
        where = cfg.test_source or f"data.test_fraction {cfg.test_fraction}"
        notes.append(f"test: {len(test.y)} held-out rows ({where}), evaluated once after training")
    norm = None
    if cfg.standardize:  # on the encoded features, as the memory path
        norm = standardize_stats(train.source, train.ids)
        for pos, _ in encoder.code_columns():
            norm[0][pos], norm[1][pos] = 0.0, 1.0  # category codes stay integers (embedding)
    bundle = DataBundle(train, valid, source.input_shape, classes, feats, norm, test, encoder)
    bundle.notes = notes
    # What the load read and dropped (the target column, the split's temporaries) is freed but
    # kept by the allocators; the run holds only the split's ids and targets from here on.
    del extra
    release_freed_memory()
    bundle.workers = default_workers(cfg)
    bundle.plan = f"data: lazy ({why}); {bundle.workers.describe()}"
    return bundle


def load_lazy_table(
    source: str,
    cfg: DataConfig,
    classes: list | None,
    feats: list[str],
    require_target: bool,
    encoder=None,
    what: str | None = None,
) -> tuple[LazyTable, bool]:
    """`sources.load_table` (eval/predict `--data`) on the lazy path: every row of `source`
    in file order (predict writes them in that order), encoded by the run's `encoder` (its
    columns.json; none: fitted on this file, as the memory path does), targets encoded with
    the run's classes; a file without the target column is accepted when `require_target` is
    False. Under data.missing drop the rows with a gap are left out (`rows`: file row
    numbers); what encoding counted (dropped, imputed, unseen) is the table's `note`."""
    from dist_train.data.columns import Counts, TableEncoder
    from dist_train.data.sources import (
        class_rows,
        column,
        counts_note,
        encode_targets,
        numeric_target,
    )

    if source.startswith("imagefolder:"):
        from dist_train.data.images import lazy_image_table

        return lazy_image_table(source, cfg, classes, require_target)
    names_in = encoder.names if encoder is not None else feats
    rows, _, names = open_rows(source, cfg, "--data", names_in)
    if encoder is None:
        encoder = plain_encoder(rows, cfg) or TableEncoder.fit_batches(
            (b for _, b in rows.batches()), rows.columns, cfg.missing, cfg.categorical, source
        )
    keep_rows, note = np.ones(len(rows), dtype=bool), None
    plain = all(c.kind in ("number", "bool") for c in encoder.columns)
    if not (plain and encoder.missing == "error"):  # one pass: gaps (error names the row), counts
        import pyarrow as pa

        # Counted over the rows data.classes keeps, as the memory path counts its sources.
        labelled = class_rows(rows.table([cfg.target]), cfg, source, classes)
        label, counts = what or f"--data {source}", Counts()
        for start, batch in rows.batches():
            end = start + batch.num_rows
            _, kept, got = encoder.encode(batch, label, start)
            keep_rows[start:end] = kept
            if labelled is not None:
                got = encoder.encode(batch.filter(pa.array(labelled[start:end])), label)[2]
            counts.add(got)
        note = counts_note(counts, source, what)
    rows = encoded(rows, encoder, cfg)
    every = np.flatnonzero(keep_rows).astype(np.int64)
    if not require_target and cfg.target not in names:
        table = LazyTable(rows, every, torch.zeros(len(every), dtype=torch.int64))
        table.rows, table.note = every, note
        return table, False
    y_raw = column(rows.table([cfg.target]), cfg.target, source)[every]
    if cfg.task == "regression":
        y = torch.from_numpy(numeric_target(y_raw, cfg).astype(np.float32))
        table = LazyTable(rows, every, y)
    else:
        _, y, keep = encode_targets(y_raw, cfg, None, classes)
        table = LazyTable(rows, every[keep.numpy()], y)
    table.rows, table.note = table.ids, note
    return table, True


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
