"""`dist-train report RUN_DIR [RUN_DIR ...] [-o OUT_DIR]`: figures and a self-contained HTML."""

from __future__ import annotations

import argparse
import pathlib


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report and PNG plots of run directories (or of a sweep directory)",
        description="Plot loss, metrics, learning rate, throughput and confusion matrix of one or "
        "more runs and write a self-contained report.html (opens offline). A sweep directory "
        "gives its metric against each searched parameter instead.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=pathlib.Path,
        metavar="RUN_DIR",
        help="run directory holding metrics.jsonl (several: overlaid), or one sweep directory",
    )
    p.add_argument(
        "-o",
        "--out-dir",
        type=pathlib.Path,
        default=None,
        metavar="OUT_DIR",
        help="where to write PNGs and report.html (default: the run dir, or "
        "<parent of the first run>/report for several runs)",
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from dist_train.report.html import write_report  # lazy: matplotlib only when drawing

    print(f"report: {write_report(args.run_dirs, args.out_dir)}")
    return 0
