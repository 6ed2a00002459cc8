"""launch/*.yaml: the CPU config really starts a 2-process gloo world; every config parses
and shows its exact `accelerate launch --config_file launch/X.yaml -m dist_train train` line.
The GPU configs cannot run on this machine (no CUDA); they are only read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from procs import ROOT, env, free_port

LAUNCH = ROOT / "launch"
CONFIGS = ("cpu_multi", "single_gpu", "multi_gpu_bf16", "multi_gpu_fp16", "fsdp", "multi_node")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_and_shows_the_launch_line(name: str) -> None:
    path = LAUNCH / f"{name}.yaml"
    text = path.read_text()
    config = yaml.safe_load(text)
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["num_processes"] >= 1 and config["num_machines"] >= 1
    header = [line for line in text.splitlines() if line.startswith("#")]
    line = f"accelerate launch --config_file launch/{name}.yaml "
    assert any(line in h and "-m dist_train train recipes/" in h for h in header), header


def test_accelerate_reads_every_config() -> None:
    """accelerate's own loader accepts each file (unknown keys or bad enums would raise)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for name in CONFIGS:
        load_config_from_file(str(LAUNCH / f"{name}.yaml"))


@pytest.mark.dist
def test_cpu_multi_config_gives_world_size_2(tmp_path: Path) -> None:
    """The header command, run for real (port made free, one short epoch)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / "cpu_multi.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "dist_train",
        "train",
        "recipes/wine_mlp.yaml",
        "-o",
        str(run_dir),
        "train.epochs=1",
    ]
    environ = env()
    environ.pop("ACCELERATE_USE_CPU", None)  # the config file alone must be enough
    proc = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2, info
    assert info["status"] == "finished", info
    assert (run_dir / "model.safetensors").is_file()
