"""Tests for `dist-train report` on realistic synthetic run directories."""

from __future__ import annotations

import base64
import json
import math
import random
import re

import numpy as np
import pytest
from PIL import Image

from dist_train.errors import UserError
from dist_train.report import html as report

EPOCHS, STEPS_PER_EPOCH, LOG_EVERY, BATCH = 12, 100, 5, 64
FIGURES = ["loss.png", "metrics.png", "lr.png", "throughput.png", "confusion_matrix.png"]


def _lr(step: int, total: int, peak: float = 1e-3, warmup: int = 100) -> float:
    if step < warmup:
        return peak * step / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _valid_loss(epoch: int, overfit: bool) -> float:
    base = 1.1 * math.exp(-0.45 * epoch) + 0.25
    return base + (0.06 * (epoch - 5) ** 1.4 if overfit and epoch > 5 else 0.0)


def _confusion(accuracy: float, rng: random.Random) -> list[list[int]]:
    rows = []
    for true in range(3):
        n = 300 + 40 * true
        right = int(n * accuracy)
        wrong = n - right
        first = rng.randint(0, wrong)
        rows.append([right if p == true else 0 for p in range(3)])
        others = [p for p in range(3) if p != true]
        rows[-1][others[0]], rows[-1][others[1]] = first, wrong - first
    return rows


def _records(overfit: bool, seed: int) -> list[dict]:
    rng, out, total = random.Random(seed), [], EPOCHS * STEPS_PER_EPOCH
    for epoch in range(EPOCHS):
        for s in range(LOG_EVERY, STEPS_PER_EPOCH + 1, LOG_EVERY):
            step = epoch * STEPS_PER_EPOCH + s
            train = (1.2 * math.exp(-step / (250 if overfit else 400)) + 0.03) * rng.uniform(
                0.85, 1.15
            )
            sps = rng.gauss(4000 if overfit else 5200, 150) * (0.5 if step <= 10 else 1.0)
            out.append(
                {
                    "event": "train",
                    "epoch": epoch,
                    "step": step,
                    "samples": step * BATCH,
                    "time": step * 0.016,
                    "train/loss": train,
                    "lr": _lr(step, total),
                    "grad_norm": rng.uniform(0.5, 2),
                    "samples_per_s": sps,
                    "step_time": BATCH / sps,
                }
            )
        step = (epoch + 1) * STEPS_PER_EPOCH
        loss = _valid_loss(epoch, overfit)
        acc = min(0.97, 0.55 + 0.4 * (1 - math.exp(-0.5 * epoch))) - (
            0.012 * max(0, epoch - 5) if overfit else 0
        )
        out.append(
            {
                "event": "eval",
                "epoch": epoch,
                "step": step,
                "samples": step * BATCH,
                "time": step * 0.016 + 1,
                "valid/loss": loss,
                "valid/accuracy": acc,
                "valid/f1": acc - 0.02,
                "valid/confusion_matrix": _confusion(acc, rng),
            }
        )
    out.append({"event": "end", "step": total, "best": {"valid/loss": 0.3}})
    return out


def _make_run(path, name: str, overfit: bool, seed: int, truncate: bool = False, run_json=None):
    path.mkdir(parents=True)
    lines = [json.dumps(r) for r in _records(overfit, seed)]
    text = "\n".join(lines) + "\n"
    if truncate:
        text += '{"event": "train", "epoch": 11, "step": 12'  # killed mid-write
    (path / "metrics.jsonl").write_text(text)
    (path / "recipe.yaml").write_text(f"name: {name}\nmodel:\n  kind: mlp\n")
    if run_json is not None:
        (path / "run.json").write_text(json.dumps(run_json))
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = _make_run(tmp_path / "runs" / "a", "mlp-overfit", True, 1, truncate=True)
    b = _make_run(
        tmp_path / "runs" / "b",
        "mlp-regularised",
        False,
        2,
        run_json={"monitor": "valid/accuracy", "mode": "max"},
    )
    return a, b


def _check_png(path):
    with Image.open(path) as img:
        img.load()
        width, height = img.size
        pixels = np.asarray(img.convert("RGB"))
    assert 600 <= width <= 2500 and 350 <= height <= 2000, (path.name, img.size)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 10, (path.name, colours)
    assert pixels.std() > 10, (path.name, pixels.std())


def test_two_runs_report(two_runs, tmp_path):
    out = tmp_path / "out"
    html_path = report.write_report(list(two_runs), out)
    assert html_path == out / "report.html"
    html = html_path.read_text()
    for name in FIGURES:
        _check_png(out / name)
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == len(FIGURES)
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert "mlp-overfit" in html and "mlp-regularised" in html
    assert "truncated" in html  # the note about the skipped last line
    assert "<script" not in html and "http" not in html  # self-contained, offline


def test_best_eval_and_summary(two_runs):
    overfit, regularised = (report.load_run(p) for p in two_runs)
    assert overfit.best_eval["epoch"] == 6  # valid loss rises after 0-based epoch 5 (shown: 6)
    assert regularised.monitor == "valid/accuracy" and regularised.mode == "max"
    assert regularised.best_eval["valid/accuracy"] == max(
        r["valid/accuracy"] for r in regularised.evals
    )
    assert overfit.num_epochs == EPOCHS and overfit.num_steps == EPOCHS * STEPS_PER_EPOCH
    assert "valid/confusion_matrix" not in overfit.scalar_metrics
    assert overfit.scalar_metrics[0] == "valid/loss"
    assert overfit.metric_mode("valid/f1") == "max" and overfit.metric_mode("valid/mse") == "min"


def test_single_run_defaults_to_run_dir(tmp_path):
    run = _make_run(tmp_path / "only", "solo", False, 3)
    assert report.write_report([run]) == run / "report.html"
    assert (run / "loss.png").is_file()


def test_several_runs_default_out_dir_and_duplicate_names(tmp_path):
    a = _make_run(tmp_path / "runs" / "x", "same", False, 4)
    b = _make_run(tmp_path / "runs" / "y", "same", True, 5)
    path = report.write_report([a, b])
    assert path == (tmp_path / "runs" / "report" / "report.html").resolve()
    html = path.read_text()
    assert "same (x)" in html and "same (y)" in html


def test_duplicate_step_keeps_last(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [
        {"event": "train", "epoch": 0, "step": 1, "train/loss": 2.0},
        {"event": "train", "epoch": 0, "step": 2, "train/loss": 1.5},
        {"event": "resume", "step": 1},
        {"event": "train", "epoch": 0, "step": 2, "train/loss": 1.4},
        {"event": "mystery", "step": 3},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    loaded = report.load_run(run)
    assert [r["train/loss"] for r in loaded.train] == [2.0, 1.4]
    assert loaded.name == "r"  # no recipe.yaml: directory name
    report.write_report([run], tmp_path / "o")  # train-only run still renders


def test_missing_metrics_is_user_error(tmp_path):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match=r"metrics\.jsonl"):
        report.write_report([tmp_path / "empty_run"])


@pytest.mark.parametrize(
    "content", ["", "\n\n", '{"event": "train", "step": 1}\nnot json\n{"step": 2}\n']
)
def test_empty_or_corrupt_metrics_is_user_error(tmp_path, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=r"metrics\.jsonl"):
        report.load_run(tmp_path)


def test_main(two_runs, tmp_path, capsys):
    out = tmp_path / "cli"
    from dist_train.cli import main

    assert main(["report", *map(str, two_runs), "-o", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out
