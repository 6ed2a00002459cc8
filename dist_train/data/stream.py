"""`data.mode: stream`: training rows read as a stream (`datasets`' streaming loader), for
sources that cannot be indexed: a hub dataset (`data.streaming: true`) or local
parquet/csv/json files read the same way.

Exactness comes from one rule: every process (and every DataLoader worker) reads the same
global stream in the same seeded order and keeps its share of it by position:

* the global stream of epoch e: the source's shards in an order drawn from (seed, epoch), rows
  through a seeded shuffle buffer of `data.shuffle_buffer` rows; rows whose label is not in
  `data.classes` are dropped before anything counts them;
* global row c goes to rank c % world (split by example, as `datasets.split_dataset_by_node`
  does when there are fewer shards than ranks), so optimizer step s of micro-batch m trains on
  the global rows [(s * accum + m) * per_device * world, ... + per_device * world) on ANY world
  size: the same rows per step on 1 or N processes, exact mid-epoch resume on the same or a
  different world size (the sample audit checks it);
* the rank's micro-batch b is built by worker b % num_workers (each worker skips the others'
  batches), so DataLoader's round-robin yields them in order: results do not depend on the
  number of workers;
* steps per epoch = rows // train.batch_size, fixed up front from the scan (below): every rank
  gets at least steps * per_device rows (rows are dealt round-robin) and takes exactly that
  many, so all ranks end the epoch together.

The cost of that rule: every rank and worker reads (and shuffles) the whole stream and decodes
only its share of the feature rows, so reading grows with ranks x workers. `lazy` reads each
row once; use `stream` when the source cannot be indexed.

Resume replays the position: the epoch's stream is re-read from its start and the rows already
trained are skipped without building batches. (`datasets`' own `state_dict` skips by shard and
offset, but drops the contents of the shuffle buffer on resume, so the rows after a resume
would differ from an uninterrupted run.)

Before training, each process scans the stream once in file order (no shuffle): the row count,
the targets (one small column kept in memory, as on the lazy path: class list, class weights),
the standardisation statistics (float64, merged per chunk) and two feature rows for probes.
A table with strings, `data.categorical` or `data.missing` drop/impute has its column encoders
(data/columns.py, the memory path's) fitted in that same scan, on every training row in file
order, so every process fits the identical encoder; the scan also knows the rows drop leaves
out (the step count and the dealing count only the kept rows) and takes the statistics of the
encoded features. Workers encode each chunk with it; it is saved as columns.json for
eval/predict. Validation and test are never streamed: `data.valid_source` / `data.test_source`
are read map-style (memory or lazy) and encoded by the training encoders, so every row counts
exactly once on any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_train.config.schema import DataConfig
from dist_train.data.columns import TableEncoder, plain_encoder, plain_kinds
from dist_train.data.rows import Workers
from dist_train.errors import UserError

STREAM_KINDS = ("parquet", "csv", "json", "hub")
CHUNK = 4096  # rows per Arrow batch read from the stream
SHARD_BITS = 32  # row id = shard index << 32 | row offset inside the shard


@dataclass(frozen=True)
class StreamSource:
    """Where the stream comes from: picklable (paths and names), opened in each process."""

    kind: str
    files: tuple[str, ...]  # local files; for hub: (dataset id,)
    split: str
    columns: tuple[str, ...]  # features, then the target

    def open(self):
        """The `datasets.IterableDataset` of the source (nothing read yet). A hub dataset and
        local files go through the same streaming loader and the same code after it."""
        return self.open_all().select_columns(list(self.columns))

    def open_all(self):
        """The stream with every column (the schema decides the features)."""
        import datasets

        datasets.disable_progress_bars()
        if self.kind == "hub":
            return datasets.load_dataset(self.files[0], split=self.split, streaming=True)
        files = list(self.files)
        return datasets.load_dataset(self.kind, data_files=files, split="train", streaming=True)

    def shards(self, ds) -> list:
        """One IterableDataset per shard of the source (files; the library's unit of split)."""
        n = ds.num_shards
        return [ds.shard(num_shards=n, index=i) for i in range(n)]


def chunks(shard):
    """Arrow tables of up to CHUNK rows of one shard, in file order."""
    return shard.with_format("arrow").iter(batch_size=CHUNK)


def check_stream(cfg: DataConfig) -> str:
    """The source kind, after refusing what stream cannot do (exit 2 with the fix)."""
    kind = cfg.source.partition(":")[0]
    fix = "use data.mode lazy or memory"
    if kind not in STREAM_KINDS:
        raise UserError(
            f"data.mode stream: `{kind}:` sources are not streamed (stream: "
            f"{', '.join(STREAM_KINDS)}); {fix}."
        )
    if cfg.text is not None or cfg.task == "multilabel":
        what = "data.text" if cfg.text is not None else "multilabel targets"
        raise UserError(f"data.mode stream: {what} are read in memory; {fix}.")
    if cfg.test_fraction:
        raise UserError(
            f"data.mode stream: a stream has no random test split (data.test_fraction "
            f"{cfg.test_fraction}); give data.test_source (read map-style, every row counted "
            "once, evaluated after training with the best weights), or set data.test_fraction: "
            "0, or use data.mode lazy or memory."
        )
    if cfg.sampler == "balanced":
        raise UserError(
            "data.mode stream: data.sampler balanced needs random access to rows; use "
            "data.sampler shuffle (and loss class weights), or data.mode lazy."
        )
    if cfg.augment is not None and (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0):
        raise UserError(
            "data.mode stream: mixup/cutmix draw partner rows by row id from the whole split; "
            f"set them to 0 or {fix}."
        )
    if not cfg.valid_source and "valid_fraction" in cfg.model_fields_set and cfg.valid_fraction:
        raise UserError(
            "data.mode stream: a stream has no random validation split (data.valid_fraction); "
            "give data.valid_source (read map-style, every row counted once), or set "
            "data.valid_fraction: 0."
        )
    return kind


def stream_source(cfg: DataConfig, kind: str) -> StreamSource:
    from pathlib import Path

    loc = cfg.source.partition(":")[2]
    if not loc:
        raise UserError(f"data.source `{cfg.source}`: expected KIND:LOCATION.")
    if kind == "parquet":
        from dist_train.data.arrow import parquet_files

        files = tuple(parquet_files(loc, "data.source"))
    elif kind == "hub":
        files = (loc,)
    else:
        if not Path(loc).is_file():
            raise UserError(
                f"data.source `{cfg.source}`: file {loc} not found; check the path "
                "(relative paths are from the current directory)."
            )
        files = (loc,)
    return StreamSource(kind, files, cfg.split, ())


class Stats:
    """Mean and unbiased std per feature over chunks: float64 sums merged per chunk (Chan)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        x = x.astype(np.float64)
        cm = x.mean(0)
        self.merge(len(x), cm, ((x - cm) ** 2).sum(0))

    def merge(self, n: int, cm, cm2) -> None:
        """Add a group of `n` values with mean `cm` and squared deviations `cm2`."""
        if n == 0:
            return
        if self.mean is None:
            self.count, self.mean, self.m2 = n, np.asarray(cm, float), np.asarray(cm2, float)
            return
        delta, total = cm - self.mean, self.count + n
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + cm2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        std = np.sqrt(self.m2 / max(self.count - 1, 1))
        mean = torch.from_numpy(self.mean.astype(np.float32)).view(shape)
        std = torch.from_numpy(std.astype(np.float32)).view(shape)
        return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def features(table, feats: list[str], source: str, ids: np.ndarray) -> np.ndarray:
    """float32 [rows, features] of one Arrow chunk; a missing value names its row id."""
    import pyarrow as pa

    x = np.empty((table.num_rows, len(feats)), dtype=np.float32)
    for j, name in enumerate(feats):
        col = table.column(name)
        kind = col.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or kind == pa.bool_()):
            raise UserError(
                f"data.features: column `{name}` of {source} holds {kind} values in a later "
                "chunk of the stream, numbers in its first; make the column one type, or list "
                "it in data.categorical to encode it as a category."
            )
        x[:, j] = col.to_numpy(zero_copy_only=False)
    bad = np.isnan(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise UserError(
            f"data: feature `{feats[col]}` is missing/NaN in row {row_name(int(ids[row]))} of "
            f"{source}; clean the file or drop the column from data.features."
        )
    return x


def row_name(row_id: int) -> str:
    return f"{row_id & ((1 << SHARD_BITS) - 1)} of shard {row_id >> SHARD_BITS}"


@dataclass
class StreamTable:
    """The training split of a stream: targets in memory (scan order), features in the stream.
    `len` and `y` serve the step count, class weights and probes, like a `LazyTable`."""

    source: StreamSource
    feats: list[str]
    target: str
    classes: list | None
    cfg: DataConfig
    y: torch.Tensor  # encoded targets of every kept row, in file order
    first: torch.Tensor  # two feature rows (probes)
    input_shape: tuple[int, ...]
    num_shards: int
    encoder: TableEncoder | None = None  # the column encoders (data/columns.py), fitted
    plain: bool = True  # numbers and booleans under data.missing error: the direct decode

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> torch.Tensor:
        return self.first[:n]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode(self, y_raw: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(targets of the kept rows, keep mask) of one chunk, as the memory path encodes."""
        from dist_train.data.sources import encode_targets, numeric_target

        if self.cfg.task == "regression":
            y = numeric_target(y_raw, self.cfg).astype(np.float32)
            return torch.from_numpy(y), np.ones(len(y_raw), dtype=bool)
        _, y, keep = encode_targets(y_raw, self.cfg, None, self.classes)
        return y, keep.numpy()

    def rows_of(self, chunk, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """(float32 features, targets, row ids) of the training rows of one Arrow chunk whose
        rows have ids `ids`: label kept (data.classes) and, under data.missing drop, no
        missing feature cell; features encoded by the fitted encoder as the memory path
        encodes them (numbers and booleans under error: decoded directly, NaN named)."""
        y, keep = self.encode(column_of(chunk, self.target, self.cfg.source))
        if self.plain:
            return features(chunk, self.feats, self.cfg.source, ids)[keep], y, ids[keep]
        where, offset = self.cfg.source, 0
        if len(ids):
            where = f"{self.cfg.source} (shard {int(ids[0]) >> SHARD_BITS})"
            offset = int(ids[0]) & ((1 << SHARD_BITS) - 1)
        x, kept, _ = self.encoder.encode(chunk.select(self.feats), where, offset)
        if bool(kept.all()):
            return x[keep], y, ids[keep]
        return x[keep[kept]], y[torch.from_numpy(kept[keep])], ids[keep & kept]


class _Scan:
    """The feature scan of a table whose encoders need fitting (strings, data.categorical,
    data.missing drop/impute), over the training rows in file order: the encoders' counts
    and sums (`columns.Fitter`), the rows data.missing drop leaves out, the cells impute
    fills, and the statistics of the ENCODED features without a second pass: per number or
    boolean column the float64 moments of its present values (an imputed cell is one more
    value at the fill), per category the count of each value (a one-hot column's mean and
    variance follow from its count)."""

    def __init__(self, feats: list[str], cfg: DataConfig) -> None:
        from dist_train.data.columns import Fitter

        self.feats, self.cfg = feats, cfg
        self.fitter = Fitter(feats, cfg.missing, cfg.categorical, cfg.source)
        self.moments = {n: Stats() for n in feats}
        self.filled = dict.fromkeys(feats, 0)  # cells data.missing impute fills
        self.rows = self.dropped = 0
        self.present: list[np.ndarray] = []  # per chunk: label-kept rows not dropped
        self.probe: list = []  # the first two training rows (Arrow)

    def update(self, chunk, keep: np.ndarray, where: str, offset: int) -> None:
        import pyarrow as pa

        from dist_train.data.columns import float_values, gaps
        from dist_train.data.lazy import gap_cells

        cfg = self.cfg
        part = chunk.select(self.feats)
        # under error the first gap is a UserError naming its shard row and column
        miss = gaps(part, self.feats, cfg.missing, cfg.categorical, where, offset)
        if cfg.missing == "drop":
            self.present.append(~miss[keep])
            self.dropped += int((miss & keep).sum())
            keep = keep & ~miss
        part = part.filter(pa.array(keep))
        self.fitter.update(part)
        self.rows += part.num_rows
        if sum(t.num_rows for t in self.probe) < 2 and part.num_rows:
            self.probe.append(part.slice(0, 2))
        if cfg.missing == "impute":
            for name, count in gap_cells(part).items():
                self.filled[name] += count
        if not cfg.standardize:
            return
        for name in self.feats:
            if self.fitter.kinds[name] in ("number", "bool"):
                values = float_values(part.column(name))
                self.moments[name].add(values[~np.isnan(values)][:, None])

    def norm(self, encoder, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std of each encoded feature over the training rows (codes: 0/1,
        as the memory path leaves them)."""
        n, mean, var = self.rows, [], []
        for col in encoder.columns:
            filled = self.filled[col.name] if col.fill is not None else 0
            if col.kind != "category":
                stats = self.moments[col.name]
                stats.merge(filled, np.array([col.fill or 0.0]), np.zeros(1))
                if stats.mean is None:
                    mean.append(0.0), var.append(1.0)
                    continue
                mean.append(float(stats.mean[0]))
                var.append(float(stats.m2[0]) / max(stats.count - 1, 1))
            elif col.encoding == "codes":
                mean.append(0.0), var.append(1.0)  # category codes stay integers (embedding)
            else:
                counts = self.fitter.values[col.name]
                for value in col.vocab:
                    c = counts[value] + (filled if value == col.fill else 0)
                    mean.append(c / n)
                    var.append(c * (1 - c / n) / max(n - 1, 1))  # c ones, n - c zeros
        std = np.sqrt(np.asarray(var))
        m = torch.from_numpy(np.asarray(mean, dtype=np.float32)).view(shape)
        s = torch.from_numpy(std.astype(np.float32)).view(shape)
        return m, torch.where(s > 1e-8, s, torch.ones_like(s))


def load_stream(cfg: DataConfig, seed: int, why: str):
    """The stream bundle: one scan of the stream (rows, targets, column encoders, statistics),
    the validation and test sources read map-style and encoded by the training encoders."""
    from dist_train.data.columns import Counts
    from dist_train.data.lazy import default_workers
    from dist_train.data.sources import DataBundle, column, encode_targets, load_table

    kind = check_stream(cfg)
    src = stream_source(cfg, kind)
    raw = src.open_all()
    names = list(raw.column_names or [])
    if not names:  # a hub stream without declared features: read the first row's keys
        names = list(next(iter(raw)).keys())
    targets = [cfg.target]
    feats = cfg.features or [c for c in names if c not in targets]
    for name in [*feats, cfg.target]:
        if name not in names:
            column(_Names(names), name, cfg.source)  # the memory path's "did you mean" error
    if cfg.standardize and cfg.shape and len(cfg.shape) == 3:
        raise UserError(
            "data.mode stream: per-channel statistics of image rows (data.shape [C, H, W]) are "
            "not streamed; set data.standardize: false or use data.mode lazy."
        )
    src = StreamSource(src.kind, src.files, src.split, (*feats, cfg.target))
    ds = src.open()
    # Scan 1: the target column (classes need every label before any row is encoded).
    y_parts = []
    for shard in src.shards(ds.select_columns([cfg.target])):
        for table in chunks(shard):
            y_parts.append(column(table, cfg.target, cfg.source))
    if not y_parts:
        raise UserError(f"data.source `{cfg.source}`: no rows; add data rows.")
    y_raw = np.concatenate(y_parts)
    classes = None
    if cfg.task != "regression":
        classes, _, _ = encode_targets(y_raw, cfg, None)
    table = StreamTable(
        src, feats, cfg.target, classes, cfg, torch.zeros(0), torch.zeros(0), (), ds.num_shards
    )
    table.y, _ = table.encode(y_raw)
    if len(table.y) == 0:
        raise UserError(f"data.source `{cfg.source}`: no rows of data.classes {cfg.classes}.")
    shards = src.shards(ds)
    head = next(iter(chunks(shards[0])), None)
    # Numbers and booleans under data.missing error: no fitting pass (the first chunk's schema).
    encoder = plain_encoder(plain_kinds(head.schema, feats, cfg)) if head is not None else None
    notes: list[str] = []
    if encoder is not None:
        # Scan 2 (numbers/booleans under error): statistics over the kept rows, the probe
        # rows, NaN checks. Without standardisation only each shard's first chunk is read.
        stats, first = Stats(), None
        for i, shard in enumerate(shards):
            offset = 0
            for chunk in chunks(shard):
                ids = (i << SHARD_BITS) + offset + np.arange(chunk.num_rows)
                offset += chunk.num_rows
                _, keep = table.encode(column(chunk, cfg.target, cfg.source))
                x = features(chunk, feats, cfg.source, ids)[keep]
                if first is None and len(x):
                    first = torch.from_numpy(x[:2].copy())
                if not cfg.standardize:
                    break
                stats.add(x)
        shape = _shape(cfg, encoder.num_features)
        norm = stats.result(shape) if cfg.standardize else None
    else:
        # Scan 2 (strings, data.categorical, data.missing drop/impute): the column encoders
        # are fitted HERE, on every training row in file order (shards in order, chunks in
        # order, no shuffle), in the same pass that takes the statistics of the encoded
        # features: every process (and every worker, which receives the fitted encoder) runs
        # this identical pass, so all hold the identical encoder, dropped rows and statistics.
        scan = _Scan(feats, cfg)
        for i, shard in enumerate(shards):
            offset = 0
            for chunk in chunks(shard):
                _, keep = table.encode(column(chunk, cfg.target, cfg.source))
                scan.update(chunk, keep, f"{cfg.source} (shard {i})", offset)
                offset += chunk.num_rows
        encoder = scan.fitter.result()
        table.plain = False
        if scan.dropped:  # the steps per epoch and the dealing count the kept rows only
            table.y = table.y[torch.from_numpy(np.concatenate(scan.present))]
            notes.append(
                f"data.missing drop: {scan.dropped} rows of {cfg.source} left out "
                "(a feature cell missing)"
            )
        if not len(table.y):
            raise UserError(
                f"data.missing drop: every row of {cfg.source} has a missing feature cell; "
                "use data.missing impute or fill the file."
            )
        line = Counts(rows=scan.rows, imputed={k: v for k, v in scan.filled.items() if v}).describe(
            "train split"
        )
        if line:
            notes.append(line)
        import pyarrow as pa

        first = torch.from_numpy(encoder.encode(pa.concat_tables(scan.probe).slice(0, 2))[0])
        shape = _shape(cfg, encoder.num_features)
        norm = scan.norm(encoder, shape) if cfg.standardize else None
    table.encoder, table.input_shape = encoder, shape
    table.first = first.view(-1, *shape)
    sides = {}
    for key, name in (("valid_source", "valid"), ("test_source", "test")):
        other = getattr(cfg, key)
        if not other:
            continue
        # Read map-style (memory or lazy, by this file's size), every row counted once on any
        # number of processes; encoded by the training encoders (no refit on this file).
        ocfg = cfg.model_copy(update={"mode": "auto", "streaming": False})
        otab, _ = load_table(other, ocfg, classes, feats, encoder=encoder, what=f"{name} source")
        notes += otab.note.split("\n") if otab.note else []
        sides[name] = (otab, f"{other} ({'lazy' if hasattr(otab, 'ids') else 'memory'})")
    valid, vwhat = sides.get("valid", (None, "none (stream: give data.valid_source)"))
    test, twhat = sides.get("test", (None, ""))
    if test is not None:
        notes.append(
            f"test: {len(test.y)} held-out rows ({cfg.test_source}), evaluated once after training"
        )
    bundle = DataBundle(table, valid, shape, classes, feats, norm, test, encoder, notes)
    workers = default_workers(cfg)
    # Not persistent: each epoch's iterator sends the dataset (its epoch and skip) to the workers.
    bundle.workers = Workers(
        workers.num_workers, workers.pin_memory, False, workers.prefetch_factor
    )
    buffer = cfg.shuffle_buffer
    fitted = "" if table.plain else "column encoders fitted in the scan; "
    bundle.plan = (
        f"data: stream ({why}); {cfg.source}: {len(table)} rows in {ds.num_shards} shard(s), "
        f"dealt to ranks by example (every rank and worker reads the whole stream), shuffle "
        f"buffer {buffer} rows seeded by (seed, epoch); {fitted}{bundle.workers.describe()}; "
        f"resume: exact on any number of processes (the epoch's stream is re-read up to the "
        f"position); validation: {vwhat}" + (f"; test: {twhat}" if test is not None else "")
    )
    return bundle


def _shape(cfg: DataConfig, width: int) -> tuple[int, ...]:
    """data.shape, checked against the encoded width (the memory path's words), or (width,)."""
    if not cfg.shape:
        return (width,)
    if int(np.prod(cfg.shape)) != width:
        raise UserError(
            f"data.shape {cfg.shape} holds {int(np.prod(cfg.shape))} values but rows have "
            f"{width} features."
        )
    return tuple(cfg.shape)


class _Names:
    """Column names only: lets sources.column word a missing column as it does for files."""

    def __init__(self, names: list[str]) -> None:
        self.column_names = names


class StreamRows(torch.utils.data.IterableDataset):
    """One rank's micro-batches of one epoch: (features, targets, global row ids), each of
    `per_device` rows, `limit` of them, from micro-batch `skip` on (set before iterating)."""

    def __init__(
        self,
        table: StreamTable,
        per_device: int,
        limit: int,
        seed: int,
        rank: int,
        world: int,
        buffer: int,
    ) -> None:
        self.table, self.per_device, self.limit = table, per_device, limit
        self.seed, self.rank, self.world, self.buffer = seed, rank, world, buffer
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.limit

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(worker, workers)

    def batches(self, worker: int, workers: int):
        """This worker's micro-batches b (b % workers == worker, b >= skip), in order."""
        pd, rows, b = self.per_device, [], 0
        for c, row in enumerate(self.global_rows()):
            if c % self.world != self.rank:  # another rank's row (dealt round-robin)
                continue
            rows.append(row)
            if len(rows) < pd:
                continue
            if b >= self.skip and b % workers == worker:
                yield self._batch(rows)
            rows, b = [], b + 1
            if b >= self.limit:
                return
        raise RuntimeError(
            f"rank {self.rank}: the stream ended after {b} of {self.limit} micro-batches in "
            f"epoch {self.epoch}; the source changed since the scan counted {len(self.table)} "
            "rows (restart the run)."
        )

    def global_rows(self):
        """(row id, features, target) of the epoch's global stream, shuffled."""
        rng = np.random.default_rng([self.seed, self.epoch])
        ds = self.table.source.open()
        shards = self.table.source.shards(ds)
        order = rng.permutation(len(shards))
        return _shuffled(self._rows(shards, order), rng, self.buffer)

    def _rows(self, shards, order):
        t = self.table
        for i in order:
            offset = 0
            for chunk in chunks(shards[i]):
                n = chunk.num_rows
                every = (int(i) << SHARD_BITS) + offset + np.arange(n)
                offset += n
                # Decoded and encoded per chunk (vectorised per column, in the worker): every
                # reader encodes the chunk, each keeps its own rows. Rows data.missing drop
                # leaves out never enter the global stream, so the dealing counts kept rows.
                x, y, ids = t.rows_of(chunk, every)
                for j in range(len(ids)):
                    yield int(ids[j]), x[j], y[j]

    def _batch(self, rows):
        ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        x = torch.from_numpy(np.stack([r[1] for r in rows])).view(-1, *self.table.input_shape)
        return x, torch.stack([r[2] for r in rows]), ids


def column_of(chunk, name: str, source: str) -> np.ndarray:
    from dist_train.data.sources import column

    return column(chunk, name, source)


def _shuffled(items, rng: np.random.Generator, size: int):
    """A seeded shuffle buffer of `size` items (0/1: the stream order): the item drawn is
    replaced by the next one; at the end the rest comes out in a drawn order."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    draws = iter(())
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = next(draws, None)
        if j is None:
            draws = iter(rng.integers(0, size, size=1024).tolist())
            j = next(draws)
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


class StreamLoader:
    """The training loader of a stream: a DataLoader over `StreamRows` (workers build whole
    micro-batches; batch_size None), not prepared by accelerate (its IterableDataset handling
    would dispatch every batch from rank 0): this rank's rows are chosen by `StreamRows`."""

    def __init__(self, rows: StreamRows, workers: Workers, device: torch.device) -> None:
        self.dataset, self.device = rows, device
        self.loader = torch.utils.data.DataLoader(rows, batch_size=None, **workers.loader_kwargs())

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def batches(self, skip: int):
        """The epoch's micro-batches from `skip` on (resume: the stream is re-read from the
        epoch's start, the skipped rows are passed over without building batches)."""
        self.dataset.skip = skip
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


def stream_loader(table: StreamTable, per_device: int, limit: int, seed: int, acc, workers):
    """This rank's loader: `limit` micro-batches of `per_device` rows per epoch."""
    rows = StreamRows(
        table,
        per_device,
        limit,
        seed,
        acc.process_index,
        acc.num_processes,
        table.cfg.shuffle_buffer,
    )
    return StreamLoader(rows, workers or Workers(), acc.device)
