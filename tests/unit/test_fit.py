"""dist_train.fit (issue 14, item 5): your nn.Module, Dataset and torchmetrics objects with a
recipe's training settings give exactly the recipe path's run, twice in one process; a
datasets.Dataset works as a table; a signal mid-run saves, and calling fit again resumes
bitwise; bad inputs are one-paragraph errors naming what to fix."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from fit_helpers import (
    FIT_RECIPE,
    RECIPE,
    Rows,
    as_recipe_names,
    user_metrics,
    user_model,
    write_tables,
)
from procs import bitwise_equal, cli_here, weights

import dist_train
from dist_train.config.recipe import validate
from dist_train.errors import UserError
from dist_train.training.trainer import Preempted


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_tables(tmp_path_factory.mktemp("fit"))


@pytest.fixture(scope="module")
def reference(tables, tmp_path_factory):
    """The recipe path (csv sources, layer list): its final metrics and weights."""
    raw = copy.deepcopy(RECIPE)
    raw["data"] |= {"source": f"csv:{tables[0]}", "valid_source": f"csv:{tables[1]}"}
    out = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    result = dist_train.train(validate(raw), output_dir=str(out))
    return result, weights(out / "model.safetensors")


def test_fit_with_user_objects_equals_the_recipe_path_twice(tables, reference, tmp_path):
    want, want_weights = reference
    model, metrics = user_model(), user_metrics()
    initial = copy.deepcopy(model.state_dict())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    train, valid = Rows(tables[0]), Rows(tables[1])
    results = []
    for i in range(2):
        res = dist_train.fit(
            FIT_RECIPE,
            model=model,
            train_data=train,
            valid_data=valid,
            metrics=metrics,
            output_dir=str(tmp_path / f"fit{i}"),
        )
        results.append(res)
        assert res.metrics["valid/accuracy"] == want["valid/accuracy"]
        assert res.metrics["valid/loss"] == want["valid/loss"]
        assert res.metrics["valid/rows"] == 37
        assert bitwise_equal(as_recipe_names(res.model.state_dict()), want_weights)
        assert res.run_dir == tmp_path / f"fit{i}" and res.best_metrics["valid/loss"] > 0
        # the caller's objects are untouched; the handlers and stop flag are restored
        assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
        assert metrics["accuracy"]._update_count == 0
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    saved = (tmp_path / "fit0" / "recipe.yaml").read_text()
    assert "source: 'python:Rows'" in saved and "task: multiclass" in saved


def test_fit_takes_a_hf_dataset_as_a_table(tables, tmp_path):
    import datasets

    rows = Rows(tables[0])
    columns = {f"f{i}": rows.x[:, i].tolist() for i in range(6)} | {"label": rows.y.tolist()}
    hf = datasets.Dataset.from_dict(columns)
    over = {"data.target": "label", "data.valid_fraction": 0.25}  # the task follows the loss
    res = dist_train.fit(
        FIT_RECIPE,
        model=user_model(),
        train_data=hf,
        overrides=over,
        output_dir=str(tmp_path / "a"),
    )
    assert res.metrics["valid/rows"] == 36  # a quarter of 144 held out, seeded
    assert json.loads((tmp_path / "a" / "run.json").read_text())["status"] == "finished"


class _Preempting(torch.nn.Module):
    """Your model, whose 8th training forward sends this process SIGTERM (as a scheduler
    would), once per test session."""

    fired = False

    def __init__(self) -> None:
        super().__init__()
        self.net, self.calls = user_model(), 0

    def forward(self, x):
        self.calls += self.training
        if self.calls == 8 and not _Preempting.fired:
            _Preempting.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


def test_a_signal_saves_and_the_next_fit_resumes_bitwise(tables, reference, tmp_path):
    _, want_weights = reference
    args = {
        "train_data": Rows(tables[0]),
        "valid_data": Rows(tables[1]),
        "output_dir": str(tmp_path / "run"),
        "overrides": {"checkpoint.every_epochs": 1},
    }
    with pytest.raises(Preempted):
        dist_train.fit(FIT_RECIPE, model=_Preempting(), **args)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the stop
    res = dist_train.fit(FIT_RECIPE, model=_Preempting(), **args)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["step"] == 8 for e in events)
    got = {k.removeprefix("net."): v for k, v in res.model.state_dict().items()}
    assert bitwise_equal(as_recipe_names(got), want_weights)


def test_bad_fit_inputs_say_what_to_fix(tables, tmp_path):
    with pytest.raises(UserError, match=r"fit\(model=...\): expected a torch nn.Module"):
        dist_train.fit(FIT_RECIPE, model=object(), train_data=Rows(tables[0]))
    with pytest.raises(UserError, match="is not a torchmetrics Metric"):
        dist_train.fit(FIT_RECIPE, model=user_model(), train_data=[], metrics={"acc": 1})
    with pytest.raises(UserError, match=r"item 0 is a Tensor, not an \(x, y\) pair"):
        dist_train.fit(FIT_RECIPE, model=user_model(), train_data=torch.zeros(4, 6))
    with pytest.raises(UserError, match="model: required key is missing"):
        dist_train.fit(FIT_RECIPE, train_data=Rows(tables[0]))


def test_recipe_files_still_need_a_model_and_a_real_source(tables, tmp_path):
    path = tmp_path / "r.yaml"
    raw = copy.deepcopy(RECIPE)
    raw["data"] |= {"source": f"csv:{tables[0]}", "valid_source": None}
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "model"}))
    r = cli_here("check", str(path))
    assert r.returncode == 2 and "model: required key is missing" in r.stderr
    path.write_text(json.dumps(raw | {"data": raw["data"] | {"source": "python:Rows"}}))
    r = cli_here("check", str(path))
    assert r.returncode == 2 and "python: data comes only from dist_train.fit" in r.stderr
