"""Subcommands: train, check, summary, eval, predict, report, submit, schema. Thin: each one
parses flags and calls the module that does the work; user mistakes exit 2 with one message."""

from __future__ import annotations

import argparse
import sys

from dist_train.errors import RunFailure, UserError, is_main_rank


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path of the recipe YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value to set, ~key.sub to delete")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe (auto-resumes an existing -o directory)")
    _recipe_args(p)
    p.add_argument("-o", "--output-dir", help="run directory (default runs/<name>/<timestamp>)")
    p.add_argument("--restart", action="store_true", help="discard the run directory's state")
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="resume even though training-relevant recipe fields changed",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("check", help="validate and build everything without training")
    _recipe_args(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("summary", help="layer table: output shapes, trainable/frozen parameters")
    _recipe_args(p)
    p.set_defaults(func=cmd_summary)
    for name, helptext in (
        ("eval", "metrics of a checkpoint on the validation split or --data"),
        ("predict", "predictions of a checkpoint for --data, as CSV"),
    ):
        p = sub.add_parser(name, help=helptext)
        _recipe_args(p)
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
    sub.add_parser(
        "report", help="HTML report and PNG plots of run directories", add_help=False
    )  # its own parser lives in report.py
    p = sub.add_parser("schema", help="print the recipe reference (markdown)")
    p.set_defaults(func=cmd_schema)
    from dist_train.launch import cli as slurm_cli
    from dist_train.sweep import cli as sweep_cli

    slurm_cli.register(sub)
    sweep_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["report"]:
            return _report(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # Overrides may also come after flags (`train R.yaml -o DIR a.b=1`).
        if (
            extra
            and hasattr(args, "overrides")
            and all("=" in e or e.startswith("~") for e in extra)
        ):
            args.overrides += extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args) or 0
    except UserError as err:
        if is_main_rank():  # N ranks hit the same mistake; say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except RunFailure as err:
        if err.all_ranks or is_main_rank():  # a survivor must speak even if rank 0 is gone
            print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def cmd_train(args) -> int:
    from dist_train.training import signals

    signals.install()  # first: a SLURM warning signal during start-up must not be lost
    from dist_train.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from dist_train.extras import require_trackers

    require_trackers(recipe.tracking)  # a missing extra: exit 2 before any process group
    from dist_train.training.trainer import EXIT_PREEMPTED, Preempted, train

    try:
        train(recipe, args.output_dir, restart=args.restart, allow_changed=args.allow_changed)
    except Preempted:
        _leave_process_group()
        return EXIT_PREEMPTED
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits (every rank got here through
    the same final barrier): left to the atexit order, a gloo rank has been seen to abort with
    "terminate called without an active exception", turning a finished job into a failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_check(args) -> int:
    from dist_train.tools.inspect import check

    print(check(args.recipe, args.overrides))
    return 0


def cmd_summary(args) -> int:
    from dist_train.tools.inspect import summary

    print(summary(args.recipe, args.overrides))
    return 0


def cmd_eval(args) -> int:
    from dist_train.tools.predict import run_eval

    code = run_eval(args)
    _leave_process_group()
    return code


def cmd_predict(args) -> int:
    from dist_train.tools.predict import run_predict

    code = run_predict(args)
    _leave_process_group()
    return code


def _report(argv: list[str]) -> int:
    from dist_train.report.html import main as report_main

    return report_main(argv)


def cmd_schema(args) -> int:
    from dist_train.config.reference import reference_markdown

    print(reference_markdown())
    return 0
