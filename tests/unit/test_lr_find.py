"""`dist-train lr-find` on the notes' SGD MLP: the suggestion lands in the range the sweep
recipe finds good (lr 1e-3..1e-2, README "Hyperparameter sweeps"), and nothing but the
plot, the result and the override line is written: no run directory, here or in runs/."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from procs import ROOT, env

from dist_train.tools.lr_find import LrFind, suggest


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


def test_wine_mlp_suggestion_is_in_the_sweeps_good_range_and_no_run_dir(tmp_path):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    runs_before = _tree(ROOT / "runs")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_train",
            "lr-find",
            str(ROOT / "recipes/wine_mlp.yaml"),
            "--write-override",
        ],
        cwd=cwd,
        env=env(TMPDIR=str(tmp), PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(cwd.iterdir())  # no runs/<name>/... where a train would have put it
    assert _tree(ROOT / "runs") == runs_before
    # The default output: one new directory under the system temp (beside torch's own
    # empty `torchinductor_<user>` cache directory, which any training run creates there).
    [out] = [p for p in tmp.iterdir() if not p.name.startswith("torchinductor")]
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png", "override.txt"]
    result = json.loads((out / "lr_find.json").read_text())
    assert result["world_size"] == 1
    assert 1e-3 <= result["suggestion"] <= 1e-2, result["suggestion"]
    assert result["stopped"] == "diverged"  # lr 10 with momentum 0.95 blows up before the end
    line = f"optimizer.lr={result['suggestion']:.3g}"
    assert (out / "override.txt").read_text() == line + "\n"
    assert f"dist-train train {ROOT / 'recipes/wine_mlp.yaml'} {line}" in r.stdout
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_suggestion_reads_the_curve():
    """A synthetic range test: flat, falling between 1e-3 and 1e-2, lowest at 0.1, then
    blowing up, with single-batch spikes and one lucky batch far below the curve at 5e-5:
    min/10 just under 0.1 / 10 (not the lucky batch's 5e-6), steepest inside the fall."""
    lrs = 1e-6 * 10 ** (np.arange(80) / 12)  # 1e-6 .. ~4
    x = np.log10(lrs)
    loss = 2 - 1.5 / (1 + np.exp(-(x + 2.5) * 4)) + np.where(x > -1, (x + 1) ** 2 * 20, 0)
    true_min = lrs[np.argmin(loss)]
    loss[[10, 30, 55]] += 3  # noisy batches
    loss[20] = 0.2  # a lucky one: the raw minimum, ignored by the running median
    r = LrFind(lrs=lrs.tolist(), losses=loss.tolist(), smoothed=loss.tolist())
    suggest(r)
    assert r.suggestion == r.min_over_10
    # The median plateaus on the flat bottom and takes its first point: at most 3x lower.
    assert true_min / 30 <= r.suggestion <= true_min / 10 * 1.001
    assert 1e-3 <= r.steepest <= 1e-2


def test_bad_range_exits_2():
    from procs import cli_here

    r = cli_here("lr-find", "recipes/wine_mlp.yaml", "--start", "1", "--end", "0.1")
    assert r.returncode == 2 and "--start" in r.stderr and "Traceback" not in r.stderr


def test_onecycle_with_max_lr_suggests_max_lr(tmp_path):
    """onecycle peaks at scheduler.max_lr: that is the key the sweep tunes and the line names."""
    from procs import cli_here

    r = cli_here(
        "lr-find", "recipes/wine_mlp.yaml", "scheduler={name: onecycle, max_lr: 0.01}",
        "--steps", "6", "--start", "1e-4", "--end", "1e-2", "--out", str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["key"] == "scheduler.max_lr" and len(result["lrs"]) == 6
    assert result["lrs"][0] == 1e-4 and abs(result["lrs"][-1] - 1e-2) < 1e-12
    assert f"override: scheduler.max_lr={result['suggestion']:.3g}" in r.stdout


def test_without_matplotlib_the_result_is_written_and_the_plot_named(tmp_path):
    from test_extras import _cli_without

    args = ["lr-find", "recipes/wine_mlp.yaml", "--steps", "4", "--out", str(tmp_path)]
    r = _cli_without(["matplotlib"], *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.json"]
    assert "pip install 'dist-train[report]'" in r.stdout
