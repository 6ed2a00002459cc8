"""Real processes for tests: run the CLI (in this process, or as a child process or under
torchrun), or run it until a condition holds and SIGKILL it."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_ENV = "DIST_TRAIN_TEST_FAST"  # set by `make test-fast`: no multi-process launch allowed


def forbid_in_fast_loop(what: str) -> None:
    """The fast loop promises no torchrun/multi-rank launch and no SLURM: a test that starts
    one there fails (instead of silently slowing the loop) and says which marker it lacks."""
    if os.environ.get(FAST_ENV) == "1":
        raise AssertionError(
            f"{what} inside `make test-fast`: mark the test `dist` (multi-process) or "
            "`slurm`, so that only `make test` runs it."
        )


def env(**extra: str) -> dict:
    out = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    out.update(extra)
    return out


def command(args: list[str], nproc: int = 1) -> list[str]:
    """`python -m dist_train ARGS`, or torchrun with `nproc` gloo ranks on a free port."""
    if nproc == 1:
        return [sys.executable, "-m", "dist_train", *args]
    return [*torchrun(nproc), "-m", "dist_train", *args]


def torchrun(nproc: int) -> list[str]:
    """The torchrun launcher for `nproc` gloo ranks on a free port (append a script or -m)."""
    forbid_in_fast_loop(f"a {nproc}-process torchrun launch")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*launcher, "--master_port", str(free_port())]


def cli(*args: str, nproc: int = 1, timeout: float = 300, **extra_env: str):
    """`dist-train ARGS` on 1 process, or under torchrun with `nproc` gloo ranks."""
    cmd = command(list(args), nproc)
    return subprocess.run(
        cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli_here(*args: str, stream: io.TextIOBase | None = None, **extra_env: str) -> Result:
    """`dist-train ARGS` in this process (a child process costs seconds of imports): the
    environment of `env()` (wandb disabled, one thread), cwd at the repository root, output
    captured (or written to `stream` as it comes), and the signal handlers and thread count
    that `train` sets put back."""
    import torch

    from dist_train.cli import main as cli_main

    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in sigs}
    threads, cwd, environ = torch.get_num_threads(), os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env(**extra_env))
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in a child: the same floating-point sums
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stream or out), contextlib.redirect_stderr(stream or err):
            try:
                code = cli_main(list(args))
            except SystemExit as exit_:  # argparse's own usage errors
                code = exit_.code if isinstance(exit_.code, int) else 2
            except Exception:  # as the interpreter would: a traceback on stderr, exit 1
                import traceback

                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return Result(int(code or 0), out.getvalue(), err.getvalue())


def cli_forked(
    log: Path, *args: str, until: Callable[[], bool] | None = None, **extra_env: str
) -> int:
    """`dist-train ARGS` in a fork of this process (no seconds of imports, unlike a child
    process), meant to die: at a `DIST_TRAIN_FAULT` point, or SIGKILLed by us as soon as
    `until()` holds. The child's output goes to `log`. Returns the signal that ended it
    (negative, as subprocess does) or its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest, whatever happens
        code = 70
        try:
            with open(log, "w", buffering=1) as fh:  # line by line: a kill loses nothing said
                code = cli_here(*args, stream=fh, **extra_env).returncode
        finally:
            os._exit(code)
    deadline = time.monotonic() + 300
    while until is not None and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if until():
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
    else:
        if until is not None:  # still running at the deadline: a hang, not a kill
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"dist-train {' '.join(args)}: still running after 300 s")
        _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


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
