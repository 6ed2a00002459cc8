"""Sweeps without training: sampling, distributions, grid product, up-front validation that names
the key, the sweep directory (resume / changed / grown), results and leaderboard from fabricated
trial directories, the job-array text, and the sweep report."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dist_train.config.recipe import load_recipe, recipe_hash, validate
from dist_train.config.schema import SweepConfig
from dist_train.errors import UserError
from dist_train.launch import slurm
from dist_train.sweep import plan as sweep
from dist_train.sweep import results
from dist_train.sweep.local import trial_command

ROOT = Path(__file__).resolve().parents[2]
WINE_SWEEP = ROOT / "recipes" / "wine_sweep.yaml"


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(WINE_SWEEP.read_text())


def plan(raw: dict, **sweep_keys):
    raw = copy.deepcopy(raw)
    raw["sweep"].update(sweep_keys)
    return sweep.plan_trials(validate(raw), "test.yaml")


def user_error(raw: dict, **sweep_keys) -> str:
    with pytest.raises(UserError) as err:
        plan(raw, **sweep_keys)
    return str(err.value)


# ---------------------------------------------------------------------------- sampling


def test_wine_sweep_is_the_notes_search(raw):
    trials, cfg = plan(raw)
    assert len(trials) == 10 and (cfg.metric, cfg.direction) == ("valid/accuracy", "max")
    for t in trials:
        lr, momentum = t.values["optimizer.lr"], t.values["optimizer.momentum"]
        assert 1e-4 <= lr <= 1e-2 and 0.85 <= momentum <= 0.99
        assert t.recipe.optimizer.lr == lr and t.recipe.optimizer.momentum == momentum
        assert t.recipe.sweep is None and t.recipe.name == f"wine-sweep-{t.name}"


def test_same_seed_same_trials_other_seed_other_trials(raw):
    a, _ = plan(raw)
    b, _ = plan(raw)
    c, _ = plan(raw, seed=1)
    assert [t.values for t in a] == [t.values for t in b]
    assert [t.hash for t in a] == [t.hash for t in b]
    assert [t.values for t in a] != [t.values for t in c]


def test_more_trials_keep_the_earlier_ones(raw):
    few, _ = plan(raw, trials=3)
    many, _ = plan(raw, trials=12)
    assert [t.values for t in many[:3]] == [t.values for t in few]


def test_distributions_stay_in_range_and_have_the_right_shape():
    cfg = SweepConfig(params={
        "a": {"log_uniform": [1e-4, 1e-2]}, "b": {"uniform": [0.85, 0.99]},
        "c": {"int_uniform": [2, 4]}, "d": {"choice": ["x", {"k": 1}]},
    }, trials=2000, seed=7)  # fmt: skip
    values = sweep.sample_values(cfg)
    a = np.array([v["a"] for v in values])
    b = np.array([v["b"] for v in values])
    assert a.min() >= 1e-4 and a.max() <= 1e-2
    # log-uniform: each decade holds about half the draws; median near the geometric mean
    assert 0.45 < np.mean(a < 1e-3) < 0.55
    assert abs(math.log10(np.median(a)) + 3) < 0.1
    assert b.min() >= 0.85 and b.max() <= 0.99 and abs(b.mean() - 0.92) < 0.01
    assert {v["c"] for v in values} == {2, 3, 4} and all(type(v["c"]) is int for v in values)
    assert {json.dumps(v["d"]) for v in values} == {'"x"', '{"k": 1}'}
    assert all(len(f"{v['a']:g}".replace(".", "").lstrip("0").split("e")[0]) <= 4 for v in values)


def test_grid_is_a_cartesian_product_with_random_draws_per_point(raw):
    raw["sweep"]["params"] = {
        "optimizer.momentum": {"grid": [0.8, 0.9]},
        "train.batch_size": {"grid": [8, 16, 32]},
        "optimizer.lr": {"log_uniform": [1e-4, 1e-2]},
    }
    trials, _ = plan(raw, trials=2)
    points = [(t.values["optimizer.momentum"], t.values["train.batch_size"]) for t in trials]
    expected = [(m, b) for m in (0.8, 0.9) for b in (8, 16, 32) for _ in range(2)]
    assert points == expected  # first listed grid key varies slowest
    assert len({t.values["optimizer.lr"] for t in trials}) == 12  # fresh draws per point
    assert [t.recipe.train.batch_size for t in trials] == [b for _, b in expected]


def test_grid_only_sweep_runs_each_point_once(raw):
    raw["sweep"]["params"] = {"optimizer.lr": {"grid": [0.1, 0.01]}, "seed": {"grid": [0, 1]}}
    raw["sweep"].pop("trials")
    trials, _ = plan(raw)
    assert [(t.recipe.optimizer.lr, t.recipe.seed) for t in trials] == [
        (0.1, 0), (0.1, 1), (0.01, 0), (0.01, 1)]  # fmt: skip


def test_trial_recipe_round_trips_to_the_planned_hash(raw, tmp_path):
    trials, cfg = plan(raw, trials=2)
    sweep.write_plan(tmp_path / "s", trials, cfg, {"name": "wine-sweep"})
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    for t, entry in zip(trials, saved["trials"], strict=True):
        on_disk = load_recipe(tmp_path / "s" / t.name / "recipe.yaml")
        assert on_disk.sweep is None
        assert recipe_hash(on_disk) == t.hash == entry["recipe_hash"]


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("param", "expected"), [
    ({"log_uniform": [0, 1e-2]}, "sweep.params.optimizer.lr: log_uniform [0.0, 0.01] needs lo > 0"),
    ({"log_uniform": [-1, 1]}, "no log of a non-positive number"),
    ({"uniform": [0.9, 0.9]}, "sweep.params.optimizer.lr: uniform [0.9, 0.9] needs lo < hi"),
    ({"int_uniform": [5, 2]}, "int_uniform [5, 2] needs lo < hi"),
    ({"uniform": [0.1, 0.2], "grid": [1]}, "give exactly one distribution, got 2"),
    ({}, "give exactly one distribution, got 0"),
    ({"choice": []}, "sweep.params.optimizer.lr.choice"),
    ({"normal": [0, 1]}, "sweep.params.optimizer.lr.normal: unknown key"),
])  # fmt: skip
def test_bad_distribution_is_rejected_naming_the_key(raw, param, expected):
    raw["sweep"]["params"]["optimizer.lr"] = param
    with pytest.raises(UserError) as err:
        validate(raw, "wine_sweep.yaml")
    assert expected in str(err.value)


def test_unknown_key_path_is_rejected_naming_the_key(raw):
    raw["sweep"]["params"]["optimizer.momentun"] = raw["sweep"]["params"].pop("optimizer.momentum")
    msg = user_error(raw)
    assert "sweep.params.optimizer.momentun" in msg and "did you mean `momentum`" in msg


def test_value_that_does_not_fit_the_key_is_rejected_up_front(raw):
    raw["sweep"]["params"]["model.layers.2.dropout.p"] = {"uniform": [0.1, 1.5]}
    msg = user_error(raw)
    assert "sweep.params.model.layers.2.dropout.p: uniform value 1.5" in msg
    raw["sweep"]["params"] = {"loss.name": {"choice": ["cross_entropy", "mse"]}}
    assert 'sweep.params.loss.name: choice value "mse"' in user_error(raw)


def test_sweep_level_mistakes(raw):
    raw["sweep"]["params"] = {"optimizer.lr": {"grid": [0.1, 0.01]}}
    with pytest.raises(UserError, match=r"sweep\.trials: 10 trials per grid point"):
        validate(raw)
    raw["sweep"]["params"] = {"sweep.seed": {"grid": [1, 2]}}
    with pytest.raises(UserError, match="not a searchable key"):
        validate(copy.deepcopy(raw) | {"sweep": raw["sweep"] | {"trials": 1}})
    raw["sweep"] |= {"params": {"optimizer.lr": {"uniform": [0.1, 0.2]}}, "metric": "valid/auroc"}
    assert "sweep.metric: `valid/auroc` is not computed" in user_error(raw)
    no_sweep = {k: v for k, v in raw.items() if k != "sweep"}
    with pytest.raises(UserError, match="no `sweep:` section"):
        sweep.plan_trials(validate(no_sweep), "x.yaml")


def test_direction_defaults_from_the_metric_name():
    assert SweepConfig(metric="valid/loss", params={"a": {"grid": [1]}}).direction == "min"
    assert SweepConfig(metric="valid/f1", params={"a": {"grid": [1]}}).direction == "max"


def test_cli_rejects_a_bad_sweep_before_creating_anything(raw, tmp_path):
    raw["sweep"]["params"]["optimizer.lrr"] = {"log_uniform": [1e-4, 1e-2]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dist_train", "sweep", str(bad), "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "sweep.params.optimizer.lrr" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------- sweep directory


def test_rerun_resumes_grows_or_refuses_a_changed_sweep(raw, tmp_path):
    d = tmp_path / "s"
    trials, cfg = plan(raw, trials=3)
    assert "new sweep" in sweep.write_plan(d, trials, cfg, {})
    assert "resuming" in sweep.write_plan(d, trials, cfg, {})
    more, cfg5 = plan(raw, trials=5)
    assert "2 new" in sweep.write_plan(d, more, cfg5, {})
    other, cfg_other = plan(raw, trials=5, seed=9)
    with pytest.raises(UserError, match=r"holds a different sweep .*trial-000 was"):
        sweep.write_plan(d, other, cfg_other, {})
    (d / "trial-001" / "recipe.yaml").write_text("name: edited\n")
    with pytest.raises(UserError, match="edited by hand"):
        sweep.write_plan(d, more, cfg5, {})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(UserError, match="not a sweep directory"):
        sweep.write_plan(tmp_path / "busy", trials, cfg, {})


# ---------------------------------------------------------------------------- results


def fabricate(d: Path, raw: dict) -> None:
    """A 4-trial sweep: finished (two), failed, interrupted; accuracy per eval as given."""
    trials, cfg = plan(raw, trials=5)
    sweep.write_plan(d, trials, cfg, {"name": "wine-sweep"})
    accs = {0: [0.5, 0.8, 0.7], 1: [0.9, 0.95, 0.95], 2: [0.4], 3: [0.6, 0.97]}
    for i, curve in accs.items():
        t = d / f"trial-{i:03d}"
        evals = [{"event": "eval", "epoch": e, "step": 8 * (e + 1), "valid/accuracy": a}
                 for e, a in enumerate(curve)]  # fmt: skip
        (t / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        status = "finished" if i in (0, 1) else "running"
        times = {"start_time": "2026-01-01T10:00:00+0000", "end_time": "2026-01-01T10:00:12+0000"}
        (t / "run.json").write_text(json.dumps({"status": status, **times}))
    (d / "trial-002" / sweep.LAUNCHES).write_text(
        '{"event": "start", "time": 100.0}\n{"event": "end", "time": 103.5, "rc": 1}\n'
    )
    (d / "trial-003" / sweep.LAUNCHES).write_text(
        '{"event": "start", "time": 100.0}\n{"event": "end", "time": 104.0, "rc": 75}\n'
        '{"event": "start", "time": 200.0}\n')  # fmt: skip


def test_results_csv_leaderboard_and_best_yaml(raw, tmp_path):
    d = tmp_path / "s"
    fabricate(d, raw)
    plan_, rows, best = results.write_results(d)
    by = {r["trial"]: r for r in rows}
    assert [by[f"trial-00{i}"]["status"] for i in range(5)] == [
        "finished", "finished", "failed (exit 1)", "interrupted", "pending"]  # fmt: skip
    assert (by["trial-001"]["valid/accuracy"], by["trial-001"]["best_epoch"]) == (0.95, 2)
    assert by["trial-000"]["best_epoch"] == 2 and by["trial-000"]["best_step"] == 16
    assert by["trial-000"]["wall_s"] == 12.0 and by["trial-002"]["wall_s"] == 3.5
    assert by["trial-003"]["wall_s"] == 4.0 and by["trial-004"]["valid/accuracy"] is None
    # best.yaml: the best FINISHED trial (trial-003 scores higher but is interrupted)
    assert best == "trial-001"
    best_yaml = (d / "best.yaml").read_text()
    assert best_yaml.startswith("# Best trial") and load_recipe(d / "best.yaml").name.endswith(
        "trial-001"
    )
    lines = (d / "results.csv").read_text().splitlines()
    assert lines[0] == ("trial,optimizer.lr,optimizer.momentum,valid/accuracy,best_epoch,"
                        "best_step,wall_s,status")  # fmt: skip
    assert len(lines) == 6
    board = results.leaderboard(plan_, rows).splitlines()
    assert "2/5 trials finished" in board[0] and "higher is better" in board[0]
    order = [line.split()[1] for line in board[2:]]
    assert order == ["trial-003", "trial-001", "trial-000", "trial-002", "trial-004"]


def test_min_direction_ranks_lowest_first(raw, tmp_path):
    d = tmp_path / "s"
    fabricate(d, raw)
    data = json.loads((d / "sweep.json").read_text())
    data["direction"] = "min"
    (d / "sweep.json").write_text(json.dumps(data))
    plan_, rows = results.collect(d)
    ranking = [r["trial"] for r in results.ranked(plan_, rows)]
    assert ranking[:3] == ["trial-002", "trial-000", "trial-003"]
    assert {r["trial"]: r for r in rows}["trial-000"]["valid/accuracy"] == 0.5


def test_sweep_report_plots_metric_against_each_param(raw, tmp_path):
    from dist_train.report.html import write_report

    d = tmp_path / "s"
    fabricate(d, raw)
    results.write_results(d)
    html = write_report([d]).read_text()  # report.py's sweep hook
    assert (d / "sweep.png").stat().st_size > 5000
    assert "Leaderboard" in html and "trial-003" in html and "data:image/png;base64" in html


# ---------------------------------------------------------------------------- launching


def test_trial_commands():
    r, o = Path("s/trial-000/recipe.yaml"), Path("s/trial-000")
    assert trial_command("none", 1, None, r, o, [])[1:] == [
        "-m", "dist_train", "train", str(r), "-o", str(o)]  # fmt: skip
    tr = trial_command("torchrun", 2, 2345, r, o, [])
    assert tr[1:3] == ["-m", "torch.distributed.run"] and "2345" in tr and "2" in tr
    acc = trial_command("accelerate", 2, 2345, r, o, ["--config_file", "c.yaml"])
    assert "--multi_gpu" in acc and acc[acc.index("--main_process_port") + 1] == "2345"
    assert acc.index("--config_file") < acc.index("dist_train")


def test_job_array_runs_only_unfinished_trials_into_trial_nnn():
    recipes = [f"/s/trial-{i:03d}/recipe.yaml" for i in range(12)]
    text = slurm.array_script(recipes, sweep_dir="/s", max_concurrent=2, kind="cpu",
                              num_processes=2, task_ids=[0, 1, 2, 5, 7, 8, 11])  # fmt: skip
    assert "#SBATCH --array=0-2,5,7-8,11%2\n" in text
    assert "printf 'trial-%03d' \"$SLURM_ARRAY_TASK_ID\"" in text
    proc = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr
