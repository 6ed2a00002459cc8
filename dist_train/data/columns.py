"""Feature columns as users have them -> float32 features: numbers, booleans, categories, gaps.

`TableEncoder.fit` learns, from the TRAINING rows only, what each feature column is and how it
is encoded: numbers pass through, booleans become 0/1, string (or `data.categorical`) columns
become a one-hot block or one integer code, and missing cells follow `data.missing` (error, drop
the row, or impute the training mean / most frequent category). `transform` then applies exactly
that to any rows: the rest of the training file, validation, test, `eval`/`predict --data`, or
one Arrow record batch at a time (the lazy path). The fitted encoder is plain JSON
(`to_json`/`from_json`), stored in the run directory as `columns.json`.

A category the training rows never had ("unseen": a value only in the validation rows, or a new
one at predict time) is never an error: one-hot gives it an all-zero block, codes give it 0 (the
reserved unknown code; known categories are 1..K). Every transform counts unseen and imputed
cells per column (`counts`), so callers can print them.

Per Arrow record batch (the lazy path), with `names` the feature columns:
  scan once:  `gaps(batch, names, missing, categorical, source, row_offset)` -> bool [n] rows
              with a gap (under `error` the first one raises, naming its file row);
  fit once:   `TableEncoder.fit_batches(training_batches, names, missing, categorical, source)`
              (only the training split's rows, in any batching: counts and sums);
  each batch: `encoder.encode(batch, source, row_offset)` -> (float32 [n_kept, F], kept mask
              [n], Counts), or `encoder.transform(batch)` for the features alone.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dist_train.errors import UserError

COLUMNS_FILE = "columns.json"  # the fitted encoder, in the run directory
MAX_AUTO_CATEGORIES = 1000  # a string column with more distinct values is likely an id or text
ROW_BLOCK = 65_536  # rows encoded at a time (the output is filled block by block)


@dataclass
class Column:
    """How one input column becomes features."""

    name: str
    kind: str  # "number" | "bool" | "category"
    encoding: str = "value"  # number/bool: "value"; category: "onehot" | "codes"
    vocab: list[str] = field(default_factory=list)  # categories (as strings), sorted
    fill: float | str | None = None  # impute: train mean (number/bool) or mode (category)

    @property
    def width(self) -> int:
        return len(self.vocab) if self.encoding == "onehot" else 1

    def output_names(self) -> list[str]:
        if self.encoding == "onehot":
            return [f"{self.name}={v}" for v in self.vocab]
        return [self.name]


@dataclass
class Counts:
    """Cells a transform had to treat specially, per column; rows dropped (data.missing drop)."""

    rows: int = 0
    dropped: int = 0
    imputed: dict[str, int] = field(default_factory=dict)
    unseen: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        self.rows += other.rows
        self.dropped += other.dropped
        for mine, theirs in ((self.imputed, other.imputed), (self.unseen, other.unseen)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def describe(self, what: str) -> str | None:
        """One line for the plan/notes, or None when nothing happened."""
        parts = []
        if self.dropped:
            parts.append(f"{self.dropped} of {self.rows} rows dropped for missing features")
        if self.imputed:
            cells = ", ".join(f"{k} {v}" for k, v in self.imputed.items())
            parts.append(f"imputed cells: {cells}")
        if self.unseen:
            cells = ", ".join(f"{k} {v}" for k, v in self.unseen.items())
            parts.append(f"categories unseen in training (encoded as unknown): {cells}")
        return f"{what}: " + "; ".join(parts) if parts else None


@dataclass
class TableEncoder:
    """Fitted column encoders; `transform` works on a pyarrow Table/RecordBatch, a
    `datasets.Dataset` or any frame with `column_names` and `frame[name]`."""

    columns: list[Column]
    missing: str = "error"  # data.missing: error | drop | impute

    # ---- fitting -----------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        frame,
        names: list[str],
        missing: str = "error",
        categorical: dict[str, str] | None = None,
        source: str = "data.source",
    ) -> TableEncoder:
        """Learn each column's kind, vocabulary and fill value from `frame`, which must hold
        the TRAINING rows only (rows missing under `drop` may still be in it: they are not
        counted in means, modes or vocabularies)."""
        fitter = Fitter(names, missing, categorical, source)
        fitter.update(frame)
        return fitter.result()

    @classmethod
    def fit_batches(
        cls,
        batches,
        names: list[str],
        missing: str = "error",
        categorical: dict[str, str] | None = None,
        source: str = "data.source",
    ) -> TableEncoder:
        """`fit` in one streaming pass over the training rows given as Arrow record batches
        (or tables): counts and sums only, never the whole split in memory."""
        fitter = Fitter(names, missing, categorical, source)
        for batch in batches:
            fitter.update(batch)
        return fitter.result()

    # ---- applying ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The input columns this encoder reads."""
        return [c.name for c in self.columns]

    @property
    def output_names(self) -> list[str]:
        """One name per output feature (`col=value` for one-hot blocks)."""
        return [n for c in self.columns for n in c.output_names()]

    @property
    def num_features(self) -> int:
        return sum(c.width for c in self.columns)

    def code_columns(self) -> list[tuple[int, int]]:
        """(output position, number of training categories) of each `codes` column."""
        out, j = [], 0
        for col in self.columns:
            if col.encoding == "codes":
                out.append((j, len(col.vocab)))
            j += col.width
        return out

    def missing_rows(self, frame, source: str = "data", row_offset: int = 0) -> np.ndarray:
        """bool [n]: rows with any missing feature cell (null, or NaN in a number column).
        Under `error` the first one is a UserError naming its row (+ `row_offset`) and column."""
        table = as_arrow(frame, self.names, source)
        any_missing = np.zeros(table.num_rows, dtype=bool)
        for col in self.columns:
            miss = _missing(table.column(col.name), col)
            if self.missing == "error" and miss.any():
                raise missing_cell(col.name, int(miss.argmax()) + row_offset, source)
            any_missing |= miss
        return any_missing

    def transform(self, frame, source: str = "data", row_offset: int = 0) -> np.ndarray:
        """float32 [n_kept, num_features] of `frame` (a whole table or one Arrow batch); under
        `drop` the rows `missing_rows` flags are left out. Counts go to `self.last_counts`."""
        x, _, counts = self.encode(frame, source, row_offset)
        self.last_counts = counts
        return x

    def encode(
        self, frame, source: str = "data", row_offset: int = 0
    ) -> tuple[np.ndarray, np.ndarray, Counts]:
        """(features of the kept rows, bool [n] mask of the kept rows, counts)."""
        table = as_arrow(frame, self.names, source)
        n = table.num_rows
        counts = Counts(rows=n)
        keep = ~self.missing_rows(table, source, row_offset)  # error: raises on the first gap
        if self.missing != "drop":
            keep[:] = True
        counts.dropped = int(n - keep.sum())
        out = np.empty((int(keep.sum()), self.num_features), dtype=np.float32)
        done = 0
        # Row blocks: each column is written contiguously into a [features, rows] block, which
        # goes into the row-major output with one transposing copy (3x faster than strided
        # column writes), and peak memory stays the output plus one block.
        for start in range(0, n, ROW_BLOCK):
            part, mask = table.slice(start, ROW_BLOCK), keep[start : start + ROW_BLOCK]
            block = np.empty((self.num_features, int(mask.sum())), dtype=np.float32)
            j = 0
            for col in self.columns:
                block[j : j + col.width], imputed, unseen = _encode_column(
                    part.column(col.name), col, mask
                )
                j += col.width
                if imputed:
                    counts.imputed[col.name] = counts.imputed.get(col.name, 0) + imputed
                if unseen:
                    counts.unseen[col.name] = counts.unseen.get(col.name, 0) + unseen
            out[done : done + block.shape[1]] = block.T
            done += block.shape[1]
        return out, keep, counts

    # ---- storage -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(
            {"missing": self.missing, "columns": [asdict(c) for c in self.columns]}, indent=1
        )

    @classmethod
    def from_json(cls, text: str) -> TableEncoder:
        data = json.loads(text)
        return cls([Column(**c) for c in data["columns"]], data["missing"])

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / COLUMNS_FILE
        path.write_text(self.to_json() + "\n")
        return path


class Fitter:
    """Running statistics of the training rows' feature columns (`TableEncoder.fit*`): per
    number/boolean column the sum and count of present values, per category column the count
    of each value. `update` per table or Arrow batch, then `result`."""

    def __init__(
        self, names: list[str], missing: str, categorical: dict[str, str] | None, source: str
    ) -> None:
        self.categorical = categorical or {}
        unknown = [c for c in self.categorical if c not in names]
        if unknown:
            raise UserError(
                f"data.categorical: column `{unknown[0]}` is not a feature column "
                f"(features: {', '.join(names[:20])}); remove it or add it to data.features."
            )
        self.names, self.missing, self.source = names, missing, source
        self.kinds: dict[str, str | None] = dict.fromkeys(names)  # None: only nulls so far
        self.sums = dict.fromkeys(names, 0.0)  # float64 sums of present values
        self.counts = dict.fromkeys(names, 0)
        self.values: dict[str, Counter] = {n: Counter() for n in names}

    def update(self, frame) -> None:
        import pyarrow as pa

        table = as_arrow(frame, self.names, self.source)
        for name in self.names:
            arr = table.column(name)
            if pa.types.is_null(arr.type):
                continue  # no value in these rows: no kind, no statistics
            kind = _kind(arr.type, name, self.source)
            if name in self.categorical:
                kind = "category"
            seen = self.kinds[name]
            if seen is not None and seen != kind:
                raise UserError(
                    f"data.features: column `{name}` of {self.source} holds {seen} values in "
                    f"some rows and {kind} values in others; make the column one type."
                )
            self.kinds[name] = kind
            if kind == "category":
                strings = _strings(arr)
                self.values[name].update(v for v in strings.to_pylist() if v is not None)
            else:
                values = float_values(arr)
                present = values[~np.isnan(values)]
                self.sums[name] += float(present.sum(dtype=np.float64))
                self.counts[name] += len(present)

    def result(self) -> TableEncoder:
        cols = []
        for name in self.names:
            kind = self.kinds[name] or (
                "category" if name in self.categorical else "number"
            )  # a column empty in every training row: number (imputing it is refused below)
            if kind == "category":
                cols.append(self._category(name))
                continue
            fill = None
            if self.missing == "impute":
                if not self.counts[name]:
                    raise UserError(
                        f"data.missing impute: feature `{name}` has no value in any training "
                        f"row of {self.source}, so there is nothing to impute from; leave it "
                        "out of data.features."
                    )
                mean = self.sums[name] / self.counts[name]
                # booleans: the more frequent value (ties: 1), so an imputed flag stays 0/1
                fill = mean if kind == "number" else float(mean >= 0.5)
            cols.append(Column(name, kind, fill=fill))
        return TableEncoder(cols, self.missing)

    def _category(self, name: str) -> Column:
        counts, encoding = self.values[name], self.categorical.get(name)
        if encoding is None and len(counts) > MAX_AUTO_CATEGORIES:
            raise UserError(
                f"data.features: column `{name}` of {self.source} holds strings with "
                f"{len(counts)} distinct values in the training rows (an id or free text?); "
                f"list it in data.categorical (`{name}: onehot` or `{name}: codes`) to encode "
                "it anyway, or leave it out of data.features."
            )
        fill = None
        if self.missing == "impute":
            if not counts:
                raise UserError(
                    f"data.missing impute: feature `{name}` has no value in any training row "
                    f"of {self.source}; leave it out of data.features."
                )
            # the most frequent category; ties go to the first in sorted order (deterministic)
            fill = min(counts, key=lambda v: (-counts[v], v))
        return Column(name, "category", encoding or "onehot", sorted(counts), fill)


def find_saved(checkpoint: str) -> TableEncoder | None:
    """The encoder stored with a run: `columns.json` in the run directory that holds the
    model.safetensors / checkpoint directory `checkpoint` points at (None: not found)."""
    path = Path(checkpoint).resolve()
    for folder in [path, *path.parents][:4]:  # file -> run dir, or checkpoints/step-N -> run dir
        if (folder / COLUMNS_FILE).is_file():
            return TableEncoder.from_json((folder / COLUMNS_FILE).read_text())
    return None


def missing_cell(name: str, row: int, source: str) -> UserError:
    """The error of a missing feature cell under data.missing error (every path, found at
    load time: the memory path's encoding, the lazy path's scan or cache record)."""
    return UserError(
        f"data: feature `{name}` is missing/NaN in row {row} of {source}; set "
        "data.missing: drop (skip such rows) or impute (train mean/most frequent "
        "category), clean the file, or drop the column from data.features."
    )


def column_gaps(table) -> dict[str, tuple[int, int]]:
    """{column: (missing cells, first row with one)} of an Arrow table or record batch, for
    the columns with any: nulls, and NaN in float columns (what the encoders call missing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        if not col.null_count and not pa.types.is_floating(col.type):
            continue
        mask = pc.is_null(col, nan_is_null=True)
        cells = int(pc.sum(mask).as_py() or 0)
        if cells:
            out[name] = (cells, int(pc.index(mask, True).as_py()))
    return out


def gaps(
    frame,
    names: list[str],
    missing: str,
    categorical: dict | None,
    source: str,
    row_offset: int = 0,
) -> np.ndarray:
    """bool [n]: rows of `frame` (a table, or one Arrow batch whose first row is file row
    `row_offset`) with a missing feature cell, decided before any fitting (a cell is missing
    or not whatever the split); under `error` the first one is a UserError naming its row
    and column."""
    table = as_arrow(frame, names, source)
    kinds = [
        Column(
            n, "category" if n in (categorical or {}) else _kind(table.column(n).type, n, source)
        )
        for n in names
    ]
    return TableEncoder(kinds, missing).missing_rows(table, source, row_offset)


# ---- column helpers ----------------------------------------------------------------------


def as_arrow(frame, names: list[str], source: str):
    """The feature columns of `frame` as a pyarrow Table (or the RecordBatch itself)."""
    import pyarrow as pa

    have = list(frame.column_names) if not isinstance(frame, pa.RecordBatch) else frame.schema.names
    absent = [n for n in names if n not in have]
    if absent:
        close = difflib.get_close_matches(absent[0], have, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise UserError(
            f"column `{absent[0]}` not in {source}; {hint}columns: {', '.join(have[:20])}"
        )
    if isinstance(frame, pa.Table | pa.RecordBatch):
        return frame.select(names)
    if hasattr(frame, "with_format"):  # datasets.Dataset: its own arrow table, no row copies
        return frame.select_columns(names).with_format("arrow")[:]
    return pa.table({n: pa.array(np.asarray(frame[n]).tolist()) for n in names})


def plain_kinds(schema, names: list[str], cfg) -> dict[str, str] | None:
    """{column: "number" | "bool"} when every column of `names` in the Arrow `schema` is read
    as float32 as it is (integers, floats, booleans) and nothing needs fitting (data.missing
    error, no data.categorical); None otherwise. The one rule behind the plain encoder (no
    fitting pass) and the packed cache (row-major float32) of the lazy and stream paths."""
    if cfg.missing != "error" or cfg.categorical:
        return None
    kinds = {name: plain_kind(schema.field(name).type) for name in names}
    return None if None in kinds.values() else kinds


def plain_kind(kind) -> str | None:
    """ "bool" or "number" for an Arrow type read as float32 as it is; None for any other."""
    import pyarrow as pa

    if kind == pa.bool_():
        return "bool"
    return "number" if pa.types.is_integer(kind) or pa.types.is_floating(kind) else None


def plain_encoder(kinds: dict[str, str] | None) -> TableEncoder | None:
    """The encoder of `plain_kinds` (what `Fitter` would learn: no vocabulary, no fill
    value); None when a column needs fitting."""
    if kinds is None:
        return None
    return TableEncoder([Column(name, kind) for name, kind in kinds.items()], "error")


def _kind(kind, name: str, source: str) -> str:
    import pyarrow as pa

    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "number"
    if pa.types.is_null(kind):  # every training cell empty
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "category"
    if pa.types.is_dictionary(kind):
        return "category"
    raise UserError(
        f"data.features: column `{name}` of {source} holds {kind} values, neither numbers, "
        "booleans nor strings; leave it out of data.features (images: imagefolder:, text: "
        "data.text)."
    )


def float_values(arr) -> np.ndarray:
    """Float numpy of a number/bool/null column, nulls as NaN: float32/64 columns as they are
    (no cast), anything else as float64 (unchecked, as numpy would: huge ints round)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_float32(arr.type) or pa.types.is_float64(arr.type)):
        arr = pc.cast(arr, pa.float64(), safe=False)
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _strings(arr):
    """A category column as arrow strings (nulls stay null): ints, bools, dictionaries alike."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        arr = pc.cast(arr, arr.type.value_type)
    if pa.types.is_floating(arr.type):  # NaN is a missing cell, not a category "nan"
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    return pc.cast(arr, pa.string())


def _missing(arr, col: Column) -> np.ndarray:
    if col.kind == "category":
        return np.asarray(_strings(arr).is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return np.isnan(float_values(arr))


def _encode_column(arr, col: Column, keep: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(block [width, n_kept], imputed cells, unseen cells) of one column on the kept rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if col.kind != "category":
        values = float_values(arr)[keep]
        gaps = np.isnan(values)
        imputed = int(gaps.sum()) if col.fill is not None else 0
        if imputed:
            values[gaps] = col.fill
        return values[None, :], imputed, 0
    strings = _strings(arr)
    null = np.asarray(strings.is_null().to_numpy(zero_copy_only=False), dtype=bool)[keep]
    index = pc.index_in(strings, value_set=pa.array(col.vocab, pa.string()))
    # 1..K for known categories, 0 for unseen (and for missing cells, imputed below)
    codes = np.asarray(pc.fill_null(index, -1).to_numpy(zero_copy_only=False))[keep] + 1
    imputed = 0
    if col.fill is not None and null.any():
        codes[null] = col.vocab.index(col.fill) + 1
        imputed = int(null.sum())
    unseen = int(((codes == 0) & ~null).sum())
    if col.encoding == "codes":
        return codes[None, :], imputed, unseen
    block = np.zeros((len(col.vocab), len(codes)), dtype=np.float32)
    rows = np.nonzero(codes)[0]
    block[codes[rows] - 1, rows] = 1.0  # unseen: the all-zero column
    return block, imputed, unseen
