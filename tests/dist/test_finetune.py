"""Promise 5: frozen layers just work under DDP; untrusted weight files never execute code."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from dist_helpers import run_info
from procs import cli, cli_here, weights

pytestmark = pytest.mark.dist

FROZEN = ("layers.0.", "layers.1.", "layers.3.")  # conv, batchnorm (+ running stats), conv


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    r = cli_here(
        "train",
        "recipes/digits_cnn.yaml",
        "-o",
        str(out),
        "data.classes=[0,1,2,3,4]",
        "train.epochs=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "model.safetensors"


def test_frozen_parameters_and_buffers_bitwise_unchanged_under_ddp(pretrained, tmp_path):
    out = tmp_path / "ft"
    r = cli(
        "train",
        "recipes/digits_finetune.yaml",
        "-o",
        str(out),
        f"finetune.from={pretrained}",
        "train.epochs=2",
        nproc=2,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Expected to have finished reduction" not in r.stderr
    assert run_info(out)["world_size"] == 2
    assert run_info(out)["frozen_params"] == 320 + 64 + 9248
    before, after = weights(pretrained), weights(out / "model.safetensors")
    frozen = [k for k in after if k.startswith(FROZEN)]
    assert {"layers.1.running_mean", "layers.1.running_var", "layers.1.num_batches_tracked"} <= set(
        frozen
    )
    for key in frozen:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layers.8.weight"], after["layers.8.weight"])  # trained
    assert after["layers.11.weight"].shape == (5, 128)
    report = json.loads((out / "load_report.json").read_text())  # beside the printed table
    assert report["counts"]["reinitialised"] == 2 and report["counts"]["missing"] == 0


def test_summary_shows_frozen_parameters(pretrained):
    r = cli_here("summary", "recipes/digits_finetune.yaml", f"finetune.from={pretrained}")
    assert r.returncode == 0, r.stderr
    assert "9,632 frozen" in r.stdout and "layers.0.weight" in r.stdout.split("frozen:")[1]


def test_shape_mismatch_is_reported_as_a_table_unless_allowed(pretrained, tmp_path):
    args = [
        "check",
        "recipes/digits_finetune.yaml",
        f"finetune.from={pretrained}",
        "finetune.reinit=[]",
        "data.classes=[5,6,7]",
    ]
    r = cli_here(*args)
    assert r.returncode == 2
    assert "layers.11.weight: checkpoint [5, 128] vs model [3, 128]" in r.stderr
    assert "finetune.reinit" in r.stderr
    r = cli_here(*args, "finetune.allow_shape_mismatch=true")
    assert r.returncode == 0, r.stderr
    assert re.search(r"shape-mismatched\s+2\s+layers.11.weight, layers.11.bias", r.stdout)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["finetune", "eval"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, command, pretrained):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"layers.0.weight": _Evil(marker)}, fh)
    if command == "finetune":
        r = cli_here("check", "recipes/digits_finetune.yaml", f"finetune.from={evil}")
    else:
        r = cli_here("eval", "recipes/digits_cnn.yaml", "--checkpoint", str(evil))
    assert r.returncode == 2
    assert "refused to load" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_checkpoint_from_another_architecture_names_the_tensors(pretrained, tmp_path):
    r = cli_here("eval", "recipes/wine_mlp.yaml", "--checkpoint", str(pretrained))
    assert r.returncode == 2
    assert "does not fit this recipe's model" in r.stderr
    assert "layers.0.weight: file [32, 1, 3, 3] vs model [64, 13]" in r.stderr
    # names the file and the fix, in one message, not a traceback
    assert f"--checkpoint {pretrained}" in r.stderr and "use the recipe the checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
