"""wandb, tensorboard and matplotlib are optional extras: a recipe or command that needs a
missing one exits 2 with the `pip install 'dist-train[...]'` line, before any training starts.

A missing package is simulated in a fresh interpreter by `sys.modules[name] = None` (what
Python itself does to block an import): both `import name` and find_spec then fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """name: extras
data: {source: "sklearn:iris", target: target, task: multiclass}
model: {layers: [{linear: 8}, relu, {linear: out}]}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.1}
train: {epochs: 1, batch_size: 16}
"""


def _cli_without(blocked: list[str], *args: str, wandb_mode: str = "offline"):
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "from dist_train.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    env = dict(os.environ, WANDB_MODE=wandb_mode, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env
    )


@pytest.mark.parametrize(
    ("override", "module", "extra"),
    [
        ("tracking.wandb.mode=offline", "wandb", "wandb"),
        ("tracking.tensorboard=true", "tensorboard", "tensorboard"),
    ],
)
def test_a_tracker_that_is_not_installed_stops_train_before_it_starts(
    tmp_path, override, module, extra
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    r = _cli_without([module], "train", str(recipe), "-o", str(run), override)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"pip install 'dist-train[{extra}]'" in r.stderr
    assert f"tracking.{module}" in r.stderr and "Traceback" not in r.stderr
    assert not run.exists()  # nothing was built, no run directory made


def test_wandb_disabled_needs_no_wandb(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    args = ["train", str(recipe), "-o", str(run), "tracking.wandb.project=x"]
    r = _cli_without(["wandb"], *args, wandb_mode="disabled")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "model.safetensors").is_file() and not (run / "wandb").exists()


def test_report_without_matplotlib_names_the_report_extra(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "train/loss": 1.0}\n')
    r = _cli_without(["matplotlib"], "report", str(run))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "pip install 'dist-train[report]'" in r.stderr and "Traceback" not in r.stderr
