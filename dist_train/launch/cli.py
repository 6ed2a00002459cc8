"""`dist-train submit`: a recipe plus flags -> RUN_DIR/job.sbatch -> `sbatch`.

Flags win over the recipe's `slurm:` section, which wins over SlurmConfig's defaults.
Everything that can be checked before queueing is checked here (recipe, processes vs
GPUs vs global batch, time and grace, run directory), so a bad request fails in a
second on the login node instead of after hours in the queue. No torch import.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from dist_train.config.cli import add_recipe_args
from dist_train.errors import UserError
from dist_train.launch import slurm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="render a SLURM batch script for a recipe into the run directory and sbatch it",
        description="Render RUN_DIR/job.sbatch from the recipe and flags and submit it with "
        "sbatch. The job checkpoints on SIGUSR1 (sent --grace seconds before --time), "
        "requeues itself and resumes into the same run directory.",
    )
    add_recipe_args(p)
    add_slurm_args(p)
    p.add_argument("-o", "--output-dir", help="run directory (default runs/<name>/<timestamp>)")
    p.add_argument("--dry-run", action="store_true", help="write and print the script only")
    p.set_defaults(func=cmd_submit)


def add_slurm_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The resource flags of `submit`, shared by `sweep --slurm` (per trial there)."""
    p.add_argument("--nodes", type=int, help="nodes (default: recipe slurm.nodes, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one process each; 0 = CPU")
    p.add_argument("--processes", type=int, help="--kind cpu: processes (gloo ranks)")
    p.add_argument(
        "--kind",
        choices=slurm.KINDS,
        help="template (default: cpu if --gpus-per-node is 0, else single_node/multi_node)",
    )
    p.add_argument("--time", help="time limit HH:MM:SS or D-HH:MM:SS (default 01:00:00)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--grace", type=int, help="seconds before --time to checkpoint (default 120)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (sbatch --cpus-per-task)")
    p.add_argument("--mem", help="memory per node (sbatch --mem), e.g. 64G")
    p.add_argument("--ifname", help="network interface for NCCL/gloo, e.g. ib0 (multi-node)")
    p.add_argument("--rdzv-timeout", type=int, help="multi-node: rendezvous timeout in seconds")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra sbatch option, repeatable, e.g. --sbatch=--account=abc",
    )


def slurm_settings(args: argparse.Namespace, recipe) -> dict:
    """Flag, else recipe `slurm:`, else the SlurmConfig default; plus the template `kind`."""
    from dist_train.config.schema import SlurmConfig

    base = recipe.slurm or SlurmConfig()
    pick = lambda flag, field: flag if flag is not None else getattr(base, field)  # noqa: E731
    s = {
        "nodes": pick(args.nodes, "nodes"),
        "gpus_per_node": pick(args.gpus_per_node, "gpus_per_node"),
        "num_processes": pick(args.processes, "processes"),
        "time": pick(args.time, "time"),
        "partition": pick(args.partition, "partition"),
        "grace_s": pick(args.grace, "grace_s"),
        "cpus_per_task": pick(args.cpus_per_task, "cpus_per_task"),
        "mem": pick(args.mem, "mem"),
        "ifname": pick(args.ifname, "ifname"),
        "rdzv_timeout_s": pick(args.rdzv_timeout, "rdzv_timeout_s"),
        "extra_sbatch": [*base.extra_sbatch, *args.sbatch],
    }
    kind = args.kind
    if kind is None:
        kind = (
            "cpu" if s["gpus_per_node"] == 0 else "single_node" if s["nodes"] == 1 else "multi_node"
        )
    s["kind"] = kind
    if s["mem"] is not None and not re.fullmatch(r"\d+[KMGT]?", s["mem"]):
        raise UserError(
            f"--mem {s['mem']!r}: write memory per node as SLURM does, e.g. 64G or 32000 (MB)."
        )
    if s["cpus_per_task"] is None:  # one task per node runs all its ranks: cores for each
        per_node = s["gpus_per_node"] if kind != "cpu" else (s["num_processes"] or 1)
        s["cpus_per_task"] = max(1, per_node) * (recipe.train.threads or 1)
    return s


def check_request(settings: dict, recipes: list, run_dir: Path) -> None:
    """`slurm.preflight` for every recipe the job will train (a sweep: each trial's batch), as
    a UserError: exit 2 on the login node, nothing written, nothing queued."""
    s = settings
    try:
        for recipe in recipes:
            slurm.preflight(
                s["kind"],
                nodes=s["nodes"],
                gpus_per_node=s["gpus_per_node"],
                num_processes=s["num_processes"],
                time=s["time"],
                grace_s=s["grace_s"],
                global_batch=recipe.train.batch_size,
                grad_accum=recipe.train.grad_accum,
                run_dir=run_dir,
            )
    except ValueError as err:
        raise UserError(str(err)) from None


def submit_script(text: str, run_dir: Path, dry_run: bool, name: str = "job.sbatch") -> str:
    """Write run_dir/name and sbatch it (the job id), or with --dry-run print it (returns "")."""
    try:
        job = slurm.submit(text, run_dir, dry_run=dry_run, name=name)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(str(err)) from None
    if dry_run:
        script = run_dir / name
        print(text, end="")
        print(f"wrote {script} (not queued; submit it with `sbatch {script}`)", file=sys.stderr)
    return job


def _check_run_dir(run_dir: Path) -> None:
    """A finished run would make the job fail at once after waiting in the queue."""
    info = run_dir / "run.json"
    try:
        status = json.loads(info.read_text()).get("status")
    except (OSError, ValueError):
        return
    if status == "finished":
        raise UserError(
            f"-o {run_dir} holds a finished run; choose another -o directory (or train it "
            f"again with `dist-train train ... -o {run_dir} --restart`)."
        )


def cmd_submit(args: argparse.Namespace) -> int:
    from dist_train.config.recipe import load_recipe
    from dist_train.run.rundir import timestamped_run_dir  # lazy: building the parser stays light

    recipe = load_recipe(args.recipe, args.overrides)  # UserError: exit 2, nothing queued
    from dist_train.extras import require_trackers

    require_trackers(recipe.tracking)  # a missing wandb/tensorboard: also before queueing
    s = slurm_settings(args, recipe)
    run_dir = Path(args.output_dir or timestamped_run_dir(recipe.name)).absolute()
    check_request(s, [recipe], run_dir)
    _check_run_dir(run_dir)
    kind = s.pop("kind")
    if kind != "cpu" and s["num_processes"] is not None:
        s["num_processes"] = None  # one process per GPU; preflight checked it matches
    text = slurm.render_sbatch(
        kind,
        job_name=recipe.name,
        run_dir=run_dir,
        recipe_path=Path(args.recipe).absolute(),
        overrides=args.overrides,
        python=sys.executable,  # the interpreter (venv) that runs this command
        **s,
    )
    job = submit_script(text, run_dir, args.dry_run)
    if args.dry_run:
        return 0
    script = run_dir / "job.sbatch"
    print(f"submitted job {job}: {recipe.name} ({kind}) into {run_dir}")
    print(f"  follow the log:  tail -f {run_dir}/slurm-{job}.out")
    print(f"  queue / cancel:  squeue -j {job}   scancel {job}")
    print(f"  resubmit later:  sbatch {script}   (resumes from the newest checkpoint)")
    return 0
