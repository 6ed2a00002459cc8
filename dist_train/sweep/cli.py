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
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dist_train.errors import UserError
from dist_train.launch import slurm
from dist_train.sweep import plan as sweep

LAUNCHERS = ("none", "torchrun", "accelerate")
STOP_WAIT_S = 60  # after Ctrl-C / SIGTERM: time the trials get to save a checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="hyperparameter search: sample every trial from the recipe's sweep: section, train "
        "them (K at a time, or as a SLURM job array), rank the results",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML with a sweep: section")
    p.add_argument("overrides", nargs="*", help="key.sub=value to set, ~key.sub to delete")
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
    g = p.add_argument_group("SLURM (one job array, flags as in `dist-train submit`)")
    g.add_argument("--slurm", action="store_true", help="submit the trials as one sbatch array")
    g.add_argument("--max-concurrent", type=int, metavar="K", help="array tasks at once (%%K)")
    g.add_argument("--nodes", type=int, help="nodes per trial")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node, one process each; 0 = CPU")
    g.add_argument("--processes", type=int, help="--kind cpu: processes per trial (--nproc)")
    g.add_argument("--kind", choices=slurm.KINDS, help="template (default: from the GPUs)")
    g.add_argument("--time", help="time limit per trial, HH:MM:SS (default 01:00:00)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--grace", type=int, help="seconds before --time to checkpoint")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per trial (sbatch --cpus-per-task)")
    g.add_argument("--ifname", help="network interface for NCCL/gloo (multi-node)")
    g.add_argument("--rdzv-timeout", type=int, help="multi-node rendezvous timeout, seconds")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra sbatch option, repeatable",
    )
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
    world = (args.processes or args.nproc) if args.slurm else args.nproc
    _check_batches(trials, world)
    meta = {"name": recipe.name, "recipe": args.recipe, "overrides": args.overrides}
    print(sweep.write_plan(sweep_dir, trials, cfg, meta), flush=True)
    sweep.write_results(sweep_dir)  # results.csv exists from the start: report/collect find it
    if args.slurm:
        return _submit_array(args, recipe, trials, sweep_dir)
    _run_local(
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
        b, accum = t.recipe.train.batch_size, t.recipe.train.grad_accum
        if b % (world * accum):
            raise UserError(
                f"sweep {t.name}: train.batch_size {b} (global) is not divisible by {world} "
                f"processes x train.grad_accum {accum}; change the batch size or --nproc."
            )


def _report(sweep_dir: Path, final: bool) -> int:
    plan, rows, best = sweep.write_results(sweep_dir)
    print("\n" + sweep.leaderboard(plan, rows))
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


# ---------------------------------------------------------------------------- local trials


@dataclass
class _Running:
    trial: sweep.Trial
    proc: subprocess.Popen
    port: int | None
    start: float
    log: IO
    trial_dir: Path


def trial_command(
    launcher: str,
    nproc: int,
    port: int | None,
    recipe: Path,
    run_dir: Path,
    launcher_args: list[str],
) -> list[str]:
    """The command that trains one trial; every trial is a plain `dist_train train` run."""
    py, train = sys.executable, ["-m", "dist_train", "train", str(recipe), "-o", str(run_dir)]
    if launcher == "none":
        return [py, *train]
    if launcher == "torchrun":
        return [
            py,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *launcher_args,
            *train,
        ]
    multi = ["--multi_gpu"] if nproc > 1 else []
    return [
        py,
        "-m",
        "accelerate.commands.launch",
        *multi,
        "--num_machines",
        "1",
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(port),
        *launcher_args,
        *train,
    ]


def _free_port(taken: set[int]) -> int:
    """A port nobody listens on now and no running trial of this sweep was given."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def _log_launch(trial_dir: Path, **event: object) -> None:
    with open(trial_dir / sweep.LAUNCHES, "a") as f:
        f.write(json.dumps({**event, "time": time.time()}) + "\n")


def _run_local(
    sweep_dir: Path,
    trials: list[sweep.Trial],
    cfg,
    parallel: int,
    launcher: str,
    nproc: int,
    launcher_args: list[str],
) -> None:
    todo = [t for t in trials if sweep.trial_status(sweep_dir / t.name) != "finished"]
    if len(todo) < len(trials):
        print(f"[sweep] skipping {len(trials) - len(todo)} finished trial(s)", flush=True)
    env = dict(os.environ)
    # K trials x N processes share the cores; torch would otherwise start one thread per core
    # in every process.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (parallel * nproc))))
    running: list[_Running] = []
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while todo or running:
            while todo and len(running) < parallel:
                running.append(
                    _start(
                        sweep_dir,
                        todo.pop(0),
                        launcher,
                        nproc,
                        launcher_args,
                        env,
                        {r.port for r in running},
                    )
                )
            time.sleep(0.1)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                _finished(sweep_dir, r, cfg)
    except KeyboardInterrupt:
        print(
            f"[sweep] interrupted: stopping {len(running)} running trials (they save a "
            "checkpoint; re-run the same command to resume)",
            file=sys.stderr,
            flush=True,
        )
        _stop(running)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start(
    sweep_dir: Path,
    trial: sweep.Trial,
    launcher: str,
    nproc: int,
    launcher_args: list[str],
    env: dict,
    taken: set[int],
) -> _Running:
    trial_dir = sweep_dir / trial.name
    port = None if launcher == "none" else _free_port(taken)
    cmd = trial_command(launcher, nproc, port, trial_dir / "recipe.yaml", trial_dir, launcher_args)
    log = open(trial_dir / "train.log", "a")  # noqa: SIM115 (closed in _finished / _stop)
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    # Own session: a Ctrl-C in the terminal reaches the driver only, which then stops the
    # trials in order (SIGTERM: checkpoint, exit 75) instead of every process at once.
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    _log_launch(trial_dir, event="start", pid=proc.pid, port=port, command=cmd)
    shown = ", ".join(f"{k}={sweep._cell(v)}" for k, v in trial.values.items())
    where = f"{launcher} x{nproc}, port {port}" if port else "1 process"
    print(
        f"[sweep] {trial.name} started ({shown}) on {where}; log {trial_dir}/train.log", flush=True
    )
    return _Running(trial, proc, port, time.monotonic(), log, trial_dir)


def _finished(sweep_dir: Path, r: _Running, cfg) -> None:
    r.log.close()
    trial_dir = r.trial_dir
    rc = r.proc.returncode
    _log_launch(trial_dir, event="end", rc=rc)
    took = time.monotonic() - r.start
    status = sweep.trial_status(trial_dir)
    best = sweep.best_eval(trial_dir, cfg.metric, cfg.direction)
    score = (
        f": best {cfg.metric} {best[cfg.metric]:.4g} at epoch {best['epoch'] + 1}" if best else ""
    )
    print(f"[sweep] {r.trial.name} {status} after {took:.1f}s{score}", flush=True)
    if status != "finished":
        tail = (trial_dir / "train.log").read_text(errors="replace").splitlines()[-8:]
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr, flush=True)
    sweep.write_results(sweep_dir)


def _stop(running: list[_Running]) -> None:
    for r in running:
        _signal(r.proc, signal.SIGTERM)  # launchers pass it on; the trainer saves and exits 75
    deadline = time.monotonic() + STOP_WAIT_S
    for r in running:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(r.proc, signal.SIGKILL, group=True)
            r.proc.wait()
        _log_launch(r.trial_dir, event="end", rc=r.proc.returncode)
        r.log.close()


def _signal(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)


# ---------------------------------------------------------------------------- SLURM


def _submit_array(
    args: argparse.Namespace, recipe, trials: list[sweep.Trial], sweep_dir: Path
) -> int:
    from dist_train.launch.cli import _settings

    sweep_dir = sweep_dir.absolute()
    s = _settings(args, recipe)
    kind = s.pop("kind")
    if kind == "cpu" and s["num_processes"] is None:
        s["num_processes"] = args.nproc
    try:
        for t in trials:
            slurm.preflight(
                kind,
                nodes=s["nodes"],
                gpus_per_node=s["gpus_per_node"],
                num_processes=s["num_processes"],
                time=s["time"],
                grace_s=s["grace_s"],
                global_batch=t.recipe.train.batch_size,
                grad_accum=t.recipe.train.grad_accum,
                run_dir=sweep_dir,
            )
    except ValueError as err:
        raise UserError(str(err)) from None
    if kind != "cpu":
        s["num_processes"] = None  # one process per GPU
    todo = [t.index for t in trials if sweep.trial_status(sweep_dir / t.name) != "finished"]
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
    script = sweep_dir / "sweep.sbatch"
    script.write_text(text)
    script.chmod(0o755)
    if args.dry_run:
        print(text, end="")
        print(f"wrote {script} (not queued; submit it with `sbatch {script}`)", file=sys.stderr)
        return 0
    job = _sbatch(script)
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


def _sbatch(script: Path) -> str:
    try:
        proc = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise UserError(
            f"sbatch is not on PATH: run `dist-train sweep --slurm` on a SLURM login node (the "
            f"script was written to {script}; submit it there with `sbatch {script}`)."
        ) from None
    if proc.returncode != 0:
        raise UserError(f"sbatch rejected {script} (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
