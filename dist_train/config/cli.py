"""`dist-train schema`, and the recipe arguments every recipe-taking subcommand shares."""

from __future__ import annotations

import argparse


def add_recipe_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """RECIPE [key.sub=value | ~key.sub ...]; the CLI also accepts overrides after flags."""
    p.add_argument("recipe", nargs="?" if optional else None, help="path of the recipe YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value to set, ~key.sub to delete")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schema", help="print the recipe reference (markdown)")
    p.set_defaults(func=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    from dist_train.config.reference import reference_markdown

    print(reference_markdown())
    return 0
