"""SLURM defaults users need: --cpus-per-task from the processes per node (x train.threads),
--mem settable, and one GPU slice per parallel sweep trial on a GPU box."""

from __future__ import annotations

from pathlib import Path

from dist_train.cli import main
from dist_train.sweep.local import gpu_slices
from tests.procs import ROOT

WINE = str(ROOT / "recipes" / "wine_mlp.yaml")


def _script(tmp_path: Path, *args: str) -> str:
    run_dir = tmp_path / "run"
    assert main(["submit", WINE, *args, "-o", str(run_dir), "--dry-run"]) == 0
    return (run_dir / "job.sbatch").read_text()


def test_cpus_per_task_follows_the_processes_and_mem_is_settable(tmp_path, capsys):
    text = _script(tmp_path, "--processes", "2", "train.threads=3", "--mem", "48G")
    assert "#SBATCH --cpus-per-task=6" in text  # 2 ranks x 3 threads
    assert "#SBATCH --mem=48G" in text
    text = _script(tmp_path, "slurm.gpus_per_node=4", "slurm.mem=200G", "--cpus-per-task", "40")
    assert "#SBATCH --cpus-per-task=40" in text and "#SBATCH --mem=200G" in text
    text = _script(tmp_path, "slurm.gpus_per_node=4")
    assert "#SBATCH --cpus-per-task=4" in text and "--mem" not in text  # site default
    assert main(["submit", WINE, "--mem", "lots", "--dry-run"]) == 2
    capsys.readouterr()


def test_parallel_sweep_trials_get_their_own_gpus():
    assert gpu_slices(4, 1, ["0", "1", "2", "3"]) == ["0", "1", "2", "3"]
    assert gpu_slices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_slices(3, 1, ["4", "6"]) == ["4", "6", "4"]  # fewer GPUs: wrap and share
    assert gpu_slices(1, 1, ["0", "1"]) is None  # one trial at a time sees every GPU
    assert gpu_slices(4, 1, []) is None  # CPU box
