"""Every shipped recipe validates, builds, and trains a few steps on 1 process (in this process:
the CLI's code path without seconds of imports per case) and on 2 (torchrun, `make test`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from procs import ROOT, cli_here, env, torchrun

HERE = Path(__file__).resolve().parent

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
TINY = ["train.epochs=1", "train.max_steps=3"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """digits_finetune starts from a pretrained digits model: make a small one."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    r = cli_here(
        "train", "recipes/digits_cnn.yaml", "-o", str(out), "data.classes=[0,1,2,3,4]", *TINY
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "model.safetensors"


def _extra(name: str, pretrained: Path) -> list[str]:
    return [f"finetune.from={pretrained}"] if "finetune" in name else []


def _strip_sweep(name: str) -> list[str]:
    return ["~sweep"] if "sweep" in name else []


def test_recipes_are_shipped():
    assert {
        "digits_cnn.yaml",
        "breast_cancer_binary.yaml",
        "wine_mlp.yaml",
        "diabetes_regression.yaml",
        "digits_finetune.yaml",
    } <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header_says_how_to_launch(name):
    head = (ROOT / "recipes" / name).read_text().splitlines()[:12]
    assert head[0].startswith("#") and any("dist-train" in line for line in head), name


@pytest.mark.parametrize("name", RECIPES)
def test_check_and_tiny_dry_run(name, pretrained, tmp_path):
    extra = _extra(name, pretrained) + _strip_sweep(name)
    r = cli_here("check", f"recipes/{name}", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "# ok:" in r.stdout
    out = tmp_path / "run"
    r = cli_here("train", f"recipes/{name}", "-o", str(out), *TINY, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def two_process_runs(pretrained, tmp_path_factory) -> tuple[Path, str]:
    """Every shipped recipe trained a few steps on 2 processes, all in ONE torchrun launch
    (train_many.py calls the Python API once per recipe), so the start-up is paid once."""
    root = tmp_path_factory.mktemp("two-process")
    spec = [
        {
            "recipe": f"recipes/{name}",
            "overrides": [*TINY, *_extra(name, pretrained), *_strip_sweep(name)],
            "out": str(root / name),
        }
        for name in RECIPES
    ]
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = [*torchrun(2), str(HERE / "train_many.py"), str(root / "spec.json")]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    return root, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_two_process_launch_trains_with_world_size_two(name, two_process_runs):
    root, log = two_process_runs
    run_json = root / name / "run.json"
    assert run_json.is_file(), f"{name} did not run:\n{log}"
    info = json.loads(run_json.read_text())
    assert info["world_size"] == 2 and info["status"] == "finished", log
    assert (root / name / "model.safetensors").is_file(), log
