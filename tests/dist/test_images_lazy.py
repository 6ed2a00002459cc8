"""Image folders on the lazy path, trained for real with DataLoader workers: the weights equal
the memory path's bitwise (same decode), do not depend on the number of workers, and 2
processes match 1 within 1e-5; a file that breaks mid-epoch stops the run naming it (exit 2)."""

from __future__ import annotations

import importlib.util

import pytest
from dist_helpers import events, run_info
from procs import ROOT, bitwise_equal, cli, cli_here, max_diff, weights


def _script(name: str):
    """A recipes/ script as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = "recipes/digits_folder_lazy.yaml"
# No augmentation, dropout or batch norm: their draws / statistics are per rank, so only
# without them can 2 processes reproduce 1 (the bitwise checks need no such care).
PLAIN = [
    "~data.augment",
    "model.layers=[{conv2d: {out: 8, kernel: 3, padding: 1}}, relu, {max_pool2d: 2}, "
    "flatten, {linear: out}]",
    "train.epochs=2",
    "train.batch_size=32",
    "train.log_every_steps=5",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "folder"
    _script("make_digits_folder").write_digits(
        root, limit=400
    )  # 400 PNGs: 10 steps of 32 per epoch
    return root


def _train(folder, out, *overrides, nproc=1):
    args = ["train", RECIPE, f"data.source=imagefolder:{folder}", *PLAIN, *overrides]
    r = cli_here(*args, "-o", str(out)) if nproc == 1 else cli(*args, "-o", str(out), nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_info(out)["world_size"] == nproc
    return weights(out / "model.safetensors"), r


def test_lazy_equals_memory_bitwise_and_workers_do_not_matter(folder, tmp_path):
    memory, r = _train(folder, tmp_path / "memory", "data.mode=memory", "data.num_workers=0")
    assert "data: memory" in r.stdout
    lazy, r = _train(folder, tmp_path / "lazy2", "data.mode=lazy", "data.num_workers=2")
    assert "data: lazy" in r.stdout and "2 workers/process" in r.stdout
    serial, _ = _train(folder, tmp_path / "lazy0", "data.mode=lazy", "data.num_workers=0")
    assert bitwise_equal(memory, lazy) and bitwise_equal(lazy, serial)
    # predict --data on the folder: the same rows in scan order, the same numbers, either path
    csv = {}
    for mode in ("memory", "lazy"):
        out = tmp_path / f"{mode}.csv"
        r = cli_here(
            "predict", RECIPE, "--checkpoint", str(tmp_path / "lazy2"), "--data",
            f"imagefolder:{folder}", "-o", str(out), f"data.source=imagefolder:{folder}",
            *PLAIN, f"data.mode={mode}", "data.num_workers=1",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        csv[mode] = out.read_text()
    assert csv["memory"] == csv["lazy"] and len(csv["lazy"].splitlines()) == 401


def test_mixup_cutmix_partners_come_from_the_workers_and_equal_memory(folder, tmp_path):
    """Mixup and CutMix over 2 epochs: on lazy the partners are decoded by the 2 persistent
    workers with each batch (test_mix checks what a batch carries), epoch by epoch, and the
    weights are the memory path's bitwise."""
    mix = ["data.augment={mixup: 0.4, cutmix: 1.0, switch_prob: 0.5}"]
    memory, _ = _train(folder, tmp_path / "memory", *mix, "data.mode=memory")
    lazy, r = _train(folder, tmp_path / "lazy", *mix, "data.mode=lazy", "data.num_workers=2")
    assert "2 workers/process" in r.stdout
    assert bitwise_equal(memory, lazy)


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_match_one_on_lazy_with_workers(folder, tmp_path):
    lazy = ["data.mode=lazy", "data.num_workers=1"]
    one, _ = _train(folder, tmp_path / "one", *lazy)
    two, _ = _train(folder, tmp_path / "two", *lazy, nproc=2)
    assert max_diff(one, two) < 1e-5


def test_corrupt_file_mid_epoch_stops_naming_it(folder, tmp_path):
    """The header passes the scan; the body fails in a worker: exit 2, the file named, no
    traceback. With `skip` the same run trains on, counting the substitution."""
    import shutil

    broken = tmp_path / "folder"
    shutil.copytree(folder, broken)
    victim = sorted((broken / "3").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.6)])
    args = ["train", RECIPE, f"data.source=imagefolder:{broken}", *PLAIN, "train.epochs=1"]
    args += ["data.mode=lazy", "data.num_workers=1", "data.valid_fraction=0"]
    r = cli_here(*args, "-o", str(tmp_path / "err"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert victim.name in r.stderr and "data.on_bad_sample: skip" in r.stderr
    assert "Traceback" not in r.stderr
    _, r = _train(
        broken,
        tmp_path / "skip",
        "data.mode=lazy",
        "data.num_workers=1",
        "data.valid_fraction=0",
        "train.epochs=1",
        "data.on_bad_sample=skip",
    )
    # met twice: by the standardisation pass (before training), then by the epoch
    assert "2 undecodable image(s) replaced by the next image of their class" in r.stderr
    assert [e["epoch"] for e in events(tmp_path / "skip", "bad_samples")] == [0]
