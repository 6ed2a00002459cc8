"""`dist-train train`: a recipe into a run directory (auto-resumes an existing -o directory)."""

from __future__ import annotations

import argparse

from dist_train.config.cli import add_recipe_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe (auto-resumes an existing -o directory)")
    add_recipe_args(p)
    p.add_argument("-o", "--output-dir", help="run directory (default runs/<name>/<timestamp>)")
    p.add_argument("--restart", action="store_true", help="discard the run directory's state")
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="resume even though training-relevant recipe fields changed",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
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
        return EXIT_PREEMPTED  # cli.main leaves the process group on every path
    return 0
