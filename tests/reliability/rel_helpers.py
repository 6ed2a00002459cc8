"""Shared pieces of the reliability tests: a tiny tabular problem, ranks started by hand.

Not a conftest.py: tests/dist and tests/slurm already have one each, and their test modules
`from conftest import ...`. Fixtures defined here are imported by name into each test module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from procs import (  # noqa: E402  (re-exported: test modules import from here)
    ROOT,
    bitwise_equal,
    cli,
    env,
    forbid_in_fast_loop,
    free_port,
    kill_tree,
    max_diff,
    run_until_then_kill,
    weights,
)

__all__ = [
    "ROOT",
    "bitwise_equal",
    "cli",
    "env",
    "free_port",
    "kill_tree",
    "max_diff",
    "run_until_then_kill",
    "weights",
]

RECIPE = {
    "name": "rel",
    "seed": 3,
    "data": {
        "source": None,
        "valid_source": None,
        "target": "label",
        "task": "multiclass",
        "standardize": True,
    },
    "model": {"layers": [{"linear": 32}, "relu", {"linear": 16}, "tanh", {"linear": "out"}]},
    "loss": "cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "scheduler": {"name": "cosine", "warmup_steps": 5},
    "train": {"epochs": 3, "batch_size": 24, "log_every_steps": 1},
    "metrics": ["accuracy"],
    "checkpoint": {"every_epochs": 1, "keep": 3},
}
TRAIN_ROWS, VALID_ROWS = 480, 97  # 20 optimizer steps per epoch at batch 24


def table_lines(rows: int, seed: int) -> list[str]:
    """Header + rows of a 6-feature, 3-class csv (the same problem as tests/dist)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    head = ",".join([*(f"f{i}" for i in range(6)), "label"])
    return [head] + [",".join([*(f"{v:.6f}" for v in x[r]), str(label[r])]) for r in range(rows)]


def write_table(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def poison(lines: list[str], rows: list[int], value: str = "inf") -> list[str]:
    """A copy of a table with feature f0 of data row r (0-based, header excluded) set to value."""
    out = list(lines)
    for r in rows:
        cells = out[r + 1].split(",")
        cells[0] = value
        out[r + 1] = ",".join(cells)
    return out


def write_recipe(path: Path, train_csv: Path, valid_csv: Path, **sections) -> Path:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["source"] = f"csv:{train_csv}"
    recipe["data"]["valid_source"] = f"csv:{valid_csv}"
    for key, value in sections.items():
        recipe[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def rel_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel_data")
    return {
        "train": write_table(root / "train.csv", table_lines(TRAIN_ROWS, 0)),
        "valid": write_table(root / "valid.csv", table_lines(VALID_ROWS, 1)),
    }


@pytest.fixture
def rel_recipe(rel_data, tmp_path) -> Path:
    return write_recipe(tmp_path / "rel.yaml", rel_data["train"], rel_data["valid"])


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def logged_steps(run_dir: Path) -> int:
    """The highest train step in metrics.jsonl so far (0 if none); tolerates a torn line."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "train":
            best = max(best, rec["step"])
    return best


class Ranks:
    """`world` ranks of `python -m dist_train ARGS` started as plain processes (no torchrun,
    which would kill the survivors as soon as one rank dies), each with its own log files."""

    def __init__(self, args: list[str], logs: Path, world: int = 2, **extra_env: str) -> None:
        forbid_in_fast_loop(f"{world} ranks started by hand")
        port = str(free_port())
        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.procs, self.ended = logs, [], {}
        for rank in range(world):
            rank_env = env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                **extra_env,
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dist_train", *args],
                    cwd=ROOT,
                    env=rank_env,
                    stdout=open(logs / f"rank{rank}.out", "w"),  # noqa: SIM115 (child owns it)
                    stderr=open(logs / f"rank{rank}.err", "w"),  # noqa: SIM115
                    start_new_session=True,
                )
            )

    def wait(self, rank: int, timeout: float) -> tuple[int | None, float]:
        """(exit code or None if still running after `timeout`, monotonic time it ended)."""
        deadline = time.monotonic() + timeout
        proc = self.procs[rank]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.ended.setdefault(rank, time.monotonic())
                return proc.returncode, self.ended[rank]
            time.sleep(0.05)
        return None, time.monotonic()

    def err(self, rank: int) -> str:
        return (self.logs / f"rank{rank}.err").read_text()

    def out(self, rank: int) -> str:
        return (self.logs / f"rank{rank}.out").read_text()

    def kill_all(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
                proc.wait()


def assert_checkpoint_loads(path: Path) -> None:
    """Every file of a complete checkpoint loads (safely: weights_only) and holds what it
    should; shared by the stage-by-stage fault tests and the kill fuzz."""
    import torch
    from accelerate.utils import load
    from safetensors.torch import load_file

    state = json.loads((path / "train_state.json").read_text())
    assert state["step"] == int(path.name.split("-")[1])
    assert load_file(str(path / "model.safetensors"))
    assert torch.load(path / "optimizer.bin", weights_only=True)["state"]
    assert "last_epoch" in torch.load(path / "scheduler.bin", weights_only=True)
    assert "torch_manual_seed" in load(path / "random_states_0.pkl")
