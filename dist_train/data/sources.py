"""Data sources (through Hugging Face `datasets`) -> in-memory tensors (`Table`).

Everything is read, encoded and standardised once here; `batches.py` turns the tables into
whole-batch loaders.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dist_train.config.schema import DataConfig
from dist_train.data.columns import TableEncoder, as_arrow, gaps
from dist_train.data.rows import LazyTable, Workers
from dist_train.errors import UserError
from dist_train.numbers import parses_as_number

SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer", "diabetes")
FILE_KINDS = ("csv", "parquet", "json")


@dataclass
class Table:
    x: torch.Tensor  # float32 [N, *input_shape]
    y: torch.Tensor  # int64 [N] (classes), [N, L] 0/1 (multilabel), float32 [N] (regression)
    rows: np.ndarray | None = None  # load_table: each row's number in the file (drop skips)
    note: str | None = None  # load_table: what the column encoders counted (printed)

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> torch.Tensor:
        """Features of the first `n` rows (probes; a `rows.LazyTable` fetches them instead)."""
        return self.x[:n]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


@dataclass
class Pending:
    """Feature columns not yet encoded: `frame`'s rows `rows` (those whose targets are kept and,
    under data.missing drop, with no missing feature). Encoded once the split is known, by an
    encoder fitted on the training rows only (data/columns.py)."""

    frame: object
    rows: np.ndarray
    source: str
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class DataBundle:
    train: Table | LazyTable  # LazyTable: data.mode lazy (data/rows.py); stream: StreamTable
    valid: Table | LazyTable | None
    input_shape: tuple[int, ...]
    classes: list | None  # label of each class index; None for regression
    feature_names: list[str] = field(default_factory=list)
    norm: tuple[torch.Tensor, torch.Tensor] | None = None
    test: Table | LazyTable | None = None  # data.test_source / test_fraction: evaluated at the end
    encoder: TableEncoder | None = None  # tabular features: fitted on the training split
    notes: list[str] = field(default_factory=list)  # dropped/imputed/unseen counts (the plan)
    input_names: list[str] | None = None  # data.text: names of the K token rows (data/text.py)
    right_padded: bool = True  # data.text: the tokenizer pads on the right
    workers: Workers | None = None  # lazy: the DataLoader worker pool (None: no workers)
    plan: str = ""  # the plan's data line: which path (data.mode) and why

    @property
    def codes(self) -> list[tuple[int, int]] | None:
        """(feature position, categories) of each `codes` column, for an embedding layer."""
        return self.encoder.code_columns() if self.encoder is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0


def load_data(cfg: DataConfig, seed: int, frames: tuple | None = None) -> DataBundle:
    """Load, encode, split and (optionally) standardise; identical on every rank. `frames`:
    (train, valid or None) tables already in memory (dist_train.fit's data, data/python.py)."""
    if not frames and (cfg.mode == "stream" or (cfg.streaming and cfg.mode == "auto")):
        from dist_train.data.stream import load_stream

        why = "data.mode stream" if cfg.mode == "stream" else "auto: data.streaming true"
        return load_stream(cfg, seed, why)
    if not frames:
        from dist_train.data.lazy import choose_mode, load_lazy

        mode = choose_mode(cfg)
        if mode.mode == "lazy":
            return load_lazy(cfg, seed, mode.why)
        bundle = _load_memory(cfg, seed, None)
        bundle.plan = f"data: memory ({mode.why})"
        return bundle
    return _load_memory(cfg, seed, frames)


def _load_memory(cfg: DataConfig, seed: int, frames: tuple | None) -> DataBundle:
    frame = frames[0] if frames else load_source(cfg.source, cfg)
    if cfg.text is not None:  # token rows instead of float features
        return _with_text(frame, cfg, seed, frames)
    targets = cfg.target if isinstance(cfg.target, list) else [cfg.target]
    feats = cfg.features or [c for c in frame.column_names if c not in targets]
    if cfg.task == "multilabel":
        return _load_multilabel(frame, feats, cfg, seed, frames)
    x_all, y_raw = _features(frame, feats, cfg), _column(frame, cfg.target, cfg.source)
    return _encoded(x_all, y_raw, feats, cfg, seed, frames)


def _features(frame, names: list[str], cfg: DataConfig, source: str | None = None):
    """Image pixels as a tensor; table columns as `Pending` (encoded after the split). Under
    data.missing error a missing cell is a UserError here, naming its row in the file."""
    if "__image__" in frame.column_names:  # rows already decoded to arrays
        pixels = frame["__image__"]
        if isinstance(pixels, torch.Tensor):  # imagefolder: uint8 [N, C, H, W] (data/images.py)
            return pixels
        # dist_train.fit's Python datasets (data/python.py): float rows of any shape
        return torch.as_tensor(np.stack(pixels), dtype=torch.float32)
    source = source or cfg.source
    missing = gaps(frame, names, cfg.missing, cfg.categorical, source)
    rows = np.arange(frame.num_rows) if cfg.missing != "drop" else np.nonzero(~missing)[0]
    return Pending(frame, rows, source, int(missing.sum()) if cfg.missing == "drop" else 0)


def _keep(x, keep: np.ndarray | torch.Tensor, y: torch.Tensor):
    """Rows `keep` (targets kept) of features x, with their encoded targets y [keep.sum()];
    for Pending features also without the rows data.missing drop left out."""
    keep = np.asarray(keep, dtype=bool)
    if not isinstance(x, Pending):
        return (x if bool(keep.all()) else x[torch.from_numpy(keep)]), y
    kept = np.nonzero(keep)[0]
    present = np.isin(kept, x.rows)  # rows not dropped for a missing feature
    x = Pending(x.frame, kept[present], x.source, int((~present).sum()))
    return x, (y if bool(present.all()) else y[torch.from_numpy(present)])


def _with_text(frame, cfg: DataConfig, seed: int, frames: tuple | None) -> DataBundle:
    from dist_train.data.text import text_columns, tokenize

    x_all, names, right = tokenize(frame, cfg, cfg.source)
    y_raw = _column(frame, cfg.target, cfg.source)
    bundle = _encoded(x_all, y_raw, None, cfg, seed, frames)
    bundle.feature_names, bundle.input_names, bundle.right_padded = text_columns(cfg), names, right
    return bundle


def _encoded(x_all, y_raw, feats, cfg: DataConfig, seed: int, frames: tuple | None) -> DataBundle:
    """Single-label targets encoded (rows of classes not asked for dropped), then the split."""
    valid = None
    if cfg.valid_source:
        vframe = frames[1] if frames else load_source(cfg.valid_source, cfg, "data.valid_source")
        vx = (
            _features(vframe, feats, cfg, cfg.valid_source)
            if cfg.text is None
            else _tokens(vframe, cfg)
        )
        valid = (vx, _column(vframe, cfg.target, cfg.valid_source))
    classes, y_all, keep = _encode_targets(y_raw, cfg, None if valid is None else valid[1])
    x_all, y_all = _keep(x_all, keep, y_all)  # no second copy when nothing is dropped
    test = None
    if cfg.test_source:
        tframe = load_source(cfg.test_source, cfg, "data.test_source")
        tx = (
            _features(tframe, feats, cfg, cfg.test_source)
            if cfg.text is None
            else _tokens(tframe, cfg, cfg.test_source)
        )
        _, ty, tkeep = _encode_targets(
            _column(tframe, cfg.target, cfg.test_source), cfg, None, classes
        )
        test = Table(*_keep(tx, tkeep, ty))
    if valid is not None:
        _, vy, vkeep = _encode_targets(valid[1], cfg, None, classes)
        vtab = Table(*_keep(valid[0], vkeep, vy))
        return _bundle(Table(x_all, y_all), vtab, classes, feats, cfg, seed, test)
    return _bundle(Table(x_all, y_all), None, classes, feats, cfg, seed, test)


def _load_multilabel(
    frame, feats: list[str], cfg: DataConfig, seed: int, frames: tuple | None
) -> DataBundle:
    from dist_train.data.multilabel import label_matrix

    labels, y = label_matrix(frame, cfg, cfg.source)
    valid = None
    if cfg.valid_source:
        vframe = frames[1] if frames else load_source(cfg.valid_source, cfg, "data.valid_source")
        vx, vy = (
            _features(vframe, feats, cfg, cfg.valid_source),
            label_matrix(vframe, cfg, cfg.valid_source, labels)[1],
        )
        valid = Table(*_keep(vx, np.ones(len(vy), dtype=bool), vy))
    test = None
    if cfg.test_source:
        tframe = load_source(cfg.test_source, cfg, "data.test_source")
        tx, ty = (
            _features(tframe, feats, cfg, cfg.test_source),
            label_matrix(tframe, cfg, cfg.test_source, labels)[1],
        )
        test = Table(*_keep(tx, np.ones(len(ty), dtype=bool), ty))
    x, y = _keep(_features(frame, feats, cfg), np.ones(len(y), dtype=bool), y)
    return _bundle(Table(x, y), valid, labels, feats, cfg, seed, test)


def _bundle(table: Table, valid, classes, feats: list[str], cfg: DataConfig, seed: int, test=None):
    """The split (test rows first, then validation unless a validation source was given),
    the column encoders fitted on the training rows, and the train-split statistics."""
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    fraction = 0.0 if valid is not None else cfg.valid_fraction
    train_ids, valid_ids, test_ids = split_rows(
        len(table.y), fraction, cfg.test_fraction, split_seed
    )
    encoder, notes = None, []
    if isinstance(table.x, Pending):  # table columns: fit on the training rows only
        fit_rows = table.x.rows[train_ids.numpy()]
        frame = table.x.frame
        encoder = TableEncoder.fit_batches(
            _chunks(frame, feats, fit_rows, cfg.source),  # one bounded copy at a time
            feats,
            cfg.missing,
            cfg.categorical,
            cfg.source,
        )
        if table.x.dropped:
            notes.append(
                f"data.missing drop: {table.x.dropped} rows of {cfg.source} left out "
                "(a feature cell missing)"
            )

        def encoded(pending: Pending, ids: torch.Tensor | None, what: str) -> torch.Tensor:
            rows = pending.rows if ids is None else pending.rows[ids.numpy()]
            x, counts = _encode_rows(encoder, pending.frame, feats, rows, pending.source, what)
            line = counts.describe(what)
            if line:
                notes.append(line)
            return _shaped(torch.from_numpy(x), cfg)

        def part(ids, what):
            return Table(encoded(table.x, ids, what), table.y[ids])

        train = part(train_ids, "train split")
        vtab = part(valid_ids, "valid split") if valid_ids is not None else None
        ttab = part(test_ids, "test split") if test_ids is not None else None
        for name, tab in (("valid", valid), ("test", test)):
            if tab is not None:
                if tab.x.dropped:
                    notes.append(
                        f"data.missing drop: {tab.x.dropped} rows of {tab.x.source} left out"
                    )
                enc = Table(encoded(tab.x, None, f"{name} source"), tab.y)
                vtab, ttab = (enc, ttab) if name == "valid" else (vtab, enc)
    else:
        part = lambda ids: Table(table.x[ids], table.y[ids]) if ids is not None else None  # noqa: E731
        train = table if len(train_ids) == len(table.y) and test_ids is None else part(train_ids)
        vtab = valid if valid is not None else part(valid_ids)
        ttab = test if test is not None else part(test_ids)
    if ttab is not None:
        where = cfg.test_source or f"data.test_fraction {cfg.test_fraction}"
        notes.append(f"test: {len(ttab.y)} held-out rows ({where}), evaluated once after training")
    norm = None
    if cfg.standardize:
        norm = _fit_standardize(train.x)
        for pos, _ in encoder.code_columns() if encoder is not None else []:
            norm[0][pos], norm[1][pos] = 0.0, 1.0  # category codes stay integers (embedding)
    return DataBundle(
        train, vtab, tuple(train.x.shape[1:]), classes, feats or [], norm, ttab, encoder, notes
    )


TAKE_CHUNK = 32_768  # rows per Arrow take while fitting/encoding: bounds the extra copy


def _chunks(frame, names: list[str], rows: np.ndarray, source: str):
    """`_take` in chunks of TAKE_CHUNK rows: the encoders see every row, while the extra Arrow
    copy stays one chunk (a whole-split take costs the table again at peak)."""
    for start in range(0, len(rows), TAKE_CHUNK):
        yield _take(frame, names, rows[start : start + TAKE_CHUNK], source)


def _encode_rows(encoder: TableEncoder, frame, names, rows: np.ndarray, source: str, what: str):
    """float32 [len(rows), F] of `rows` (data.missing drop already left its rows out of
    Pending.rows), filled chunk by chunk into one output, and the summed counts."""
    from dist_train.data.arrow import release_freed_memory
    from dist_train.data.columns import Counts

    out, counts, done = np.empty((len(rows), encoder.num_features), np.float32), Counts(), 0
    for part in _chunks(frame, names, rows, source):
        x, _, got = encoder.encode(part, what)
        out[done : done + len(x)] = x
        done += len(x)
        counts.add(got)
    release_freed_memory()  # the chunks' buffers, back to the OS
    return out[:done], counts


def _take(frame, names: list[str], rows: np.ndarray, source: str):
    """Rows `rows` of `frame`'s feature columns as a pyarrow Table (no copy of other columns)."""
    import pyarrow as pa

    return as_arrow(frame, names, source).take(pa.array(rows, pa.int64()))


def _shaped(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    if cfg.shape:
        if int(np.prod(cfg.shape)) != x.shape[1]:
            raise UserError(
                f"data.shape {cfg.shape} holds {int(np.prod(cfg.shape))} values but "
                f"rows have {x.shape[1]} features."
            )
        x = x.reshape(-1, *cfg.shape)
    return x


def _tokens(frame, cfg: DataConfig, source: str | None = None) -> torch.Tensor:
    from dist_train.data.text import tokenize

    return tokenize(frame, cfg, source or cfg.valid_source or cfg.source)[0]


def _fit_standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-split statistics: per feature for tables, per channel for images (per-pixel
    statistics would turn always-blank border pixels into huge values once images shift).
    uint8 pixels: the statistics of their [0, 1] values, in chunks (data/images.py)."""
    if x.dtype == torch.uint8:
        from dist_train.data.images import pixel_stats

        return pixel_stats(x[i : i + 4096] for i in range(0, len(x), 4096))
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    mean, std = x.mean(dims, keepdim=x.dim() == 4), x.std(dims, keepdim=x.dim() == 4)
    if x.dim() == 4:
        mean, std = mean[0], std[0]
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def load_source(source: str, cfg: DataConfig, key: str = "data.source"):
    """The table behind one `kind:location` source string (`key` names it in errors): a
    `datasets.Dataset`, a pyarrow Table (parquet) or a MemoryFrame (decoded images), all read
    through `column_names`, `num_rows` and `_column`."""
    kind, _, loc = source.partition(":")
    if not loc:
        raise UserError(
            f"{key} `{source}`: expected KIND:LOCATION, e.g. sklearn:digits, "
            "csv:data/train.csv, imagefolder:data/images."
        )
    if kind == "sklearn":
        return _sklearn(loc, f"{key} `{source}`")
    if kind == "python":  # what dist_train.fit records for the objects it was given
        raise UserError(
            f"{key} `{source}`: python: data comes only from dist_train.fit(train_data=...); "
            "in a recipe file use csv:, parquet:, json:, disk:, imagefolder:, hub: or sklearn:."
        )
    if kind == "parquet" and not Path(loc).is_file():  # a directory of shards or a glob
        from dist_train.data.arrow import parquet_files, read_parquet

        table = read_parquet(parquet_files(loc, key))
        if table.num_rows == 0:
            raise UserError(f"{key} `{source}`: {loc} has no rows; add data rows or fix {key}.")
        return table
    if kind in FILE_KINDS:
        if not Path(loc).is_file():
            raise UserError(
                f"{key} `{source}`: file {loc} not found; check the path "
                "(relative paths are from the current directory)."
            )
        try:
            table = _read_file(kind, loc)
        except Exception as err:  # parse errors from pyarrow/pandas carry the useful detail
            if _no_data_lines(loc, kind):  # datasets words this as an empty "split"
                table = None
            else:
                raise UserError(
                    f"{key} `{source}`: cannot parse {loc} as {kind}: "
                    f"{str(err).splitlines()[0][:200]}"
                ) from None
        if table is None or table.num_rows == 0:
            what = "a header but no rows" if kind == "csv" else "no rows"
            raise UserError(f"{key} `{source}`: {loc} has {what}; add data rows or fix {key}.")
        return table
    if kind == "disk":
        return _from_disk(loc, cfg.split, f"{key} `{source}`")
    if kind == "imagefolder":
        from dist_train.data.images import load_imagefolder
        from dist_train.data.lazy import default_workers

        workers = default_workers(cfg, decode=True).num_workers  # decoded in parallel, as lazily
        return load_imagefolder(loc, cfg, f"{key} `{source}`", workers)
    if kind == "hub":
        import datasets

        datasets.disable_progress_bars()
        return datasets.load_dataset(loc, split=cfg.split)
    close = difflib.get_close_matches(kind, ["sklearn", *FILE_KINDS, "disk", "imagefolder", "hub"])
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise UserError(
        f"{key} `{source}`: unknown kind `{kind}`.{hint} Use sklearn, csv, "
        "parquet, json, disk, imagefolder or hub."
    )


def _read_file(kind: str, loc: str):
    if kind == "parquet":
        # A local parquet file is already arrow: pyarrow (the reader `datasets` itself uses for
        # it) gives the same table directly, without importing `datasets` (~0.9 s before the
        # first step) or writing a second copy into its cache.
        from dist_train.data.arrow import read_parquet

        return read_parquet([loc])
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(kind, data_files=loc, split="train")


def _no_data_lines(loc: str, kind: str) -> bool:
    """Whether a csv holds at most its header line, or a json file nothing but `[]`/blanks."""
    with open(loc, errors="replace") as f:
        lines = [line.strip() for line in itertools.islice(f, 1000)]
    lines = [line for line in lines if line]
    if kind == "csv":
        return len(lines) <= 1
    return kind == "json" and "".join(lines) in ("", "[]")


def _sklearn(name: str, source: str):
    if name not in SKLEARN_SETS:
        raise UserError(f"{source}: scikit-learn ships {', '.join(SKLEARN_SETS)}.")
    import pyarrow as pa
    import sklearn.datasets

    frame = getattr(sklearn.datasets, f"load_{name}")(as_frame=True).frame
    # An Arrow table, as a parquet source reads into: the same columns and types as
    # `datasets.Dataset.from_pandas` (which converts through the same call), without importing
    # `datasets` (~0.5 s of every run on these tables beyond pyarrow and pandas, measured).
    return pa.Table.from_pandas(frame, preserve_index=False)


def _from_disk(loc: str, split: str, source: str):
    import datasets

    if not Path(loc).is_dir():
        raise UserError(
            f"{source}: directory {loc} not found (expected the output of datasets' save_to_disk)."
        )
    ds = datasets.load_from_disk(loc)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"data.split `{split}`: {loc} has splits {list(ds)}.")
        ds = ds[split]
    return ds


def column(frame, name: str, source: str) -> np.ndarray:
    """One column of a loaded source as a numpy array (a missing name is a UserError with a
    "did you mean"); for the target readers outside this module (data/multilabel.py)."""
    return _column(frame, name, source)


def _column(frame, name: str, source: str, copy: bool = True) -> np.ndarray:
    if name not in frame.column_names:
        close = difflib.get_close_matches(name, frame.column_names, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise UserError(
            f"column `{name}` not in {source}; {hint}columns: {', '.join(frame.column_names[:20])}"
        )
    # Through arrow in one call: `frame[name]` is a lazy Column whose iteration formats one
    # row at a time (~35 us/row: minutes for 200k rows x 32 columns before the first step).
    arrow = getattr(frame, "with_format", None)  # a datasets.Dataset (images: a MemoryFrame)
    if arrow is not None or hasattr(frame, "schema"):  # ... or a pyarrow Table (parquet)
        chunks = arrow("arrow")[name] if arrow is not None else frame[name]
        if _numeric(chunks):  # straight into numpy (NaN for nulls), no Python object per row
            if chunks.null_count == 0 and getattr(chunks, "num_chunks", 1) > 1:
                return _filled(chunks)
            values = chunks.to_numpy()  # may be a read-only view of arrow's buffers
            return np.array(values) if copy else values
        values = chunks.to_pylist()
    else:
        values = frame[name]
    col = np.asarray(values)
    if (
        col.dtype == object
        and any(v is None for v in col)
        and all(v is None or parses_as_number(v) for v in col)
    ):
        # Empty cells arrive as None (an object array): numbers with NaN, so the missing-value
        # checks name the row instead of calling the column non-numeric or None a class.
        col = np.array([np.nan if v is None else v for v in col], dtype=np.float64)
    return col


def _filled(chunks) -> np.ndarray:
    """A many-chunk column (one per record batch of a shard directory) copied chunk by chunk
    into one array: `ChunkedArray.to_numpy` first concatenates the chunks in Arrow's pool,
    which keeps the memory after the copy (measured on a lazy load of 5.2M int64 targets:
    +65 MiB of anonymous memory before the copy, 42 MiB after with this)."""
    out = np.empty(len(chunks), dtype=chunks.type.to_pandas_dtype())
    at = 0
    for part in chunks.chunks:
        out[at : at + len(part)] = part.to_numpy(zero_copy_only=False)
        at += len(part)
    return out


def _numeric(chunks) -> bool:
    """Numbers arrow converts exactly: ints and floats (nulls become NaN), booleans without
    nulls (with nulls numpy would get an object array: the slow path handles those)."""
    import pyarrow as pa

    kind = chunks.type
    if pa.types.is_boolean(kind):
        return chunks.null_count == 0
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _encode_targets(y: np.ndarray, cfg: DataConfig, extra, classes=None):
    """(classes, encoded targets, row mask) — label encoding, `data.classes` filtering, checks."""
    keep = np.ones(len(y), dtype=bool)
    missing = [i for i, v in enumerate(y.tolist()) if v is None][:1] if y.dtype == object else []
    if missing:
        raise UserError(
            f"data.target `{cfg.target}` is missing in row {missing[0]}; every row needs a label."
        )
    if cfg.task == "regression":
        yf = _numeric_target(y, cfg)
        return None, torch.from_numpy(yf.astype(np.float32)), torch.from_numpy(keep)
    if y.dtype.kind == "f":
        if np.isnan(y).any():
            raise UserError(
                f"data.target `{cfg.target}` is NaN in row {int(np.isnan(y).argmax())};"
                " every row needs a label."
            )
        if np.all(y == np.round(y)):
            y = y.astype(np.int64)
    if classes is None:
        classes = _class_list(y, cfg, extra)
        if cfg.classes is not None:
            _check_classes_present(y, cfg)
    codes = _integer_codes(y, classes)
    if codes is not None:  # integer labels and classes: no Python object per row (below)
        if cfg.classes is not None:
            keep = codes >= 0
        outside = keep & (codes < 0)
        if outside.any():
            row = int(outside.argmax())
            raise UserError(
                f"data.target `{cfg.target}`: row {row} has label {y[row].item()!r} outside "
                f"the {len(classes)} classes {classes[:10]}; fix the label or data.num_classes."
            )
        kept = codes if keep.all() else codes[keep]
        return classes, torch.from_numpy(kept.astype(np.int64)), torch.from_numpy(keep)
    if cfg.classes is not None:
        # A set, not np.isin: np.isin would cast 'cat' to the labels' integer dtype and fail.
        wanted = set(classes)
        keep = np.fromiter((v in wanted for v in y.tolist()), dtype=bool, count=len(y))
    index = {c: i for i, c in enumerate(classes)}
    unknown = [(i, v) for i, v in enumerate(y.tolist()) if keep[i] and v not in index][:1]
    if unknown:
        row, val = unknown[0]
        raise UserError(
            f"data.target `{cfg.target}`: row {row} has label {val!r} outside the "
            f"{len(classes)} classes {classes[:10]}; fix the label or data.num_classes."
        )
    enc = np.fromiter((index[v] for v in y[keep].tolist()), dtype=np.int64, count=int(keep.sum()))
    return classes, torch.from_numpy(enc), torch.from_numpy(keep)


def _integer_codes(y: np.ndarray, classes: list) -> np.ndarray | None:
    """Each integer label's position in `classes` (-1: not a class), vectorised; None unless
    labels and classes are all integers. The per-row Python path below builds lists of every
    label (`tolist`: ~36 bytes and ~0.1 us a row, 190 MiB transient for 5.2M rows on the lazy
    path, whose memory is otherwise 16 bytes a row). Small non-negative classes (the usual
    0..K-1) go through a lookup table: one int32 array, no other per-row temporary."""
    if y.dtype.kind not in "iu" or not classes or not len(y):
        return None
    if not all(isinstance(c, int | np.integer) and not isinstance(c, bool) for c in classes):
        return None
    values = np.asarray(classes, dtype=np.int64)
    top = int(values.max())
    if int(values.min()) >= 0 and top < 1 << 20 and int(y.min()) >= 0 and int(y.max()) <= top:
        table = np.full(top + 1, -1, dtype=np.int32)
        table[values] = np.arange(len(values), dtype=np.int32)
        return table[y]
    order = np.argsort(values, kind="stable")
    pos = np.minimum(np.searchsorted(values[order], y), len(values) - 1)
    return np.where(values[order][pos] == y, order[pos], -1)


def _check_classes_present(y: np.ndarray, cfg: DataConfig) -> None:
    """Every label in `data.classes` must occur in the training source: otherwise the filter
    silently drops those rows (all of them, if none matches) and the run fails later, far from
    the cause."""
    present = _distinct(y)
    missing = [c for c in cfg.classes if c not in present]
    if missing:
        shown = sorted(present, key=lambda v: (str(type(v)), v))
        labels = ", ".join(map(str, shown[:20])) + (", ..." if len(shown) > 20 else "")
        verb = "matches" if len(missing) == 1 else "match"
        raise UserError(
            f"data.classes {list(cfg.classes)}: {', '.join(map(str, missing))} {verb} no row "
            f"of data.target `{cfg.target}` in {cfg.source} (labels present: {labels}); list "
            "labels that occur there, written as in the file (1 and '1' differ)."
        )


def _distinct(labels: np.ndarray) -> set:
    """The distinct labels; numbers through np.unique, not a Python list of every row."""
    return set((np.unique(labels) if labels.dtype.kind in "iub" else labels).tolist())


def _class_list(y: np.ndarray, cfg: DataConfig, extra) -> list:
    if cfg.classes is not None:
        return list(cfg.classes)
    if cfg.num_classes and y.dtype.kind in "iu":
        return list(range(cfg.num_classes))
    seen = _distinct(y) | (_distinct(extra) if extra is not None else set())
    classes = sorted(seen, key=lambda v: (str(type(v)), v))
    want = 2 if cfg.task == "binary" else cfg.num_classes
    if want and len(classes) != want:
        raise UserError(
            f"data.target `{cfg.target}`: found {len(classes)} distinct labels "
            f"{classes[:10]} but the task needs {want}; check data.task/num_classes."
        )
    if len(classes) < 2:
        raise UserError(f"data.target `{cfg.target}`: only one label {classes}; need at least 2.")
    return [c.item() if hasattr(c, "item") else c for c in classes]


def _numeric_target(y: np.ndarray, cfg: DataConfig) -> np.ndarray:
    if y.dtype.kind not in "iuf":
        raise UserError(f"data.target `{cfg.target}` is not numeric but data.task is regression.")
    y = y.astype(np.float64)
    if np.isnan(y).any():
        raise UserError(f"data.target `{cfg.target}` is NaN in row {int(np.isnan(y).argmax())}.")
    return y


def split_rows(n: int, valid_fraction: float, test_fraction: float, seed: int):
    """(train, valid or None, test or None) row positions, decided on row ids before anything
    is fitted: one seeded permutation, its first `test_fraction` the test rows, the next
    `valid_fraction` (of all rows) the validation rows, the rest training rows."""
    perm, n_test, n_valid = split_permutation(n, valid_fraction, test_fraction, seed)
    if perm is None:
        return torch.arange(n), None, None  # no split: the file's order
    test = perm[:n_test] if n_test else None
    valid = perm[n_test : n_test + n_valid] if n_valid else None
    return perm[n_test + n_valid :], valid, test


def split_permutation(
    n: int, valid_fraction: float, test_fraction: float, seed: int, dtype=torch.int64
) -> tuple[torch.Tensor | None, int, int]:
    """(the seeded permutation of `split_rows`, or None without a split; rows of the test and
    the validation split at its start). `dtype` int32 draws the same permutation in half the
    memory (the lazy path's load under 2^31 rows)."""
    n_test = max(1, round(n * test_fraction)) if test_fraction else 0
    n_valid = max(1, round(n * valid_fraction)) if valid_fraction else 0
    if n_test + n_valid == 0:
        return None, 0, 0
    if n_test + n_valid >= n:
        raise UserError(
            f"data.valid_fraction {valid_fraction} and data.test_fraction {test_fraction} "
            f"leave none of the {n} rows for training; lower them or add rows."
        )
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen, dtype=dtype), n_test, n_valid


def split_order(n: int, fraction: float, seed: int):
    """(train rows, valid rows or None) of `split_rows` without a test split, for the lazy path
    (data/lazy.py): both paths hold the same rows in the same order."""
    train, valid, _ = split_rows(n, fraction, 0.0, seed)
    return train, valid


def load_table(
    source: str,
    cfg: DataConfig,
    classes: list | None,
    feature_names: list[str],
    require_target: bool = True,
    encoder: TableEncoder | None = None,
    what: str | None = None,
) -> tuple[Table, bool]:
    """Another file with the recipe's columns and class encoding (eval/predict `--data`), its
    table columns encoded by the run's `encoder` (fitted on the training split). Returns the
    table and whether it had targets (predict accepts files without them); a `LazyTable` when
    data.mode (auto: the size of this file) says lazy. `what` names the table in its note
    (default `--data SOURCE`; the stream path's `valid source` / `test source`)."""
    from dist_train.data.lazy import choose_mode, load_lazy_table

    alone = {"source": source, "valid_source": None, "test_source": None}
    if choose_mode(cfg.model_copy(update=alone)).mode == "lazy":
        return load_lazy_table(source, cfg, classes, feature_names, require_target, encoder, what)
    frame = load_source(source, cfg, key="--data")
    if cfg.text is not None or "__image__" in frame.column_names:
        x = _tokens(frame, cfg, source) if cfg.text is not None else _features(frame, [], cfg)
        rows, note = np.arange(len(x)), None
    else:
        encoder = encoder or TableEncoder.fit(frame, feature_names, cfg.missing, cfg.categorical)
        arrow = as_arrow(frame, encoder.names, f"--data {source}")
        x, kept, counts = encoder.encode(arrow, f"--data {source}")
        labelled = class_rows(frame, cfg, source, classes)
        if labelled is not None:  # counted over the rows evaluated, as the training source's
            import pyarrow as pa

            counts = encoder.encode(arrow.filter(pa.array(labelled)), f"--data {source}")[2]
        rows, note = np.nonzero(kept)[0], counts_note(counts, source, what)
        x = _shaped(torch.from_numpy(x), cfg)
    targets = cfg.target if isinstance(cfg.target, list) else [cfg.target]
    if not require_target and not set(targets) & set(frame.column_names):
        shape = (len(x), len(classes)) if cfg.task == "multilabel" else (len(x),)
        return Table(x, torch.zeros(shape, dtype=torch.int64), rows, note), False
    if cfg.task == "multilabel":
        from dist_train.data.multilabel import label_matrix

        return Table(x, label_matrix(frame, cfg, source, classes)[1][rows], rows, note), True
    y_raw = _column(frame, cfg.target, source)[rows]
    if cfg.task == "regression":
        y = torch.from_numpy(_numeric_target(y_raw, cfg).astype(np.float32))
        return Table(x, y, rows, note), True
    _, y, keep = _encode_targets(y_raw, cfg, None, classes)
    keep = keep.numpy()
    return Table(x[torch.from_numpy(keep)], y, rows[keep], note), True


def class_rows(frame, cfg: DataConfig, source: str, classes: list | None) -> np.ndarray | None:
    """bool [rows]: the rows whose label `data.classes` keeps (another file's rows, before
    any feature gap is looked at: what its counts are taken over, as the memory path counts
    the training source's); None when no class filter applies or the file has no targets."""
    if cfg.classes is None or cfg.task not in ("binary", "multiclass"):
        return None
    if cfg.target not in frame.column_names:
        return None
    _, _, keep = _encode_targets(_column(frame, cfg.target, source), cfg, None, classes)
    keep = keep.numpy()
    return None if keep.all() else keep


def counts_note(counts, source: str, what: str | None) -> str | None:
    """What encoding a `load_table` file counted: one line `--data SOURCE: ...`, or with `what`
    (the stream path's `valid source` / `test source`) the lines the memory path's bundle
    writes for such a source (its data.missing drop line first), joined by newlines."""
    if what is None:
        return counts.describe(f"--data {source}")
    lines = []
    if counts.dropped:
        lines.append(f"data.missing drop: {counts.dropped} rows of {source} left out")
        counts.dropped = 0
    lines.append(counts.describe(what))
    return "\n".join(line for line in lines if line) or None


# The memory path's readers and target encoding, shared by the lazy path (data/lazy.py,
# data/arrow.py) so both read and encode alike.
from_disk = _from_disk
encode_targets = _encode_targets
numeric_target = _numeric_target
