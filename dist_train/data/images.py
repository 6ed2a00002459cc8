"""Image folders (`root/<class>/<file>`): one scan, then per-sample decode to uint8 [C, H, W].

The scan (sorted file list, class from the first-level subfolder, a header check of every file)
happens once: its verdict is cached (data.cache_dir) under a key of every file's name, size and
mtime, so the other ranks and later runs only list and stat the files. Decoding is
`ImageFiles.fetch`, a row source: in DataLoader worker processes on the lazy path, and through
the same function (in workers too) when the memory path decodes the whole folder up front, so
both paths hold the very same bytes. Pixels stay uint8 until a batch reaches the model's
device: `unit_float` (x / 255, float32) is applied there, in the model's input adapter
(`Net.forward`) and, before it, wherever a batch is mixed or augmented.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_train.config.schema import DataConfig
from dist_train.errors import UserError

# What Pillow decodes and people keep in image folders (matched case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# JPEG draft mode (DCT-domain downscaling by 1/2, 1/4, 1/8) when the stored image is at least
# this many times the target size on both sides: decoding then reads a fraction of the data.
DRAFT_FACTOR = 2


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (x / 255, correctly rounded: the same values the
    float32 division of numpy gives); anything else unchanged. Runs on the batch's device."""
    if x.dtype != torch.uint8:
        return x
    return x.to(torch.float32) / 255


class MemoryFrame:
    """The few `datasets.Dataset` accessors sources.py uses, over arrays already in memory."""

    def __init__(self, columns: dict[str, object]) -> None:
        self._columns = columns
        self.column_names = list(columns)
        self.num_rows = len(next(iter(columns.values())))

    def __getitem__(self, name: str):
        return self._columns[name]


@dataclass(frozen=True)
class FolderScan:
    root: str  # the folder the paths are relative to
    files: tuple[str, ...]  # sorted by (class folder, path)
    labels: np.ndarray  # class folder name per file (str); "0" for files in the root itself
    size: tuple[int, int]  # (H, W) every image is decoded to


def scan_folder(root: str, cfg: DataConfig, source: str) -> FolderScan:
    """Files and classes, deterministic on every machine; every file's header opened once.

    The header check (`Image.open`: the first few hundred bytes, no pixels) catches what is
    not an image, empty files and cut-off headers before training; a body corrupted further in
    costs a full decode to find, so it is met in a worker mid-epoch (`data.on_bad_sample`)."""
    from PIL import Image, UnidentifiedImageError

    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{source}: directory {root} not found.")
    if (base / cfg.split).is_dir() and any(p.is_dir() for p in (base / cfg.split).iterdir()):
        base = base / cfg.split  # root/<split>/<class>/<file>, as datasets' imagefolder reads
    files: list[str] = []
    for dirpath, dirnames, names in os.walk(base):
        dirnames.sort()  # walk order is the file system's: sorted for every machine alike
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                files.append(os.path.relpath(os.path.join(dirpath, name), base))
    if not files:
        raise UserError(
            f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {base}; expected "
            "one subfolder per class holding the images."
        )
    labels = np.asarray([Path(f).parts[0] if len(Path(f).parts) > 1 else "0" for f in files])
    order = sorted(range(len(files)), key=lambda i: (labels[i], files[i]))
    files, labels = [files[i] for i in order], labels[order]
    cache = _scan_cache(base, files, cfg)
    size = _cached_size(cache)
    if size is not None:  # these very files (names, sizes, mtimes) passed the check before
        return FolderScan(str(base), tuple(files), labels, tuple(cfg.image_size or size))
    bad = []
    for rel in files:
        try:
            with Image.open(base / rel) as img:  # header only: no pixel data read
                if size is None:
                    size = (img.height, img.width)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            bad.append(f"{base / rel} ({err})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(
            f"{source}: {len(bad)} unreadable image file(s): {'; '.join(bad[:3])}{more}; "
            "remove or replace them (found by a header check of every file before training)."
        )
    _write_scan_cache(cache, size)
    size = tuple(cfg.image_size) if cfg.image_size is not None else size
    return FolderScan(str(base), tuple(files), labels, size)


def _scan_cache(base: Path, files: list[str], cfg: DataConfig) -> Path:
    """Where a passed header check of exactly these files is recorded: keyed by every file's
    path, size and mtime (a stat, ~100x cheaper than opening it), so the other ranks (which
    scan after rank 0, build.py's main_process_first) and later runs skip the opens, and any
    added, removed or rewritten file means a fresh check."""
    import hashlib

    from dist_train.data.arrow import cache_root

    digest = hashlib.sha256(str(base.resolve()).encode())
    for rel in files:
        st = os.stat(base / rel)
        digest.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cache_root(cfg) / "image_scans" / f"{digest.hexdigest()[:32]}.json"


def _cached_size(cache: Path) -> tuple[int, int] | None:
    import json

    try:
        return tuple(json.loads(cache.read_text())["first_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_scan_cache(cache: Path, size: tuple[int, int]) -> None:
    """Best effort (a read-only cache directory only costs the next scan its header opens);
    written to a temporary name and renamed: a reader never sees half a file."""
    import json

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"first_size": list(size)}))
        os.replace(tmp, cache)
    except OSError:
        pass


class BadImage(UserError):
    """A file that fails to decode mid-epoch under `data.on_bad_sample: error`. Raised inside a
    DataLoader worker, it comes back wrapped in the worker's traceback text: the message keeps
    only the original sentence, so the CLI prints a clean paragraph (exit 2)."""

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ImageFiles:
    """Row source over a scanned folder: `fetch(ids)` decodes those files to uint8
    [n, C, H, W]. Holds only paths and settings, so it pickles cheaply into DataLoader workers.

    `on_bad`: "error" raises `BadImage` naming the file; "skip" decodes instead the next file
    of the same class in scan order (cyclically) that decodes: deterministic, independent of
    workers and world size, the label unchanged and every batch still full; each occurrence is
    logged to stderr with this process's running count."""

    dtype = torch.uint8

    def __init__(self, scan: FolderScan, channels: int, on_bad: str = "error") -> None:
        import multiprocessing

        self.scan, self.channels, self.on_bad = scan, channels, on_bad
        self.mode = "L" if channels == 1 else "RGB"
        self.skipped = 0  # substitutions made by this process (a worker counts its own)
        # ... and by this process and all its DataLoader workers together: shared memory the
        # workers inherit, read by the training process at each epoch end (`bad_sample_note`)
        self.substituted = multiprocessing.get_context().Value("q", 0)
        self._reported = 0

    def __len__(self) -> int:
        return len(self.scan.files)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.scan.size)

    def path(self, row: int) -> str:
        return os.path.join(self.scan.root, self.scan.files[row])

    def fetch(self, ids) -> torch.Tensor:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = torch.empty((len(ids), *self.input_shape), dtype=torch.uint8)
        buf = out.numpy()  # filled in place: one copy per image, from Pillow's array
        for i, row in enumerate(ids.tolist()):
            buf[i] = self._decode_row(row)
        return out

    def _decode_row(self, row: int) -> np.ndarray:
        try:
            return decode(self.path(row), self.mode, self.scan.size)
        except (OSError, SyntaxError, ValueError) as err:  # Pillow's "broken data" errors
            if self.on_bad == "error":
                raise BadImage(
                    f"cannot decode image {self.path(row)} ({err}); remove or replace the file, "
                    "or set data.on_bad_sample: skip to train on a same-class substitute."
                ) from None
            return self._substitute(row, err)

    def _substitute(self, row: int, err: Exception) -> np.ndarray:
        labels, n = self.scan.labels, len(self)
        for step in range(1, n):
            other = (row + step) % n
            if labels[other] != labels[row]:
                continue
            try:
                arr = decode(self.path(other), self.mode, self.scan.size)
            except (OSError, SyntaxError, ValueError):
                continue
            self.skipped += 1
            with self.substituted.get_lock():
                self.substituted.value += 1
            print(
                f"dist_train: data.on_bad_sample=skip: cannot decode {self.path(row)} ({err}); "
                f"used {self.path(other)} (same class) instead [bad samples met by process "
                f"{os.getpid()}: {self.skipped}]",
                file=sys.stderr,
                flush=True,
            )
            return arr
        raise BadImage(
            f"cannot decode image {self.path(row)} ({err}) and no other image of class "
            f"`{labels[row]}` decodes; remove or replace the files."
        )


def bad_sample_note(dataset) -> str | None:
    """A line saying how many bad files this process's loader substituted since the last call
    (`data.on_bad_sample: skip`), or None: never silently."""
    images = getattr(dataset, "source", None)
    if not isinstance(images, ImageFiles):
        return None
    total = images.substituted.value
    new, images._reported = total - images._reported, total
    if not new:
        return None
    return (
        f"data.on_bad_sample=skip: {new} undecodable image(s) replaced by the next image of "
        f"their class since the last note ({total} in this process, the statistics pass "
        "included; each file is named on stderr as it is met)"
    )


def decode(path: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One file -> uint8 [C, H, W]: JPEG draft mode when much larger than `size` (H, W), then
    conversion to `mode` (L or RGB) and Pillow's default resize filter."""
    from PIL import Image

    h, w = size
    with Image.open(path) as img:
        large = img.width >= DRAFT_FACTOR * w and img.height >= DRAFT_FACTOR * h
        if img.format == "JPEG" and large:
            img.draft(mode, (w, h))  # decodes at the smallest 1/2^k scale still >= (w, h)
        img = img.convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h))
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_source(root: str, cfg: DataConfig, source: str) -> ImageFiles:
    """The scanned folder as a row source (the lazy path's fetch, and the memory path's)."""
    return ImageFiles(scan_folder(root, cfg, source), cfg.channels, cfg.on_bad_sample)


def decode_all(images: ImageFiles, workers: int, batch: int = 256) -> torch.Tensor:
    """Every image, in scan order, decoded by `workers` DataLoader processes (0: this one)
    through the same `fetch` the lazy path uses: the memory path's bytes equal the lazy path's."""
    n = len(images)
    out = torch.empty((n, *images.input_shape), dtype=torch.uint8)
    for ids, x in _decoded(images, np.arange(n), workers, batch):
        out[ids] = x
    return out


def _decoded(images: ImageFiles, rows: np.ndarray, workers: int, batch: int = 256):
    """(row ids, uint8 images) of `rows` in chunks of `batch`, decoded by `workers` DataLoader
    processes (0: this one), in order."""
    chunks = [rows[s : s + batch] for s in range(0, len(rows), batch)]
    loader = torch.utils.data.DataLoader(
        _Chunks(images, chunks), batch_size=None, num_workers=workers, shuffle=False
    )
    yield from loader


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, images: ImageFiles, chunks: list[np.ndarray]) -> None:
        self.images, self.chunks = images, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        ids = self.chunks[i]
        return torch.from_numpy(ids), self.images.fetch(ids)


def load_imagefolder(root: str, cfg: DataConfig, source: str, workers: int = 0) -> MemoryFrame:
    """The memory path: the whole folder decoded once to uint8 [N, C, H, W] (a quarter of
    float32's memory), labels by class folder name."""
    images = image_source(root, cfg, source)
    pixels = decode_all(images, workers)
    return MemoryFrame({"__image__": pixels, cfg.target: images.scan.labels})


def pixel_stats(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of `unit_float` pixels from uint8 batches
    [n, C, H, W], in one streaming pass: a 256-bin histogram per channel, so the result is exact
    to float64 and independent of batch order, workers and world size. Returns [C, 1, 1]."""
    counts = None
    for x in batches:
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1).to(torch.int64)
        offsets = (torch.arange(c) * 256).unsqueeze(1)
        hist = torch.bincount((flat + offsets).reshape(-1), minlength=256 * c).view(c, 256)
        counts = hist if counts is None else counts + hist
    if counts is None:
        raise UserError("data.standardize: the training split holds no images.")
    values = (torch.arange(256, dtype=torch.float32) / 255).double()  # unit_float's values
    n = counts.sum(1, keepdim=True).double()
    mean = (counts * values).sum(1, keepdim=True) / n
    var = (counts * (values - mean) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    std = var.sqrt().float()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean.float().unsqueeze(-1), std.unsqueeze(-1)


def folder_bytes(root: str, cfg: DataConfig) -> float:
    """What the memory path would hold: files x C x H x W bytes (uint8), from a walk of the
    folder and the first file's header (data.mode auto)."""
    from PIL import Image

    base = Path(root)
    if (base / cfg.split).is_dir():
        base = base / cfg.split
    count, first = 0, None
    for dirpath, _, names in os.walk(base):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                count += 1
                first = first or os.path.join(dirpath, name)
    if cfg.image_size is not None:
        h, w = cfg.image_size
    elif first is not None:
        try:
            with Image.open(first) as img:
                w, h = img.size
        except (OSError, SyntaxError, ValueError):  # the scan names the file later
            h = w = 0
    else:
        h = w = 0
    return float(count * cfg.channels * h * w)


def lazy_images(cfg: DataConfig, seed: int, workers: int = 0):
    """The lazy path of an image folder: a `DataBundle` of `LazyTable`s over the scanned files.

    Labels, the class filter, the split and the statistics are decided exactly as on the memory
    path (the same functions, on the same scan order), so a step fetches the very rows the
    memory path would slice; only the decoding moves into the DataLoader's workers."""
    from dist_train.data.rows import LazyTable
    from dist_train.data.sources import DataBundle, encode_targets, split_order

    images = image_source(cfg.source.partition(":")[2], cfg, "data.source")
    valid = None
    if cfg.valid_source:
        kind, _, loc = cfg.valid_source.partition(":")
        if kind != "imagefolder":
            raise UserError(
                f"data.valid_source `{cfg.valid_source}`: with an image folder as data.source "
                "on data.mode lazy, the validation data must be an image folder too."
            )
        valid = image_source(loc, cfg, "data.valid_source")
        if valid.input_shape != images.input_shape:
            raise UserError(
                f"data.valid_source: its images decode to {valid.input_shape}, the training "
                f"images to {images.input_shape}; set data.image_size to give both one size."
            )
    extra = valid.scan.labels if valid is not None else None
    classes, y_all, keep = encode_targets(images.scan.labels, cfg, extra)
    ids = np.flatnonzero(keep.numpy()).astype(np.int64)  # the rows the class filter keeps
    lazy_valid = None
    if valid is not None:
        _, vy, vkeep = encode_targets(valid.scan.labels, cfg, None, classes)
        lazy_train = LazyTable(images, ids, y_all)
        lazy_valid = LazyTable(valid, np.flatnonzero(vkeep.numpy()).astype(np.int64), vy)
    else:  # the memory path's split (the same permutation), drawn over the same rows
        split_seed = seed if cfg.split_seed is None else cfg.split_seed
        t, v = split_order(len(y_all), cfg.valid_fraction, split_seed)
        lazy_train = LazyTable(images, ids[t.numpy()], y_all[t])
        if v is not None:
            lazy_valid = LazyTable(images, ids[v.numpy()], y_all[v])
    norm = None
    if cfg.standardize:  # one streaming pass over the training split's files
        norm = pixel_stats(x for _, x in _decoded(images, lazy_train.ids, workers))
    return DataBundle(lazy_train, lazy_valid, images.input_shape, classes, [], norm)


def lazy_image_table(source: str, cfg: DataConfig, classes: list | None, require_target: bool):
    """eval/predict `--data imagefolder:DIR` on the lazy path: every file in scan order (the
    order predict writes), labels from the class folders encoded with the run's classes; a
    folder of files without class subfolders is accepted when `require_target` is False."""
    from dist_train.data.rows import LazyTable
    from dist_train.data.sources import encode_targets

    images = image_source(source.partition(":")[2], cfg, "--data")
    every = np.arange(len(images), dtype=np.int64)
    unlabeled = all(len(Path(f).parts) == 1 for f in images.scan.files)
    if not require_target and unlabeled:
        return LazyTable(images, every, torch.zeros(len(images), dtype=torch.int64)), False
    _, y, keep = encode_targets(images.scan.labels, cfg, None, classes)
    return LazyTable(images, np.flatnonzero(keep.numpy()).astype(np.int64), y), True
