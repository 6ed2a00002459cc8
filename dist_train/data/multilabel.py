"""Multi-label targets -> an int64 [N, L] 0/1 matrix and the label names.

Two layouts: several 0/1 columns (`data.target: [a, b, c]`, the labels are the columns), or
one column holding a list per row: 0/1 indicators of one length (labels `<column>_0..`), or
label names such as `[cat, dog]` (labels: `data.classes` in that order, else the sorted names
seen). A list of only 0s and 1s, all of one length, is read as indicators.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_train.errors import UserError


def label_matrix(frame, cfg, source: str, names: list | None = None) -> tuple[list, torch.Tensor]:
    """(label names, [N, L] int64 targets). `names` (from the training source) fixes the
    labels of a validation or prediction file."""
    from dist_train.data.sources import column

    if isinstance(cfg.target, list):
        cols = [_zero_one(column(frame, c, source), f"data.target `{c}`") for c in cfg.target]
        return list(cfg.target), torch.from_numpy(np.stack(cols, 1))
    values = _list_values(frame, cfg.target, source)
    where = f"data.target `{cfg.target}` in {source}"
    bad = next((i for i, v in enumerate(values) if not isinstance(v, (list, tuple))), None)
    if bad is not None:
        raise UserError(
            f"{where}: row {bad} holds {values[bad]!r}, not a list; data.task multilabel needs "
            "a list of 0/1 columns (data.target: [a, b, c]) or one column of lists."
        )
    if _indicators(values) and not cfg.classes:
        width = len(values[0])
        labels = names or [f"{cfg.target}_{j}" for j in range(width)]
        if len(labels) != width:
            raise UserError(f"{where}: rows hold {width} indicators; training had {len(labels)}.")
        return labels, torch.tensor(values, dtype=torch.int64).reshape(len(values), width)
    return _tags(values, cfg, where, names)


def _list_values(frame, name: str, source: str) -> list:
    """A column's values as Python objects: lists of different lengths would not make the
    numpy array `column` returns."""
    from dist_train.data.sources import column

    if name not in frame.column_names:
        column(frame, name, source)  # raises its "not in ...; did you mean" message
    arrow = getattr(frame, "with_format", None)  # a datasets.Dataset, else a pyarrow Table
    if arrow is not None:
        return arrow("arrow")[name].to_pylist()
    column = frame[name]
    return column.to_pylist() if hasattr(column, "to_pylist") else list(column)


def _indicators(values: list) -> bool:
    width = len(values[0]) if values else 0
    return width > 0 and all(
        len(v) == width and all(x in (0, 1) and not isinstance(x, str) for x in v) for v in values
    )


def _tags(values: list, cfg, where: str, names: list | None) -> tuple[list, torch.Tensor]:
    """Label-name lists -> multi-hot rows over `names`, `data.classes` or the sorted names."""
    labels = names or (list(cfg.classes) if cfg.classes else None)
    if labels is None:
        seen = {t for v in values for t in v}
        labels = sorted(seen, key=lambda t: (str(type(t)), t))
    if len(labels) < 2:
        raise UserError(f"{where}: only {len(labels)} label(s) {labels}; multilabel needs 2+.")
    index = {t: j for j, t in enumerate(labels)}
    y = torch.zeros(len(values), len(labels), dtype=torch.int64)
    for i, tags in enumerate(values):
        for t in tags:
            if t not in index:
                raise UserError(
                    f"{where}: row {i} has label {t!r} outside the labels {labels[:10]}; fix "
                    "the row or data.classes."
                )
            y[i, index[t]] = 1
    return labels, y


def _zero_one(col: np.ndarray, what: str) -> np.ndarray:
    """A 0/1 column (ints, booleans or whole floats) as int64; anything else names the row."""
    if col.dtype == bool:
        return col.astype(np.int64)
    ok = np.issubdtype(col.dtype, np.number) and np.isin(col, (0, 1))
    if not np.all(ok):
        row = int(np.argmin(ok)) if np.ndim(ok) else 0
        value = col[row].item() if isinstance(col[row], np.generic) else col[row]
        raise UserError(
            f"{what}: row {row} holds {value!r}; multilabel targets are 0/1 (one column per label)."
        )
    return col.astype(np.int64)
