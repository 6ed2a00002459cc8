"""Local sweep trials: K at a time, each a plain `python -m dist_train train` process (under
torchrun / accelerate launch for N processes, on its own free rendezvous port), its output in
trial-NNN/train.log and its launches in trial-NNN/launches.jsonl. No torch import."""

from __future__ import annotations

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

from dist_train.report.page import shown_epoch
from dist_train.sweep import plan as sweep
from dist_train.sweep import results

STOP_WAIT_S = 60  # after Ctrl-C / SIGTERM: time the trials get to save a checkpoint


@dataclass
class _Running:
    trial: sweep.Trial
    proc: subprocess.Popen
    port: int | None
    start: float
    log: IO
    trial_dir: Path
    slot: int = 0  # which GPU slice (gpu_slices) the trial runs on


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


def gpu_slices(parallel: int, nproc: int, visible: list[str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES per trial slot on a GPU box: parallel trials get their own GPUs
    (nproc each, one per process) instead of all starting on GPU 0; with fewer GPUs than
    parallel x nproc they wrap around and share. None without GPUs or for one trial at a time
    (it sees every GPU, as a plain launch would)."""
    if not visible or parallel < 2:
        return None
    return [
        ",".join(visible[(slot * nproc + i) % len(visible)] for i in range(nproc))
        for slot in range(parallel)
    ]


def _visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


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


def run_local(
    sweep_dir: Path,
    trials: list[sweep.Trial],
    cfg,
    parallel: int,
    launcher: str,
    nproc: int,
    launcher_args: list[str],
) -> None:
    todo = [t for t in trials if results.trial_status(sweep_dir / t.name) != "finished"]
    if len(todo) < len(trials):
        print(f"[sweep] skipping {len(trials) - len(todo)} finished trial(s)", flush=True)
    env = dict(os.environ)
    # K trials x N processes share the cores; torch would otherwise start one thread per core
    # in every process.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (parallel * nproc))))
    running: list[_Running] = []
    slices = gpu_slices(parallel, nproc, _visible_gpus())
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while todo or running:
            while todo and len(running) < parallel:
                slot = min(set(range(parallel)) - {r.slot for r in running})
                trial_env = env if slices is None else env | {"CUDA_VISIBLE_DEVICES": slices[slot]}
                started = _start(
                    sweep_dir,
                    todo.pop(0),
                    launcher,
                    nproc,
                    launcher_args,
                    trial_env,
                    {r.port for r in running},
                )
                started.slot = slot
                running.append(started)
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
    shown = ", ".join(f"{k}={results.cell(v)}" for k, v in trial.values.items())
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
    status = results.trial_status(trial_dir)
    best = results.best_eval(trial_dir, cfg.metric, cfg.direction)
    score = (
        f": best {cfg.metric} {best[cfg.metric]:.4g} at epoch {shown_epoch(best['epoch'])}"
        if best
        else ""
    )
    print(f"[sweep] {r.trial.name} {status} after {took:.1f}s{score}", flush=True)
    if status != "finished":
        tail = (trial_dir / "train.log").read_text(errors="replace").splitlines()[-8:]
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr, flush=True)
    results.write_results(sweep_dir)


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
