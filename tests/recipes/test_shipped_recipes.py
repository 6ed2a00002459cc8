"""Every shipped recipe validates, builds, and trains a few steps on 1 process (in this process:
the CLI's code path without seconds of imports per case) and on 2 (torchrun, `make test`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    return [f"finetune.from={pretrained}"] if name == "digits_finetune.yaml" else []


def _local(name: str, request) -> list[str]:
    """The transformers recipes read what recipes/make_pretrained.py writes to ./pretrained/:
    the `local_models` fixture (tests/conftest.py) runs it into a temporary directory (the ViT
    pretrained a few steps only) and these overrides point the recipes there."""
    if name == "digits_folder_lazy.yaml":  # the image folder its script writes
        return [f"data.source=imagefolder:{request.getfixturevalue('digits_folder')}"]
    if name == "parquet_shards_lazy.yaml":  # the shard directory its script writes
        shards = request.getfixturevalue("parquet_shards")
        return [f"data.source=parquet:{shards}", f"data.cache_dir={shards.parent / 'cache'}"]
    if name not in LOCAL:
        return []
    root = request.getfixturevalue("local_models")
    return LOCAL[name](root)


LOCAL = {
    "text_classification.yaml": lambda root: [
        f"data.source=csv:{root / 'reviews.csv'}",
        f"model.hf.pretrained={root / 'bert-tiny'}",
    ],
    "vision_finetune.yaml": lambda root: [
        f"data.source=imagefolder:{root / 'digits-images'}",
        f"model.hf.pretrained={root / 'vit-digits'}",
        f"finetune.from={root / 'vit-digits-0to4.safetensors'}",
    ],
}


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """recipes/make_digits_folder.py run as its header says (the first 300 digits here)."""
    out = tmp_path_factory.mktemp("digits-folder") / "digits"
    script = ROOT / "recipes" / "make_digits_folder.py"
    cmd = [sys.executable, str(script), "--out", str(out), "--limit", "300"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(out.glob("*/*.png"))) == 300 and "wrote 300 images" in r.stdout
    return out


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    """recipes/make_parquet_shards.py run as its header says (3,000 rows in 3 shards here)."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    script = ROOT / "recipes" / "make_parquet_shards.py"
    cmd = [sys.executable, str(script), "--out", str(out), "--rows", "3000", "--shards", "3"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(out.glob("part-*.parquet"))) == 3 and "wrote 3000 rows" in r.stdout
    return out


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
def test_check_and_tiny_dry_run(name, pretrained, tmp_path, request):
    extra = _extra(name, pretrained) + _strip_sweep(name) + _local(name, request)
    r = cli_here("check", f"recipes/{name}", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "# ok:" in r.stdout
    out = tmp_path / "run"
    r = cli_here("train", f"recipes/{name}", "-o", str(out), *TINY, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def two_process_runs(pretrained, tmp_path_factory, request) -> tuple[Path, str]:
    """Every shipped recipe trained a few steps on 2 processes, all in ONE torchrun launch
    (train_many.py calls the Python API once per recipe), so the start-up is paid once."""
    root = tmp_path_factory.mktemp("two-process")
    spec = [
        {
            "recipe": f"recipes/{name}",
            "overrides": [
                *TINY,
                *_extra(name, pretrained),
                *_strip_sweep(name),
                *_local(name, request),
            ],
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


def test_text_recipe_reaches_its_stated_accuracy(hf_text, tmp_path):
    """recipes/text_classification.yaml as shipped (its header and README state >= 0.95 valid
    accuracy) on the CSV and tiny BERT that make_pretrained.py writes."""
    out = tmp_path / "run"
    overrides = LOCAL["text_classification.yaml"](hf_text)
    r = cli_here("train", "recipes/text_classification.yaml", "-o", str(out), *overrides)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    final = [e for e in map(json.loads, lines) if e["event"] == "eval"][-1]
    assert final["valid/rows"] == 400
    assert final["valid/accuracy"] >= 0.95, final


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_vision_finetune_leaves_the_frozen_vit_bitwise_unchanged(
    two_process_runs, local_models
):
    """vision_finetune.yaml on 2 processes (the shared launch above): every frozen tensor of
    the pretrained transformers ViT comes out bit for bit as it went in, while the new head
    trained; the backbone's LayerNorms have no running statistics to drift."""
    from safetensors.torch import load_file

    root, log = two_process_runs
    info = json.loads((root / "vision_finetune.yaml" / "run.json").read_text())
    assert info["world_size"] == 2, log
    before = load_file(str(local_models / "vit-digits-0to4.safetensors"))
    after = load_file(str(root / "vision_finetune.yaml" / "model.safetensors"))
    frozen = [k for k in before if k.startswith("backbone.vit.")]
    assert len(frozen) > 10
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    head = [k for k in after if k.startswith("backbone.classifier.")]
    assert head and not all(torch.equal(before[k], after[k]) for k in head)
