# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Untrusted files: a checkpoint directory the trainer resumes from is data, never code. A
malicious pickle planted in a COMPLETE checkpoint (optimizer, scheduler, RNG state) or a pickle
posing as the model's safetensors must not run when the run resumes.

accelerate's `load_state` reads these through `accelerate.utils.load`, i.e. `torch.load(...,
weights_only=True)`, which refuses the `os.system` global; the model through safetensors. The
import-path escape hatch (`model.module.path`) refusing file paths is covered by
tests/unit/test_models.py and the `module_file_path_refused` case of test_recipe_errors.py;
malicious `finetune.from` / `--checkpoint` pickles by tests/dist/test_finetune.py.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from procs import cli_forked, cli_here
from rel_helpers import rel_data, rel_recipe  # noqa: F401 (fixtures)

ARGS = ["checkpoint.every_steps=5"]


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def resumable(rel_data, tmp_path_factory):
    """An unfinished run, SIGKILLed right after sealing its checkpoint of step 10."""
    from rel_helpers import write_recipe

    tmp = tmp_path_factory.mktemp("untrusted")
    recipe = write_recipe(tmp / "r.yaml", rel_data["train"], rel_data["valid"])
    run = tmp / "run"
    args = ["train", str(recipe), "-o", str(run), *ARGS]
    code = cli_forked(tmp / "killed.log", *args, DIST_TRAIN_FAULT="after-marker@10")
    assert code == -9, (tmp / "killed.log").read_text()[-3000:]
    assert (run / "checkpoints" / "step-000010" / "COMPLETE").is_file()
    return recipe, run


# What resuming does today with each file tampered with (the marker never appears):
#   optimizer.bin / scheduler.bin: UnpicklingError "unsupported GLOBAL posix.system", exit 1
#     with a Python traceback (safe, but not a one-paragraph message);
#   random_states_0.pkl: accelerate catches every exception while restoring the RNG state and
#     logs "Could not load random states" at INFO: the run resumes with unrestored RNGs (exit 0,
#     an inexact resume, no warning);
#   model.safetensors: safetensors refuses the header (traceback, exit 1).
FILES = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "model.safetensors"]


@pytest.mark.parametrize("name", FILES)
def test_malicious_pickle_in_a_checkpoint_never_runs(name, resumable, tmp_path):
    recipe, base = resumable
    run = tmp_path / "run"
    shutil.copytree(base, run)
    latest = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())[
        -1
    ]
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _Evil(str(marker))}, latest / name)
    r = cli_here("train", str(recipe), "-o", str(run), *ARGS)
    assert f"resuming from {latest}" in r.stdout, r.stdout + r.stderr
    assert not marker.exists(), f"code planted in {name} ran on resume"
    # Refused, with one clear message naming the checkpoint (no traceback, exit 2).
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(latest) in r.stderr
