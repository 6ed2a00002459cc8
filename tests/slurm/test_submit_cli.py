"""`dist-train submit` without queueing anything: --dry-run writes RUN_DIR/job.sbatch,
and preflight refuses inconsistent requests with exit 2 and a message naming the flag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from procs import ROOT

from dist_train.cli import main
from dist_train.launch import slurm

WINE = str(ROOT / "recipes" / "wine_mlp.yaml")


def test_dry_run_writes_the_script_and_prints_it(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    args = [WINE, "train.epochs=3", "--processes", "2", "-o", str(run_dir), "--dry-run"]
    assert main(["submit", *args]) == 0
    out = capsys.readouterr()
    script = (run_dir / "job.sbatch").read_text()
    assert out.out == script
    assert "not queued" in out.err
    expected = slurm.render_sbatch(
        "cpu", job_name="wine-mlp", run_dir=run_dir, recipe_path=Path(WINE),
        overrides=["train.epochs=3"], num_processes=2, python=__import__("sys").executable,
        cpus_per_task=2,  # the default: one core per rank
    )  # fmt: skip
    assert script == expected
    assert "--nproc_per_node 2" in script and "train.epochs=3" in script
    assert not list(run_dir.glob("slurm-*.out"))


def test_dry_run_default_run_dir_and_recipe_defaults(tmp_path: Path, monkeypatch, capsys) -> None:
    """No -o: runs/<name>/<timestamp> under the current directory. The recipe's `slurm:`
    section gives the defaults; flags win over it."""
    monkeypatch.chdir(tmp_path)
    overrides = ["slurm.gpus_per_node=4", "slurm.time=02:00:00", "slurm.partition=gpu",
                 "slurm.extra_sbatch=[--account=abc]"]  # fmt: skip
    assert main(["submit", WINE, *overrides, "--time", "03:00:00", "--dry-run"]) == 0
    [script] = (tmp_path / "runs" / "wine-mlp").glob("*/job.sbatch")
    text = script.read_text()
    for line in ("#SBATCH --time=03:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --gres=gpu:4", "#SBATCH --account=abc"):  # fmt: skip
        assert line in text
    assert "--multi_gpu --num_processes 4" in text  # kind single_node chosen from the GPUs
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--processes", "3"], "--processes 3"),  # 16 rows/step do not split over 3
        (["--gpus-per-node", "4", "--processes", "3"], "--processes 3 does not match"),
        (["--gpus-per-node", "3"], "--gpus-per-node 3"),
        (["--nodes", "2", "--kind", "cpu"], "--kind multi_node"),
        (["--kind", "cpu", "--gpus-per-node", "2"], "--gpus-per-node 0"),
        (["--time", "90"], "--time"),
        (["--time", "00:05:00", "--grace", "300"], "--grace"),
        (["train.epochz=1"], "train.epochz: unknown key"),
        (["-o", "/tmp/my run"], "--output"),
    ],
)
def test_preflight_errors_exit_2_naming_the_flag(
    flags: list[str], needle: str, tmp_path: Path, capsys
) -> None:
    out = ["-o", str(tmp_path / "run")] if "-o" not in flags else []
    assert main(["submit", WINE, *out, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "run").exists()  # nothing written, nothing queued


def test_finished_run_dir_is_refused_before_queueing(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"status": "finished"}')
    assert main(["submit", WINE, "--processes", "2", "-o", str(run_dir)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert not (run_dir / "job.sbatch").exists()


@pytest.mark.slurm
def test_dry_run_queues_nothing(slurm_cluster: str, tmp_path: Path, capsys) -> None:
    name = f"dryrun-{tmp_path.name}"[:40]
    assert main(["submit", WINE, f"name={name}", "-o", str(tmp_path / "r"), "--dry-run"]) == 0
    queued = subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True)
    assert queued.returncode == 0 and queued.stdout.strip() == ""
    assert f"--job-name={name}" in (tmp_path / "r" / "job.sbatch").read_text()
    capsys.readouterr()
