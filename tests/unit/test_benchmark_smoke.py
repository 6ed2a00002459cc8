"""`benchmarks/run.py --quick` end to end (tiny sizes, one round): every case is measured and
written to the JSON. A smoke test only: no timing is asserted (benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    "weights",
    "mlp_bs64",
    "mlp_bs512",
    "digits_cnn",
    "eval",
    "startup_digits_cnn",
    "startup_mlp_bs64",
]


@pytest.mark.slow
def test_benchmark_quick_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["cases"] == CASES
    assert all(doc["runs"][c] for c in CASES)  # one A/B pair per case
    labels = " ".join(r["case"] for r in doc["rows"])
    assert all(c in labels for c in CASES)
    # same data order, init and fp32 math without dropout: the same weights
    weights = next(r for r in doc["rows"] if r["case"].startswith("weights"))
    assert weights["max_weight_diff"] < 1e-5
    assert "plain" in proc.stdout and "ratio" in proc.stdout


@pytest.mark.slow
def test_image_folder_benchmark_quick_reports_both_loops(tmp_path):
    """`benchmarks/image_folder.py --quick`: builds its JPEG folder, trains the reference loop
    and dist_train's lazy path with the same workers, reports images/s, ratio, decode limit."""
    out = tmp_path / "images.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "image_folder.py"), "--quick"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["images"] == len(list((tmp_path / "work").glob("jpegs-*/*/*.jpg")))
    for key in ("decode_limit", "reference", "dist_train"):
        assert doc[f"{key}_images_per_s"] > 0, key
    assert len(doc["rounds"]) == 1
    assert doc["ratio"] == pytest.approx(
        doc["dist_train_images_per_s"] / doc["reference_images_per_s"]
    )
    assert "ratio dist_train / reference" in proc.stdout
