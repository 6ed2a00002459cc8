"""Image folders (`root/<class>/<file>`) through datasets' imagefolder builder -> pixel arrays."""

from __future__ import annotations

import io

import numpy as np

from dist_train.config.schema import DataConfig
from dist_train.errors import UserError


class MemoryFrame:
    """The few `datasets.Dataset` accessors sources.py uses, over arrays already in memory."""

    def __init__(self, columns: dict[str, object]) -> None:
        self._columns = columns
        self.column_names = list(columns)
        self.num_rows = len(next(iter(columns.values())))

    def __getitem__(self, name: str):
        return self._columns[name]


def load_imagefolder(root: str, cfg: DataConfig, source: str) -> MemoryFrame:
    """Decode every image once (named in the error if unreadable) to float [C, H, W] in [0, 1]."""
    from pathlib import Path

    import datasets
    from PIL import Image, UnidentifiedImageError

    if not Path(root).is_dir():
        raise UserError(f"{source}: directory {root} not found.")
    ds = datasets.load_dataset("imagefolder", data_dir=root, split=cfg.split)
    names = ds.features["label"].names if "label" in ds.features else None
    ds = ds.cast_column("image", datasets.Image(decode=False))
    mode = "L" if cfg.channels == 1 else "RGB"
    pixels, size = [], cfg.image_size
    for item in ds["image"]:
        where = item.get("path") or "an image"
        try:
            img = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
            img = img.convert(mode)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(
                f"{source}: cannot read image {where} ({err}); remove or replace the file."
            ) from None
        if size is None:
            size = (img.height, img.width)
        if (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        pixels.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    labels = np.asarray(ds["label"]) if "label" in ds.column_names else np.zeros(len(pixels))
    if names:
        labels = np.asarray([names[i] for i in labels])
    return MemoryFrame({"__image__": pixels, cfg.target: labels})
