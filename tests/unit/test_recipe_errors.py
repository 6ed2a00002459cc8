"""Strict recipes: every user mistake exits 2 with the key path / file, what was expected and,
where a near name exists, "did you mean" — never a traceback.

The CASES table doubles as documentation: `pytest -v` prints each case id, and the test prints
the first line of the message it gets (see `-s` or the captured output of a failure).
Most cases call `dist_train.cli.main([...])` in-process (a subprocess costs seconds of imports);
`test_process_level` runs a few representative ones as real `python -m dist_train` processes.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from dist_train.cli import main

BASE = {
    "name": "t",
    "seed": 0,
    "data": {
        "source": "csv:data.csv",
        "target": "label",
        "task": "multiclass",
        "valid_fraction": 0.25,
    },
    "model": {"layers": [{"linear": 8}, "relu", {"dropout": 0.1}, {"linear": "out"}]},
    "loss": "cross_entropy",
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "train": {"epochs": 1, "batch_size": 4},
    "metrics": ["accuracy"],
}
DATA_CSV = "a,b,label\n" + "".join(f"{i * 0.5},{i % 4},{i % 3}\n" for i in range(12))
GAP_CSV = "a,b,label\n1,x,0\n2,y,1\n3,,2\n4,w,0\n"
NAN_LABEL_CSV = "a,b,label\n1,2,0\n2,3,1\n3,4,\n4,5,1\n"


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]  # substrings of stderr
    mutate: Callable[[dict], None] | None = None  # edit of BASE before it is written
    text: str | None = None  # or the raw recipe file content
    overrides: tuple[str, ...] = ()
    command: str = "check"
    path: str = "recipe.yaml"  # the recipe path given on the command line
    files: dict[str, str] = field(default_factory=dict)  # extra files in the working dir
    absent: tuple[str, ...] = ()  # substrings stderr must not contain


def at(path: str, value) -> Callable[[dict], None]:
    """A mutation setting a dotted key of the recipe (`_DELETE` removes it)."""

    def mutate(raw: dict) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()
# A sentence ending twice ("fix it.."), not an ellipsis ("...") or a relative path ("../x").
DOUBLED_PERIOD = re.compile(r"(?<!\.)\.\.(?![./])")


def append_layer(layer) -> Callable[[dict], None]:
    return lambda raw: raw["model"]["layers"].append(layer)


def both(*fns: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        for fn in fns:
            fn(raw)

    return mutate


BINARY = at("data.task", "binary")
CONV_NO_FLATTEN = both(
    at("data.shape", [1, 1, 2]),
    at("model.layers", [{"conv2d": {"out": 2, "kernel": 1}}, "relu", {"linear": "out"}]),
)

CASES = [
    # --- the file itself -------------------------------------------------------------------
    Case(
        "malformed_yaml",
        ("recipe.yaml:3:", "malformed YAML", "indentation"),
        text="name: t\nseed: 0\n  data: x\n",
    ),
    Case("empty_recipe", ("recipe.yaml", "the recipe is empty"), text="# nothing here\n"),
    Case("not_a_mapping", ("recipe.yaml", "a recipe is a mapping"), text="- linear: 3\n- relu\n"),
    Case("missing_recipe_file", ("nope.yaml", "recipe file not found"), path="nope.yaml"),
    # --- unknown keys, at every level --------------------------------------------------------
    Case(
        "unknown_top_key",
        ("optimiser: unknown key", "did you mean `optimizer`"),
        at("optimiser", {"name": "sgd"}),
    ),
    Case(
        "unknown_data_key",
        ("data.sorce: unknown key", "did you mean `source`"),
        at("data.sorce", "csv:x.csv"),
    ),
    Case(
        "unknown_model_key",
        ("model.inits: unknown key", "did you mean `init`"),
        at("model.inits", {"weight": "zeros"}),
    ),
    Case(
        "unknown_optimizer_key",
        ("optimizer.momentun: unknown key", "did you mean `momentum`"),
        at("optimizer.momentun", 0.9),
    ),
    Case(
        "unknown_scheduler_key",
        ("scheduler.warmup: unknown key", "`warmup_steps`"),
        at("scheduler", {"name": "cosine", "warmup": 5}),
    ),
    Case(
        "unknown_train_key",
        ("train.epoch: unknown key", "did you mean `epochs`"),
        at("train.epoch", 3),
    ),
    Case(
        "unknown_early_stopping_key",
        ("train.early_stopping.patince: unknown key", "did you mean `patience`"),
        at("train.early_stopping", {"patince": 3}),
    ),
    Case(
        "unknown_checkpoint_key",
        ("checkpoint.evry_steps: unknown key", "`every_steps`"),
        at("checkpoint", {"evry_steps": 10}),
    ),
    Case(
        "unknown_finetune_key",
        ("finetune.frm: unknown key", "did you mean `from`"),
        at("finetune", {"frm": "x.safetensors"}),
    ),
    Case(
        "unknown_wandb_key",
        ("tracking.wandb.projekt: unknown key", "did you mean `project`"),
        at("tracking", {"wandb": {"projekt": "p"}}),
    ),
    Case(
        "unknown_layer_arg",
        ("model.layers[0]", "`linear` argument `outs`", "did you mean `out`"),
        at("model.layers.0", {"linear": {"outs": 3}}),
    ),
    Case(
        "unknown_layer",
        ("model.layers[1]", "unknown layer `relus`", "did you mean `relu`"),
        at("model.layers.1", "relus"),
    ),
    # --- types and ranges -----------------------------------------------------------------
    Case(
        "epochs_not_int",
        ("train.epochs", "valid integer", '"many"'),
        overrides=("train.epochs=many",),
    ),
    Case(
        "lr_not_number",
        ("optimizer.lr", "valid number", '"fast"'),
        overrides=("optimizer.lr=fast",),
    ),
    Case(
        "unknown_optimizer_name",
        ("optimizer.name", "'sgd', 'adam'", "did you mean `adam`"),
        overrides=("optimizer.name=adamm",),
    ),
    Case(
        "unknown_loss_name",
        ("loss.name", "did you mean `cross_entropy`"),
        at("loss", "cross_entropyy"),
    ),
    Case(
        "dropout_out_of_range",
        ("model.layers[2]", "`dropout` argument `p`", "less than 1", "1.5"),
        at("model.layers.2", {"dropout": 1.5}),
    ),
    Case(
        "negative_lr", ("optimizer.lr", "greater than 0", "-0.1"), overrides=("optimizer.lr=-0.1",)
    ),
    Case(
        "valid_fraction_one",
        ("data.valid_fraction", "less than 1"),
        overrides=("data.valid_fraction=1.0",),
    ),
    # --- semantic mistakes ------------------------------------------------------------------
    Case(
        "softmax_before_cross_entropy",
        ("model.layers[4]", "softmax", "remove the final softmax"),
        append_layer("softmax"),
    ),
    Case(
        "sigmoid_before_bce_with_logits",
        ("model.layers[4]", "applies sigmoid twice", "loss: bce"),
        both(BINARY, at("loss", "bce_with_logits"), append_layer("sigmoid")),
    ),
    Case(
        "bce_without_sigmoid",
        ("model.layers[3]", "last layer must be sigmoid", "bce_with_logits"),
        both(BINARY, at("loss", "bce")),
    ),
    Case(
        "regression_with_cross_entropy",
        ("loss:", "classification loss", "use mse"),
        at("data.task", "regression"),
    ),
    Case(
        "multiclass_with_mse", ("loss:", "regression loss", "use cross_entropy"), at("loss", "mse")
    ),
    Case(
        "metric_not_for_task",
        ("metrics[1]", "`r2` is not a multiclass metric", "accuracy"),
        at("metrics", ["accuracy", "r2"]),
    ),
    Case(
        "early_stopping_monitor_not_computed",
        ("train.early_stopping.monitor", "`valid/f1` is not computed", "add the metric"),
        at("train.early_stopping", {"monitor": "valid/f1"}),
    ),
    Case(
        "batch_not_divisible_by_grad_accum",
        ("train.batch_size 10", "does not split evenly", "train.grad_accum 4"),
        overrides=("train.batch_size=10", "train.grad_accum=4"),
    ),
    Case(
        "momentum_with_adam",
        ("optimizer.momentum", "adam has no momentum", "betas"),
        overrides=("optimizer.name=adam",),
    ),
    Case(
        "nesterov_without_momentum",
        ("optimizer.nesterov", "momentum > 0"),
        overrides=("optimizer.nesterov=true", "optimizer.momentum=0"),
    ),
    Case(
        "two_backbones",
        ("model:", "one of module, factory or hf", "module and factory"),
        overrides=("model.module.path=torch.nn:Linear", "model.factory.path=torch.nn:Linear"),
    ),
    Case(
        "neither_layers_nor_backbone",
        ("model:", "give `layers`", "a backbone"),
        overrides=("~model.layers",),
    ),
    # --- overrides ------------------------------------------------------------------------
    Case("override_without_equals", ("override `foo`", "key.sub=value"), overrides=("foo",)),
    Case("override_delete_with_value", ("override `~a=b`", "~key.sub"), overrides=("~a=b",)),
    Case(
        "override_index_out_of_range",
        ("override `model.layers.99=relu`", "not an index of a 4-item list"),
        overrides=("model.layers.99=relu",),
    ),
    Case(
        "override_inside_scalar",
        ("override `name.x=1`", "`name` holds a single value"),
        overrides=("name.x=1",),
    ),
    # --- data -----------------------------------------------------------------------------
    Case(
        "missing_data_file",
        ("data.source `csv:nope.csv`", "file nope.csv not found"),
        overrides=("data.source=csv:nope.csv",),
    ),
    Case(
        "missing_target_column",
        ("column `labl`", "did you mean `label`"),
        overrides=("data.target=labl", "data.features=[a,b]"),
    ),
    Case(
        "missing_feature_cell",
        ("feature `b` is missing/NaN in row 2", "gap.csv", "data.missing: drop"),
        overrides=("data.source=csv:gap.csv",),
        files={"gap.csv": GAP_CSV},
    ),
    Case(
        "test_and_valid_fraction_leave_no_training_rows",
        ("data.test_fraction 0.8 + data.valid_fraction 0.25", "keep their sum below 1"),
        overrides=("data.test_fraction=0.8",),
    ),
    Case(
        "categorical_not_a_feature",
        ("data.categorical: column `c`", "not a feature column"),
        overrides=("data.categorical={c: onehot}",),
    ),
    Case(
        "nan_label",
        ("data.target `label`", "NaN in row 2", "needs a label"),
        overrides=("data.source=csv:nan.csv",),
        files={"nan.csv": NAN_LABEL_CSV},
    ),
    Case(
        "label_outside_num_classes",
        ("label 2 outside the 2 classes", "data.num_classes"),
        overrides=("data.num_classes=2",),
    ),
    Case(
        "classes_match_no_row",
        ("data.classes [5, 7]", "5, 7 match no row", "labels present: 0, 1, 2"),
        overrides=("data.classes=[5,7]",),
        absent=("batch_size",),  # not a consequence (0 training rows) but the cause
    ),
    Case(
        "classes_of_another_type",
        ("data.classes ['cat', 'dog']", "labels present: 0, 1, 2"),
        overrides=("data.classes=[cat,dog]",),
    ),
    Case(
        "csv_without_rows",
        ("data.source `csv:empty.csv`", "has a header but no rows"),
        overrides=("data.source=csv:empty.csv",),
        files={"empty.csv": "a,b,label\n"},
        absent=("Instruction", "corresponds to no data"),  # datasets' internals
    ),
    Case(
        "shape_does_not_fit",
        ("data.shape [3, 3]", "9 values", "2 features"),
        overrides=("data.shape=[3,3]",),
    ),
    # --- model building -------------------------------------------------------------------
    Case(
        "linear_after_conv_without_flatten",
        ("model.layers[2] (linear)", "add `- flatten`"),
        CONV_NO_FLATTEN,
    ),
    Case(
        "unimportable_module",
        ("`nope_pkg.mod:Net`", "cannot import", "PYTHONPATH"),
        at("model", {"module": {"path": "nope_pkg.mod:Net"}}),
    ),
    Case(
        "module_file_path_refused",
        ("`../evil.py:X`", "file paths are not accepted"),
        at("model", {"module": {"path": "../evil.py:X"}}),
    ),
    # --- found when training starts ---------------------------------------------------------
    Case(
        "fp16_on_cpu",
        ("train.mixed_precision", "fp16 needs a CUDA GPU", "bf16"),
        overrides=("-o", "run", "train.mixed_precision=fp16"),
        command="train",
    ),
]
SUBPROCESS_IDS = ("malformed_yaml", "unknown_top_key", "missing_data_file", "fp16_on_cpu")


def _workdir(case: Case, tmp: Path) -> list[str]:
    """Write the recipe and data files for `case` into `tmp`; the CLI arguments to run it."""
    (tmp / "data.csv").write_text(DATA_CSV)
    for name, content in case.files.items():
        (tmp / name).write_text(content)
    if case.text is not None:
        (tmp / "recipe.yaml").write_text(case.text)
    else:
        raw = copy.deepcopy(BASE)
        if case.mutate:
            case.mutate(raw)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return [case.command, case.path, *case.overrides]


def _skip_if_gpu(case: Case) -> None:
    if case.id == "fp16_on_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a CUDA machine")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_case(case, tmp_path, monkeypatch, capsys):
    _skip_if_gpu(case)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code = main(_workdir(case, tmp_path))
    err = capsys.readouterr().err
    message = err.removeprefix("error: ")
    with capsys.disabled():
        print(f"\n  [{case.id}] {_first_line(message)}", end="")
    assert code == 2, err
    assert err.startswith("error: "), err
    for want in case.expect:
        assert want in err, f"{want!r} missing from:\n{err}"
    assert "Traceback" not in err
    for unwanted in case.absent:
        assert unwanted not in err, f"{unwanted!r} in:\n{err}"
    assert not DOUBLED_PERIOD.search(err), f"doubled period in:\n{err}"


def _first_line(message: str) -> str:
    """The line a user reads first: the offending entry of an `invalid recipe:` list."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith("invalid recipe:"):
        return lines[1].removeprefix("- ")
    return lines[0] if lines else ""


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_process_level(case_id, tmp_path):
    """The real `python -m dist_train` process: exit status 2, one message, no traceback."""
    case = next(c for c in CASES if c.id == case_id)
    _skip_if_gpu(case)
    args = _workdir(case, tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for want in case.expect:
        assert want in proc.stderr, f"{want!r} missing from:\n{proc.stderr}"
    assert proc.stdout == ""


def test_table_covers_every_level():
    """Guard against the table silently shrinking: unknown keys are tested at every level."""
    ids = {c.id for c in CASES}
    levels = (
        "top",
        "data",
        "model",
        "optimizer",
        "scheduler",
        "train",
        "early_stopping",
        "checkpoint",
        "finetune",
        "wandb",
        "layer_arg",
    )
    assert all(f"unknown_{lv}_key" in ids or f"unknown_{lv}" in ids for lv in levels)
