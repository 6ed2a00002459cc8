"""dist_train.fit's datasets -> the in-memory tables every other source becomes.

A Hugging Face `datasets.Dataset` is a table already: its columns go through the recipe's
`data.features` / `data.target` like a csv file's. A torch map-style `Dataset` whose items are
`(x, y)` is read once, item by item, and its x stacked into one float32 tensor: it is
materialised in memory (data larger than memory needs the lazy path, a separate feature).
Labels are encoded as for any source (sorted distinct values -> 0..K-1; `data.num_classes`
keeps integer labels 0..K-1 as they are).
"""

from __future__ import annotations

import numpy as np
import torch

from dist_train.config.schema import DataConfig
from dist_train.data.images import MemoryFrame
from dist_train.data.sources import DataBundle, load_data
from dist_train.errors import UserError


def load_python_data(cfg: DataConfig, seed: int, train, valid) -> DataBundle:
    vframe = None if valid is None else _frame(valid, cfg, "valid_data")
    frames = (_frame(train, cfg, "train_data"), vframe)
    return load_data(cfg, seed, frames=frames)


def _frame(data, cfg: DataConfig, arg: str):
    if _is_hf_dataset(data):
        return data
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise UserError(
            f"fit({arg}=...): expected a torch map-style Dataset returning (x, y) or a "
            f"datasets.Dataset, got {type(data).__name__}."
        )
    if len(data) == 0:
        raise UserError(f"fit({arg}=...): the dataset is empty.")
    xs, ys = [], []
    for i in range(len(data)):
        item = data[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise UserError(
                f"fit({arg}=...): item {i} is a {type(item).__name__}, not an (x, y) pair; "
                "return (features, label) from __getitem__."
            )
        x, y = item
        xs.append(np.atleast_1d(np.asarray(_host(x), dtype=np.float32)))
        ys.append(_label(_host(y), arg, i))
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise UserError(f"fit({arg}=...): items have different x shapes {sorted(shapes)[:3]}.")
    # the already-array column (as decoded images): stacked as it is, no per-column parsing
    return MemoryFrame({"__image__": xs, cfg.target: np.asarray(ys)})


def _is_hf_dataset(data) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


def _host(v):
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v


def _label(y, arg: str, i: int):
    arr = np.asarray(y)
    if arr.size != 1:
        raise UserError(
            f"fit({arg}=...): item {i} has a label of shape {list(arr.shape)}; one class index "
            "or one number per item is supported."
        )
    return arr.reshape(()).item()
