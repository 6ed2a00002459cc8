"""`dist-train check | summary | eval | predict`: look at a recipe or a trained model."""

from __future__ import annotations

import argparse

from dist_train.config.cli import add_recipe_args
from dist_train.training.cli import leave_process_group


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate and build everything without training")
    add_recipe_args(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("summary", help="layer table: output shapes, trainable/frozen parameters")
    add_recipe_args(p)
    p.set_defaults(func=cmd_summary)
    for name, helptext in (
        ("eval", "metrics of a checkpoint on the validation split or --data"),
        ("predict", "predictions of a checkpoint for --data, as CSV"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_recipe_args(p)
        p.add_argument(
            "--checkpoint",
            required=True,
            help="model.safetensors, a run directory or a checkpoint directory",
        )
        p.add_argument(
            "--data",
            required=(name == "predict"),
            help="another data source (csv:PATH, ...) instead of the validation split",
        )
        p.add_argument("-o", "--output", help="output file (eval: JSON, predict: CSV)")
        p.set_defaults(func=cmd_eval if name == "eval" else cmd_predict)


def cmd_check(args: argparse.Namespace) -> int:
    from dist_train.tools.inspect import check

    print(check(args.recipe, args.overrides))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from dist_train.tools.inspect import summary

    print(summary(args.recipe, args.overrides))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dist_train.tools.predict import run_eval

    code = run_eval(args)
    leave_process_group()  # eval runs on N ranks like train: leave the group together
    return code


def cmd_predict(args: argparse.Namespace) -> int:
    from dist_train.tools.predict import run_predict

    code = run_predict(args)
    leave_process_group()  # same reason as eval
    return code
