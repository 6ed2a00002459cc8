"""The `dist-train` command. Each subpackage registers its own subcommands (a `register`
function in its cli module); this module only loops over them and turns errors into exit
codes: a user mistake exits 2 with one message, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from dist_train.errors import RunFailure, UserError, is_main_rank

# In `dist-train --help` order. Importing these must stay cheap (no torch): every command,
# even `schema`, builds the whole parser first.
SUBCOMMAND_MODULES = (
    "dist_train.training.cli",  # train
    "dist_train.tools.cli",  # check, summary, eval, predict
    "dist_train.report.cli",  # report
    "dist_train.config.cli",  # schema
    "dist_train.launch.cli",  # submit
    "dist_train.sweep.cli",  # sweep
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-train", description="Train PyTorch models from YAML recipes."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
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
    finally:
        leave_process_group()


def entry() -> int:
    """The process entry (`dist-train`, `python -m dist_train`, under torchrun/accelerate/
    SLURM): `main`, then every object still alive frozen (`gc.freeze`) before the interpreter
    exits. Finalization garbage-collects the heap of every imported module (torch, accelerate,
    datasets, torchmetrics with scipy/transformers): 1.2-1.8 s of a ~5 s job's process here,
    against ~0.3 s once frozen, since the collector skips frozen objects (measured with
    benchmarks/run.py's fixed-cost cases). The process ends right after, so nothing frozen
    could leak; `main` itself, which tests and notebooks call in-process, freezes nothing."""
    import gc

    code = main()
    gc.freeze()
    return code


def leave_process_group() -> None:
    """Tear the process group down before the interpreter exits, on every exit path (finished,
    preempted, a user error or a run failure on all ranks): left to the atexit order, a gloo
    rank has been seen to abort with "terminate called without an active exception" (exit -6
    instead of 0, 2 or 3). Local for gloo: no collective, so a rank whose peers are gone still
    gets through. torch is looked up, not imported: `schema`/`--help` never load it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    with contextlib.suppress(Exception):  # the exit code says what happened; cleanup only
        dist.destroy_process_group()
