"""Messages that named the wrong thing or leaked internals (issue 12), each checked through the
function a user's command reaches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_train.errors import UserError
from dist_train.model.finetune import load_weights


@pytest.mark.parametrize("key", ["finetune.from", "--checkpoint"])
def test_a_file_that_is_no_state_dict_names_the_key_the_user_wrote(tmp_path, key):
    """The wrapper lookup (state_dict / model / model_state_dict) once reused the name `key`,
    so this message named `model_state_dict` instead of the flag or recipe key."""
    path = tmp_path / "weights.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "epoch": 3, "note": "x"}, path)
    assert load_weights(str(path), key=key)["w"].shape == (2,)  # a wrapped state dict loads
    torch.save({"epoch": 3, "note": "x"}, path)  # no tensors at all
    with pytest.raises(UserError) as err:
        load_weights(str(path), key=key)
    assert str(err.value).startswith(f"{key} {path}: expected a state dict")


def _run(tmp_path, logged_epochs: list[int], best: int):
    """A run dir whose valid/loss is lowest at logged (0-based) epoch `best`."""
    lines = [
        {"event": "eval", "epoch": e, "step": 10 * (e + 1), "valid/loss": 1.0 + abs(e - best)}
        for e in logged_epochs
    ]
    lines.insert(0, {"event": "train", "epoch": 0, "step": 1, "train/loss": 2.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return tmp_path


def test_the_run_report_numbers_epochs_as_it_says(tmp_path):
    """metrics.jsonl logs epoch 0..; the page said "numbered from 0" while showing epoch+1."""
    from dist_train.report.html import write_report
    from dist_train.report.page import EPOCH_NOTE

    text = write_report([_run(tmp_path, [0, 1, 2, 3], best=2)]).read_text()
    assert text.count(EPOCH_NOTE) == 1 and "from 1" in EPOCH_NOTE
    assert "from 0, as in" not in text
    assert "@ epoch 3" in text  # logged epoch 2, shown from 1


def test_sweep_report_and_leaderboard_number_epochs_like_the_run_report(tmp_path):
    from dist_train.report.page import EPOCH_NOTE
    from dist_train.report.sweep import write_sweep_report
    from dist_train.sweep import plan as sweep
    from dist_train.sweep import results

    plan = {
        "name": "s",
        "metric": "valid/loss",
        "direction": "min",
        "seed": 0,
        "params": {"optimizer.lr": {"log_uniform": [1e-4, 1e-2]}},
        "trials": [{"trial": "trial-000", "values": {"optimizer.lr": 1e-3}, "recipe_hash": "x"}],
    }
    (tmp_path / sweep.PLAN_FILE).write_text(json.dumps(plan))
    (tmp_path / "trial-000").mkdir()
    _run(tmp_path / "trial-000", [0, 1, 2], best=1)
    _, rows = results.collect(tmp_path)
    assert rows[0]["best_epoch"] == 2  # logged epoch 1
    text = write_sweep_report(tmp_path).read_text()
    assert text.count(EPOCH_NOTE) == 1


WINE = str(Path(__file__).resolve().parents[2] / "recipes" / "wine_mlp.yaml")


def _submit(tmp_path, capsys) -> tuple[int, str]:
    from dist_train.cli import main

    code = main(["submit", WINE, "--processes", "2", "-o", str(tmp_path / "run"), "--dry-run"])
    return code, capsys.readouterr().err


def test_a_missing_template_is_an_installation_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "templates"
    empty.mkdir()
    monkeypatch.setenv("DIST_TRAIN_SLURM_TEMPLATES", str(empty))
    code, err = _submit(tmp_path, capsys)
    assert code == 2 and err.startswith("error: slurm template "), err
    assert f"looked for {empty}/" in err and "DIST_TRAIN_SLURM_TEMPLATES" in err


def test_a_template_placeholder_without_a_value_names_it(tmp_path, monkeypatch, capsys):
    from dist_train.launch import slurm

    edited = tmp_path / "templates"
    shutil.copytree(slurm.templates_dir(), edited)
    text = (edited / "cpu.sbatch").read_text()
    (edited / "cpu.sbatch").write_text(text.replace("#SBATCH", "#SBATCH --qos=@{qos}\n#SBATCH", 1))
    monkeypatch.setenv("DIST_TRAIN_SLURM_TEMPLATES", str(edited))
    code, err = _submit(tmp_path, capsys)
    assert code == 2 and "@{qos}" in err and str(edited / "cpu.sbatch") in err, err
    assert "Traceback" not in err
