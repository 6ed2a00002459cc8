"""One definition per rule (issue 12): the places that apply a rule give the answers of its one
definition, and the CLI is assembled from the subpackages' own `register` functions."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from dist_train.config.base import batch_split_error, default_mode
from dist_train.errors import UserError

PACKAGE = Path(__file__).resolve().parents[2] / "dist_train"
WINE = str(PACKAGE.parent / "recipes" / "wine_mlp.yaml")


@pytest.mark.parametrize(
    ("batch", "world", "accum"), [(100, 8, 1), (64, 8, 3), (10, 3, 1), (16, 2, 0)]
)
def test_submit_and_sweep_refuse_a_batch_split_with_the_one_rule(batch, world, accum):
    from dist_train.launch import slurm
    from dist_train.sweep.cli import _check_batches
    from dist_train.sweep.plan import Trial

    rule = batch_split_error(batch, world, accum)
    assert rule is not None
    with pytest.raises(ValueError) as err:
        slurm.preflight("cpu", num_processes=world, global_batch=batch, grad_accum=accum)
    assert str(err.value).endswith(rule)

    class Train:  # only the two fields the sweep check reads
        batch_size, grad_accum = batch, accum

    trial = Trial(0, {}, recipe=type("R", (), {"train": Train})())
    with pytest.raises(UserError) as err:
        _check_batches([trial], world)
    assert str(err.value).endswith(rule)


def test_submit_and_sweep_accept_what_the_rule_accepts():
    from dist_train.launch import slurm

    assert batch_split_error(96, 8, 3) is None
    slurm.preflight("multi_node", nodes=2, gpus_per_node=4, global_batch=96, grad_accum=3)


@pytest.mark.parametrize(
    "metric",
    ["valid/loss", "valid/mse", "valid/mae", "valid/accuracy", "valid/f1", "valid/r2"],
)
def test_report_and_sweep_pick_the_best_value_in_the_trainers_direction(tmp_path, metric):
    """The report once had its own list of "lower is better" words; the sweep its own compare."""
    import json

    from dist_train.report.html import load_run
    from dist_train.sweep.results import best_eval

    values = [0.5, 0.2, 0.9, 0.2]  # a tie for the lowest: the earliest wins
    evals = [{"event": "eval", "epoch": i, "step": i + 1, metric: v} for i, v in enumerate(values)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    want_step = 2 if default_mode(metric) == "min" else 3
    run = load_run(tmp_path)
    assert run.metric_mode(metric) == default_mode(metric)
    assert run.best_of(metric)["step"] == want_step
    assert best_eval(tmp_path, metric, default_mode(metric))["step"] == want_step


def test_submit_default_run_dir_is_the_trainers(tmp_path, monkeypatch, capsys):
    from dist_train.cli import main
    from dist_train.run.rundir import timestamped_run_dir

    monkeypatch.chdir(tmp_path)
    assert main(["submit", WINE, "--processes", "2", "--dry-run"]) == 0
    assert main(["submit", WINE, "--processes", "2", "--dry-run"]) == 0  # same second, maybe
    capsys.readouterr()
    made = sorted(p.name for p in (tmp_path / "runs" / "wine-mlp").iterdir())
    assert len(made) == 2 and all(re.fullmatch(r"\d{8}-\d{6}(-1)?", m) for m in made), made
    nxt = timestamped_run_dir("wine-mlp")
    assert nxt.parent == Path("runs") / "wine-mlp" and not nxt.exists()


def test_every_subcommand_comes_from_its_subpackage():
    from dist_train import cli

    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = {name: p.get_default("func").__module__ for name, p in action.choices.items()}
    assert registered == {
        "train": "dist_train.training.cli",
        "check": "dist_train.tools.cli",
        "summary": "dist_train.tools.cli",
        "eval": "dist_train.tools.cli",
        "predict": "dist_train.tools.cli",
        "lr-find": "dist_train.tools.cli",
        "report": "dist_train.report.cli",
        "schema": "dist_train.config.cli",
        "submit": "dist_train.launch.cli",
        "sweep": "dist_train.sweep.cli",
    }
    assert "argv[:1]" not in (PACKAGE / "cli.py").read_text()  # no subcommand special-cased


@pytest.mark.parametrize("command", ["report", "submit", "sweep", "train", "eval"])
def test_subcommand_help_works(command, capsys):
    from dist_train.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dist-train {command}")


def _private_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dist_train"):
                found += [
                    f"{path.relative_to(PACKAGE.parent)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    return found


def test_no_module_imports_another_modules_private_names():
    assert _private_imports() == []


@pytest.mark.parametrize(
    "flags",
    [
        ["--nproc", "3", "--launcher", "torchrun"],  # local: 16 rows do not split over 3
        ["--slurm", "--gpus-per-node", "3", "--dry-run"],  # array: nor over 3 GPUs per trial
    ],
)
def test_sweep_refuses_a_batch_split_before_writing_anything(tmp_path, capsys, flags):
    from dist_train.cli import main

    recipe = str(PACKAGE.parent / "recipes" / "wine_sweep.yaml")
    out = tmp_path / "sweep"
    assert main(["sweep", recipe, "sweep.trials=2", "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert batch_split_error(16, 3, 1) in err, err
    assert not out.exists()  # a corrected command starts clean


def test_assembling_the_cli_does_not_import_torch():
    """Every command, `schema` and `submit --dry-run` included, builds the whole parser first;
    a register() that imported torch would add seconds to all of them."""
    import subprocess
    import sys

    code = "import sys; from dist_train.cli import build_parser; build_parser(); "
    code += "print(sorted(m for m in ('torch', 'matplotlib', 'datasets') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
