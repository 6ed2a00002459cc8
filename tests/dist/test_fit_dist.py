"""dist_train.fit from a user's own script under torchrun (issue 14, item 5): 2 gloo ranks,
called twice in the same processes, equal to the 1-process recipe path within 1e-5 with the
same exactly gathered metrics."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from procs import ROOT, env, free_port, max_diff, weights

pytestmark = pytest.mark.dist

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import dist_train
    from fit_helpers import FIT_RECIPE, Rows, user_metrics, user_model

    model, metrics = user_model(), user_metrics()
    train, valid = Rows(Path({train!r})), Rows(Path({valid!r}))
    out = []
    for i in range(2):  # twice in one process: nothing left over from the first call
        res = dist_train.fit(FIT_RECIPE, model=model, train_data=train, valid_data=valid,
                             metrics=metrics, output_dir=f"{out_dir}/fit{{i}}")
        out.append(res.metrics)
    if dist.get_rank() == 0:  # the process group outlives fit(): the script's to keep
        Path({out_dir!r}, "results.json").write_text(json.dumps(out))
    """
)


def test_fit_under_torchrun_from_a_user_script(tmp_path, reference_run):
    sys.path.insert(0, str(ROOT / "tests"))
    from fit_helpers import RECIPE, as_recipe_names, write_tables

    train, valid = write_tables(tmp_path)
    raw = copy.deepcopy(RECIPE)
    raw["data"] |= {"source": f"csv:{train}", "valid_source": f"csv:{valid}"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    ref = reference_run(recipe)
    script = tmp_path / "my_training.py"
    script.write_text(
        SCRIPT.format(
            tests=str(ROOT / "tests"), train=str(train), valid=str(valid), out_dir=str(tmp_path)
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), str(script)]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first, second = json.loads((tmp_path / "results.json").read_text())
    assert first == second
    want = json.loads((ref / "run.json").read_text())["final"]
    assert first["valid/rows"] == 37 and first["valid/accuracy"] == want["valid/accuracy"]
    assert abs(first["valid/loss"] - want["valid/loss"]) < 1e-5
    for i in range(2):
        info = json.loads((tmp_path / f"fit{i}" / "run.json").read_text())
        assert info["world_size"] == 2
        got = weights(tmp_path / f"fit{i}" / "model.safetensors")
        assert max_diff(as_recipe_names(got), weights(ref / "model.safetensors")) < 1e-5
