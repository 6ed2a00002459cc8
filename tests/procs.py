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


LAUNCHER_ENV = "DIST_TRAIN_TEST_LAUNCHER"  # `exec`: every cli() a fresh interpreter/torchrun


def cli(*args: str, nproc: int = 1, timeout: float = 300, launcher: str = "", **extra_env: str):
    """`dist-train ARGS` in a child process, or on `nproc` gloo ranks: forked from this (already
    imported) process by default (`launcher="fork"`, see `cli_ranks`), or as a fresh
    `python -m dist_train` / under a real torchrun (`launcher="exec"`, or
    DIST_TRAIN_TEST_LAUNCHER=exec for the whole suite)."""
    launcher = launcher or os.environ.get(LAUNCHER_ENV, "fork")
    if launcher == "fork":
        return cli_ranks(list(args), nproc, timeout, **extra_env)
    cmd = command(list(args), nproc)
    return subprocess.run(
        cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def torchrun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank `rank` of one node (what accelerate, torch.distributed
    and dist_train read: rank, sizes, rendezvous address)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "ROLE_WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


def preload() -> None:
    """What every rank imports (~7 s of CPU per process here: torch, accelerate, datasets,
    torchmetrics with scipy/matplotlib/transformers): imported once in the test worker, so
    each forked rank starts with it done."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torchmetrics  # noqa: F401

    import dist_train.cli
    import dist_train.training.trainer  # noqa: F401


def cli_ranks(args: list[str], nproc: int, timeout: float = 300, **extra_env: str) -> Result:
    """`dist-train ARGS` on `nproc` real processes forked from this one (`Ranks`), run to the
    end. Returns rank 0's then rank 1's... output, and the first non-zero exit code (0 when
    every rank succeeded)."""
    import shutil

    ranks = Ranks(args, nproc, **extra_env)
    try:
        codes = ranks.wait(timeout)
        failed = [c for c in codes if c != 0]
        return Result(failed[0] if failed else 0, ranks.stdout(), ranks.stderr())
    finally:
        shutil.rmtree(ranks.logs, ignore_errors=True)


class Ranks:
    """`dist-train ARGS` on `nproc` real processes forked from this one; with nproc > 1 each
    gets torchrun's environment (`torchrun_env`) and they join by gloo like torchrun's ranks.
    What a fresh interpreter (and torchrun) would add is each process's imports and the
    launcher's start-up: ~17 s of CPU per 2-rank launch on this machine, several times the work
    of a small test run. Launchers themselves are tested where they matter (torchrun from a
    user script, accelerate launch configs, SLURM, sweeps, multi-node, one torchrun launch of
    every shipped recipe); DIST_TRAIN_TEST_LAUNCHER=exec sends every test through them. What
    a library reads from the environment only when it is imported (HF_HUB_OFFLINE) needs
    `cli(..., launcher="exec")`: the forked ranks share the test worker's imports."""

    def __init__(self, args: list[str], nproc: int = 1, **extra_env: str) -> None:
        import tempfile

        if nproc > 1:
            forbid_in_fast_loop(f"a {nproc}-process launch")
        preload()
        self.args, self.nproc = list(args), nproc
        self.logs = Path(tempfile.mkdtemp(prefix="ranks-"))
        port = free_port()
        self.pids = [self._fork(rank, port, extra_env) for rank in range(nproc)]
        self.codes: dict[int, int] = {}

    def _fork(self, rank: int, port: int, extra_env: dict) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 70  # the child: never return into pytest, whatever happens
        try:
            code = _rank_main(self.args, rank, self.nproc, port, self.logs, extra_env)
        except BaseException:  # in the set-up itself: said in this rank's stderr file
            import traceback

            with open(self.logs / f"{rank}.err", "a") as err:
                traceback.print_exc(file=err)
        finally:
            os._exit(code)

    def poll(self) -> bool:
        """Whether every rank has ended (their exit codes are collected as they end)."""
        for pid in self.pids:
            if pid not in self.codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[pid] = _code(status)
        return len(self.codes) == len(self.pids)

    def signal(self, sig: int) -> None:
        """Send `sig` to every rank still running (SIGTERM: preemption; SIGKILL: a crash)."""
        for pid in self.pids:
            if pid not in self.codes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def kill_tree(self, sig: int) -> None:
        """`sig` to every rank and whatever it started (a sweep driver's trial launches)."""
        for pid in self.pids:
            if pid not in self.codes:
                kill_tree(pid, sig)

    def wait(self, timeout: float = 300) -> list[int]:
        """Exit codes (negative: the signal that ended it) of every rank; at the timeout every
        rank still running is killed and TimeoutExpired raised, as subprocess.run would."""
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                while not self.poll():
                    time.sleep(0.01)
                raise subprocess.TimeoutExpired(["dist-train", *self.args], timeout)
            time.sleep(0.01)
        return [self.codes[pid] for pid in self.pids]

    def stdout(self) -> str:
        return "".join(self._read(r, "out") for r in range(self.nproc))

    def stderr(self) -> str:
        return "".join(self._read(r, "err") for r in range(self.nproc))

    def _read(self, rank: int, name: str) -> str:
        return (self.logs / f"{rank}.{name}").read_text(errors="replace")


def _code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _rank_main(args, rank: int, nproc: int, port: int, logs: Path, extra_env: dict) -> int:
    """One rank, set up as a fresh `python -m dist_train` under torchrun would be: its own
    stdout/stderr files (file descriptors too: gloo and C++ warnings land there), the
    environment, no pytest capture of logging or warnings, default signal handlers, one thread
    per rank, and accelerate's per-process singletons cleared."""
    import logging
    import warnings

    import torch
    from accelerate.state import AcceleratorState

    for fd, name in ((1, "out"), (2, "err")):
        os.dup2(os.open(logs / f"{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    old = {id(s): fd for fd, s in ((1, sys.stdout), (1, sys.__stdout__), (2, sys.stderr),
                                   (2, sys.__stderr__))}  # fmt: skip
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):  # libraries' handlers made at import
            dynamic = isinstance(getattr(type(handler), "stream", None), property)  # stderr now
            if (
                isinstance(handler, logging.StreamHandler)
                and not dynamic
                and id(handler.stream) in old
            ):
                # not setStream: it would flush the test worker's stream from this process
                handler.stream = sys.stdout if old[id(handler.stream)] == 1 else sys.stderr
    ranks = torchrun_env(rank, nproc, port) if nproc > 1 else {}
    environ = env(**ranks, **extra_env)  # the worker's environment (PATH, HOME...) + these
    os.environ.clear()  # then exactly that: nothing a test set in-process leaks in
    os.environ.update(environ)
    os.chdir(ROOT)
    logging.root.handlers.clear()  # pytest's capture handlers: records go to stderr again
    warnings.resetwarnings()  # pytest records warnings; a fresh interpreter prints them
    warnings.simplefilter("default")
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in a fresh rank
    AcceleratorState._reset_state(reset_partial_state=True)  # in-process runs' world-size-1 state
    from dist_train.cli import main as cli_main

    try:
        return int(cli_main(list(args)) or 0)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


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
    """Start training, SIGKILL every process it started as soon as `condition()` holds.
    Returns True if it was killed, False if the run ended first."""
    if os.environ.get(LAUNCHER_ENV, "fork") == "fork":
        ranks = Ranks(args, nproc)
        deadline = time.monotonic() + timeout
        try:
            while not ranks.poll() and time.monotonic() < deadline:
                if condition():
                    ranks.kill_tree(signal.SIGKILL)
                    ranks.wait()
                    return True
                time.sleep(poll)
            return False
        finally:
            if not ranks.poll():
                ranks.kill_tree(signal.SIGKILL)
                ranks.wait()
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
