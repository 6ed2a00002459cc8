"""The built wheel works outside the source tree: `dist-train submit` finds its sbatch templates
(package data). They were once missing from the wheel, so an installed `dist-train submit`
failed with a traceback while every test run from the checkout passed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "wine_mlp.yaml"
SKIP = shutil.ignore_patterns(  # the checkout's untracked outputs (see .gitignore), not sources
    ".git", ".venv", "runs", "wandb", "results", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache",
)  # fmt: skip


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_installed_wheel_renders_a_job_script_from_another_directory(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src])
    (wheel,) = wheels.glob("dist_train-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    _run([*pip, "--python", py, "install", "--no-deps", "-q", wheel])
    # The runtime dependencies come from this interpreter's site-packages on PYTHONPATH: its
    # .pth files (the editable install of the checkout among them) are not processed there.
    env = {
        **os.environ,
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "WANDB_MODE": "disabled",
    }
    env.pop("DIST_TRAIN_SLURM_TEMPLATES", None)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import dist_train; print(dist_train.__file__)"], env=env, cwd=work)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # not the checkout
    shutil.copy(RECIPE, work / "recipe.yaml")
    cmd = [venv / "bin" / "dist-train", "submit", "recipe.yaml", "--processes", "2"]
    proc = _run([*cmd, "-o", "run", "--dry-run"], env=env, cwd=work)
    script = (work / "run" / "job.sbatch").read_text()
    assert proc.stdout == script
    assert "#SBATCH --job-name=wine-mlp" in script  # cpu.sbatch, filled
    assert "dt_forward()" in script  # common.sh, pasted in
    assert "--nproc_per_node 2" in script and "@{num_processes}" not in script
    assert f"RUN_DIR={work / 'run'}" in script
