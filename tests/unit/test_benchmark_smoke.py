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
    "startup_mlp_bs64_loss_only",
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


@pytest.mark.slow
def test_parquet_scale_benchmark_quick_reports_memory_growth_and_ratio(tmp_path):
    """`benchmarks/parquet_scale.py --quick` (8 and 80 MB shard directories, 20 steps): every
    run is a fresh `dist-train train` stopped by its step hook; the report holds both sizes'
    peaks and first-step times, the lazy / memory ratio and the growth between the sizes."""
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parquet_scale.py"), "--quick"]
    cmd += ["--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    small, large = doc["sizes"]
    assert large["rows"] == pytest.approx(10 * small["rows"], rel=1e-3)
    # One cold run per size (it builds the cache), then warm runs reusing it.
    assert [r["cold"] for r in small["runs"]] == [True, False, False]
    assert [r["mode"] for r in small["runs"]] == ["lazy", "lazy", "memory"]
    assert [r["mode"] for r in large["runs"]] == ["lazy", "lazy"]
    assert len(list((tmp_path / "work").glob("cache-*/*.rows.npy"))) >= 2  # packed caches
    for size in (small, large):
        assert size["first_step_warm_s"] > 0 and size["vmhwm_mib"] > doc["footprint_mib"] / 2
    assert small["lazy_over_memory"] == pytest.approx(
        small["lazy_samples_per_s"] / small["memory_samples_per_s"]
    )
    assert doc["rss_growth_mib"] == pytest.approx(large["vmhwm_mib"] - small["vmhwm_mib"])
    assert "(target < 100)" in proc.stdout
