"""Image folders: one scan, per-sample decode to uint8, the lazy path equal to the memory path
byte for byte, results independent of DataLoader workers, and corrupt files (at scan time and
mid-epoch, `data.on_bad_sample`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dist_train.config.schema import DataConfig
from dist_train.data.images import (
    BadImage,
    bad_sample_note,
    image_source,
    lazy_images,
    pixel_stats,
    scan_folder,
    unit_float,
)
from dist_train.data.loaders import make_loader
from dist_train.data.rows import LazyRows, Workers
from dist_train.data.sources import load_data
from dist_train.errors import UserError


def _folder(root, per_class: int = 12, classes: int = 3, size: int = 8, fmt: str = "png"):
    """Digits 0..classes-1 as grey files in root/<digit>/, from scikit-learn's images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(classes):
        (root / str(label)).mkdir(parents=True)
        imgs = digits.images[digits.target == label][:per_class]
        for n, img in enumerate(imgs):
            pic = Image.fromarray(np.round(img * 255 / 16).astype(np.uint8))
            if size != 8:
                pic = pic.resize((size, size))
            pic.save(root / str(label) / f"{n:03d}.{fmt}")
    return root


def _cfg(root, **kw) -> DataConfig:
    base = {"source": f"imagefolder:{root}", "target": "label", "task": "multiclass"}
    base["cache_dir"] = str(root.parent / "scan-cache")  # not the user's ~/.cache
    return DataConfig(**(base | {"channels": 1, "valid_fraction": 0.25, "standardize": True} | kw))


def _truncate(path, keep: float = 0.6) -> None:
    """Cut the file's body short: its header still parses (the scan passes), decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_scan_is_sorted_by_class_then_name_and_reads_headers_only(tmp_path):
    root = _folder(tmp_path / "img", per_class=3)
    (root / "1" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    scan = scan_folder(str(root), _cfg(root), "data.source")
    assert scan.files == tuple(f"{c}/{n:03d}.png" for c in "012" for n in range(3))
    assert scan.labels.tolist() == [c for c in "012" for _ in range(3)]
    assert scan.size == (8, 8)


def test_lazy_fetch_equals_memory_path_bytes_split_and_statistics(tmp_path):
    """The same rows in the same split, the same uint8 bytes, bitwise the same statistics."""
    root = _folder(tmp_path / "img")
    memory = load_data(_cfg(root), seed=3)
    lazy = lazy_images(_cfg(root), seed=3)
    assert memory.train.x.dtype == torch.uint8 and memory.input_shape == lazy.input_shape
    assert memory.classes == lazy.classes == ["0", "1", "2"]
    for mem, lz in ((memory.train, lazy.train), (memory.valid, lazy.valid)):
        assert torch.equal(mem.x, lz.source.fetch(lz.ids)) and torch.equal(mem.y, lz.y)
    for a, b in zip(memory.norm, lazy.norm, strict=True):
        assert torch.equal(a, b)
    # the statistics are those of the [0, 1] values of the training split
    train = unit_float(memory.train.x).double()
    torch.testing.assert_close(memory.norm[0].flatten(), train.mean((0, 2, 3)).float())
    torch.testing.assert_close(memory.norm[1].flatten(), train.std((0, 2, 3)).float())


def test_unit_float_is_numpys_float32_division():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_float(x), torch.from_numpy(np.arange(256, dtype=np.float32) / 255.0))
    f = torch.rand(3)
    assert unit_float(f) is f


def test_pixel_stats_do_not_depend_on_batching():
    x = torch.randint(0, 256, (50, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator())
    whole = pixel_stats([x])
    pieces = pixel_stats([x[30:], x[:7], x[7:30]])
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces, strict=True))


def _epoch(table, workers: int, epoch: int = 1):
    loader = make_loader(table, 8, True, True, seed=5, workers=Workers(num_workers=workers))
    loader.sampler.set_epoch(epoch)  # a given epoch's seeded order (loaders.ShuffledRows)
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    """No per-worker state in decoding: 0 and 2 worker processes give bitwise the same
    batches (rows, order, bytes); any randomness is drawn on the device, keyed per step."""
    root = _folder(tmp_path / "img")
    lazy = lazy_images(_cfg(root), seed=0)
    serial, parallel = _epoch(lazy.train, 0), _epoch(lazy.train, 2)
    assert len(serial) == len(parallel) == len(lazy.train) // 8
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert a[0].dtype == torch.uint8


def test_jpeg_draft_decodes_large_files_to_the_target_size(tmp_path):
    root = _folder(tmp_path / "img", per_class=2, size=64, fmt="jpg")
    images = image_source(str(root), _cfg(root, image_size=(16, 16)), "data.source")
    x = images.fetch(np.arange(len(images)))
    assert x.shape == (6, 1, 16, 16) and x.dtype == torch.uint8
    assert torch.equal(x, images.fetch(np.arange(len(images))))  # deterministic
    assert x.float().std() > 10  # a real picture, not blank


def test_unreadable_header_is_refused_before_training_naming_the_file(tmp_path):
    root = _folder(tmp_path / "img", per_class=2)
    (root / "1" / "empty.png").write_bytes(b"")
    (root / "2" / "text.jpg").write_bytes(b"hello, not a jpeg")
    with pytest.raises(UserError, match=r"2 unreadable image file\(s\).*empty\.png.*text\.jpg"):
        lazy_images(_cfg(root), seed=0)


def test_corrupt_body_mid_epoch_error_names_the_file_from_a_worker(tmp_path):
    root = _folder(tmp_path / "img")
    _truncate(root / "1" / "004.png")
    lazy = lazy_images(_cfg(root, standardize=False, valid_fraction=0.0), seed=0)
    with pytest.raises(BadImage) as err:
        _epoch(lazy.train, 1)
    text = str(err.value)
    assert "1/004.png" in text and "data.on_bad_sample: skip" in text
    assert "Traceback" not in text  # the worker's traceback is stripped: one clean paragraph


def test_corrupt_body_skip_substitutes_the_next_image_of_its_class(tmp_path, capfd):
    root = _folder(tmp_path / "img")
    _truncate(root / "1" / "004.png")
    _truncate(root / "1" / "005.png")  # its substitute is bad too: the next one after it
    lazy = lazy_images(_cfg(root, standardize=False, valid_fraction=0.0, on_bad_sample="skip"), 0)
    images = lazy.train.source
    bad, next_good = images.scan.files.index("1/004.png"), images.scan.files.index("1/006.png")
    got = images.fetch(np.array([bad, 0, bad]))
    want = images.fetch(np.array([next_good, 0, next_good]))
    assert torch.equal(got, want)  # deterministic substitute, same class, batch still full
    err = capfd.readouterr().err
    assert err.count("data.on_bad_sample=skip: cannot decode") == 2
    assert "1/004.png" in err and "1/006.png" in err and "bad samples met by process" in err
    assert images.skipped == 2
    # through workers: every batch keeps its size, labels unchanged; the workers' substitutions
    # are counted in the training process (what the trainer logs at each epoch end)
    assert "2 undecodable image(s)" in bad_sample_note(LazyRows(lazy.train))
    assert bad_sample_note(LazyRows(lazy.train)) is None  # nothing new since
    batches = _epoch(lazy.train, 2)
    note = bad_sample_note(LazyRows(lazy.train))
    assert note is not None and "(4 in this process" in note  # 004 and 005 drawn once each
    assert all(len(b[0]) == 8 for b in batches)
    assert torch.equal(
        torch.cat([b[1] for b in batches]), lazy.train.y[torch.cat([b[2] for b in batches])]
    )


def test_scan_verdict_is_cached_per_file_set(tmp_path, monkeypatch):
    """A second scan of the same files (another rank, a later run) opens no header; adding
    or rewriting a file means a fresh check, which finds a bad file again."""
    import PIL.Image

    root = _folder(tmp_path / "img", per_class=2)
    cfg = _cfg(root, cache_dir=str(tmp_path / "cache"))
    first = scan_folder(str(root), cfg, "data.source")
    opens = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    again = scan_folder(str(root), cfg, "data.source")
    assert (again.files, again.size) == (first.files, first.size) and opens == []
    assert again.labels.tolist() == first.labels.tolist()
    (root / "2" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"bad\.png"):
        scan_folder(str(root), cfg, "data.source")
    assert len(opens) == 7  # every file's header, the new one included
