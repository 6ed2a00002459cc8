"""`dist-train sweep RECIPE [overrides] -o SWEEP_DIR`: sample all trials, then train them.

Locally: K trials at a time (`--parallel K`), each on 1 process or on N under torchrun /
accelerate launch with its own free rendezvous port; each trial is a plain
`python -m dist_train train trial-NNN/recipe.yaml -o trial-NNN` (which auto-resumes), its output
in trial-NNN/train.log and its launches in trial-NNN/launches.jsonl. With `--slurm`: one sbatch
job array, one task per unfinished trial, `%K` running at once. Re-running the same command
resumes the sweep: finished trials are skipped, interrupted ones resume from their checkpoints.
No torch import (the driver never trains).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from dist_train.config.base import batch_split_error
from dist_train.config.cli import add_recipe_args
from dist_train.errors import UserError
from dist_train.launch import slurm
from dist_train.launch.cli import add_slurm_args, check_request, slurm_settings, submit_script
from dist_train.sweep import plan as sweep
from dist_train.sweep import results
from dist_train.sweep.local import run_local

LAUNCHERS = ("none", "torchrun", "accelerate")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="hyperparameter search: sample every trial from the recipe's sweep: section, train "
        "them (K at a time, or as a SLURM job array), rank the results",
        description=__doc__.split("\n\n")[1],
    )
    add_recipe_args(p, optional=True)  # optional: `--collect -o DIR` needs none
    p.add_argument("-o", "--output-dir", required=True, help="sweep directory (trial-NNN/ inside)")
    p.add_argument("--parallel", type=int, default=1, metavar="K", help="trials at once (local)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="processes per trial")
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        help="how a trial starts: none (1 process), torchrun, accelerate "
        "(default: none for --nproc 1, else torchrun)",
    )
    p.add_argument(
        "--launcher-args",
        default="",
        metavar="ARGS",
        help='extra launcher flags, e.g. "--config_file launch/cpu.yaml"',
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="launch nothing: write results.csv and best.yaml from the trial "
        "directories and print the leaderboard (e.g. after a --slurm sweep)",
    )
    g = p.add_argument_group(
        "SLURM (one job array; the resource flags of `dist-train submit`, per trial)"
    )
    g.add_argument("--slurm", action="store_true", help="submit the trials as one sbatch array")
    g.add_argument("--max-concurrent", type=int, metavar="K", help="array tasks at once (%%K)")
    add_slurm_args(g)
    g.add_argument("--dry-run", action="store_true", help="write sweep.sbatch, do not submit")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from dist_train.config.recipe import load_recipe

    sweep_dir = Path(args.output_dir)
    if args.collect:
        return _report(sweep_dir, final=False)
    if not args.recipe:
        raise UserError("sweep: pass the recipe (dist-train sweep RECIPE -o SWEEP_DIR).")
    launcher = _check_local_flags(args)
    recipe = load_recipe(args.recipe, args.overrides)
    from dist_train.extras import require_trackers

    require_trackers(recipe.tracking)  # a missing wandb/tensorboard: before any trial starts
    trials, cfg = sweep.plan_trials(recipe, args.recipe)
    # Every check before anything is written: a refused request leaves no sweep directory.
    if args.slurm:
        request = _slurm_request(args, recipe, trials, sweep_dir.absolute())
    else:
        _check_batches(trials, args.nproc)
    meta = {"name": recipe.name, "recipe": args.recipe, "overrides": args.overrides}
    print(sweep.write_plan(sweep_dir, trials, cfg, meta), flush=True)
    results.write_results(sweep_dir)  # results.csv exists from the start: report/collect find it
    if args.slurm:
        return _submit_array(args, recipe, trials, sweep_dir.absolute(), request)
    run_local(
        sweep_dir, trials, cfg, args.parallel, launcher, args.nproc, shlex.split(args.launcher_args)
    )
    return _report(sweep_dir, final=True)


def _check_local_flags(args: argparse.Namespace) -> str:
    for flag, value in (("--parallel", args.parallel), ("--nproc", args.nproc)):
        if value < 1:
            raise UserError(f"sweep: {flag} {value} must be at least 1.")
    launcher = args.launcher or ("none" if args.nproc == 1 else "torchrun")
    if launcher == "none" and args.nproc > 1:
        raise UserError(
            f"sweep: --nproc {args.nproc} needs a launcher; add --launcher torchrun or "
            "--launcher accelerate."
        )
    return launcher


def _check_batches(trials: list[sweep.Trial], world: int) -> None:
    for t in trials:
        problem = batch_split_error(t.recipe.train.batch_size, world, t.recipe.train.grad_accum)
        if problem:
            raise UserError(f"sweep {t.name} with --nproc {world}: {problem}")


def _report(sweep_dir: Path, final: bool) -> int:
    plan, rows, best = results.write_results(sweep_dir)
    print("\n" + results.leaderboard(plan, rows))
    print(f"\nwrote {sweep_dir / sweep.RESULTS_FILE}")
    if best:
        print(f"best: {best} -> {sweep_dir / sweep.BEST_FILE}")
    unfinished = [r["trial"] for r in rows if r["status"] != "finished"]
    if final and unfinished:
        print(
            f"{len(unfinished)} trials not finished ({', '.join(unfinished[:5])}"
            f"{'...' if len(unfinished) > 5 else ''}); re-run the same command to resume them.",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------------------- SLURM


def _slurm_request(
    args: argparse.Namespace, recipe, trials: list[sweep.Trial], sweep_dir: Path
) -> dict:
    """The job array's settings (flags, recipe `slurm:`, defaults), checked for every trial as
    `dist-train submit` checks one job."""
    s = slurm_settings(args, recipe)
    if s["kind"] == "cpu" and s["num_processes"] is None:
        s["num_processes"] = args.nproc
    check_request(s, [t.recipe for t in trials], sweep_dir)
    if s["kind"] != "cpu":
        s["num_processes"] = None  # one process per GPU
    return s


def _submit_array(
    args: argparse.Namespace, recipe, trials: list[sweep.Trial], sweep_dir: Path, request: dict
) -> int:
    s = dict(request)
    kind = s.pop("kind")
    todo = [t.index for t in trials if results.trial_status(sweep_dir / t.name) != "finished"]
    if not todo:
        print("[sweep] every trial is finished; nothing to submit")
        return _report(sweep_dir, final=True)
    _refuse_if_queued(sweep_dir)
    text = slurm.array_script(
        [sweep_dir / t.name / "recipe.yaml" for t in trials],
        sweep_dir=sweep_dir,
        max_concurrent=args.max_concurrent,
        kind=kind,
        job_name=sweep.group_name(recipe.name),
        python=sys.executable,
        task_ids=todo,
        **s,
    )
    job = submit_script(text, sweep_dir, args.dry_run, name="sweep.sbatch")
    if args.dry_run:
        return 0
    with open(sweep_dir / "slurm-jobs.txt", "a") as f:
        f.write(f"{job}\n")
    print(
        f"submitted job array {job}: {len(todo)} trials of {recipe.name}, "
        f"{args.max_concurrent or 'all'} at once, into {sweep_dir}"
    )
    print(f"  follow a trial:  tail -f {sweep_dir}/slurm-{job}_<task>.out")
    print(f"  queue / cancel:  squeue -j {job}   scancel {job}")
    print(f"  results:         dist-train sweep --collect -o {sweep_dir}")
    return 0


def _refuse_if_queued(sweep_dir: Path) -> None:
    """A second array over the same trial dirs would train them twice at once."""
    try:
        jobs = (sweep_dir / "slurm-jobs.txt").read_text().split()
    except OSError:
        return
    if not jobs:
        return
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-j", jobs[-1], "-o", "%i %T"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return
    if proc.returncode == 0 and proc.stdout.strip():
        raise UserError(
            f"-o {sweep_dir}: job array {jobs[-1]} of this sweep is still queued or running; "
            f"wait for it (squeue -j {jobs[-1]}) or cancel it (scancel {jobs[-1]}) first."
        )
