"""`dist-train check | summary | eval | predict | lr-find`: look at a recipe or a trained
model, or try learning rates on it."""

from __future__ import annotations

import argparse

from dist_train.config.cli import add_recipe_args


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
    p = sub.add_parser(
        "lr-find", help="learning-rate range test: loss vs exponentially growing lr, a suggestion"
    )
    add_recipe_args(p)
    p.add_argument("--start", type=float, default=1e-7, help="first lr (default 1e-7)")
    p.add_argument("--end", type=float, default=10.0, help="last lr (default 10)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps at most (default 100)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override"
    )
    p.add_argument("--out", help="where the plot and lr_find.json go (default: a temp dir)")
    p.add_argument(
        "--write-override",
        action="store_true",
        help="also write the suggested `optimizer.lr=...` line to OUT/override.txt",
    )
    p.set_defaults(func=cmd_lr_find)


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

    return run_eval(args)  # on N ranks like train: cli.main leaves the process group


def cmd_predict(args: argparse.Namespace) -> int:
    from dist_train.tools.predict import run_predict

    return run_predict(args)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dist_train.config.recipe import load_recipe
    from dist_train.errors import is_main_rank
    from dist_train.tools.lr_find import default_out, lr_find, report, write

    overrides = [*args.overrides, *args.set]
    recipe = load_recipe(args.recipe, overrides)
    result = lr_find(recipe, args.start, args.end, args.steps)  # on every rank
    if is_main_rank():  # one writer: the same result on every rank
        out = Path(args.out) if args.out else default_out(recipe.name)
        files = write(result, out, recipe, args.write_override)
        print(report(result, args.recipe, overrides, files), flush=True)
    return 0
