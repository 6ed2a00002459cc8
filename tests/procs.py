"""Real processes for tests: run the CLI, or run it until a condition holds and SIGKILL it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict:
    out = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out.update(extra)
    return out


def command(args: list[str], nproc: int = 1) -> list[str]:
    """`python -m dist_train ARGS`, or torchrun with `nproc` gloo ranks on a free port."""
    if nproc == 1:
        return [sys.executable, "-m", "dist_train", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*launcher, "--master_port", str(free_port()), "-m", "dist_train", *args]


def cli(*args: str, nproc: int = 1, timeout: float = 300, **extra_env: str):
    """`dist-train ARGS` on 1 process, or under torchrun with `nproc` gloo ranks."""
    cmd = command(list(args), nproc)
    return subprocess.run(
        cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def run_until_then_kill(
    args: list[str],
    condition: Callable[[], bool],
    nproc: int = 1,
    timeout: float = 120,
    poll: float = 0.002,
) -> bool:
    """Start training, SIGKILL the whole process group as soon as `condition()` holds.
    Returns True if it was killed, False if the run ended first."""
    cmd = command(list(args), nproc)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                kill_tree(proc.pid)
                proc.wait()
                return True
            time.sleep(poll)
        return False
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a launcher AND its ranks: torchrun/accelerate start each rank in its own
    session, so killing the launcher's process group would leave the ranks running."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
