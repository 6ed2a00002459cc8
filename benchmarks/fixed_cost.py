"""The fixed-cost cases of benchmarks/run.py (`startup_*`): fresh processes as a user starts
them, `dist-train train RECIPE` against `python plain.py`; whole-process and first-step wall
and CPU time, and the peak RSS of the whole run."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the tree whose dist_train is measured (unless --baseline-src names another)

HOOK = """import atexit, json, os, sys, time, torch.optim.optimizer as o
sys.path.insert(0, {here!r})
from plain import peak_rss_mib
mark, quit_early = {mark!r}, {quit!r}
def first_step(*a):
    rec = {{"t": time.time(), "cpu": time.process_time(), "rss": peak_rss_mib(),
           "src": sys.modules["dist_train"].__file__}}
    open(mark, "x").write(json.dumps(rec))
    hd.remove()
    if quit_early:
        os._exit(0)
hd = o.register_optimizer_step_post_hook(first_step)
def at_exit():
    rec = json.loads(open(mark).read())
    open(mark, "w").write(json.dumps(rec | {{"rss": peak_rss_mib()}}))
atexit.register(at_exit)
from dist_train import cli  # as `dist-train` runs it (a --baseline-src tree may predate entry)
sys.exit(getattr(cli, "entry", cli.main)())
"""


def source_env(work: Path, src: str | None) -> dict:
    """The environment that makes a fresh `python -c` import dist_train from `src`, or from this
    checkout: explicitly, because `-c` puts the current directory first on sys.path, ahead of
    PYTHONPATH, so a run started in a checkout would import that checkout whatever `src` says.
    The commands run with the work folder as their current directory for the same reason."""
    return os.environ | {
        "PYTHONPATH": src or str(ROOT),
        "HF_DATASETS_CACHE": str(work / "hf-cache"),
        "WANDB_MODE": "disabled",
    }


def compile_sources(work: Path, src: str | None) -> None:
    """Byte-compile the dist_train that a `startup` run imports, as `pip install` does for a
    user: otherwise every run compiles the package's ~80 modules from source (~0.3 s) where
    the interpreter may not write bytecode (PYTHONDONTWRITEBYTECODE) or the tree is new.
    plain.py runs as `__main__`, which Python never caches, in both measurements alike."""
    work = work.resolve()
    code = (
        "import compileall, os, dist_train; "
        "compileall.compile_dir(os.path.dirname(dist_train.__file__), quiet=1)"
    )
    env = source_env(work, src)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=work)


def startup(
    impl: str, name: str, case: dict, work: Path, tag: str, quick: bool, src: str | None = None
) -> dict:
    """Fresh process as a user starts it (`dist-train train RECIPE` vs `python plain.py`):
    process start -> first optimizer step (a global optimizer-step hook / the script's own
    callback write the wall-clock time) and the peak RSS of the whole run (VmHWM at exit).
    --quick stops right after the first step. `src`: dist_train from that directory."""
    work = work.resolve()  # the commands run in it (see source_env)
    mark = work / f"first-{tag}.json"
    mark.unlink(missing_ok=True)
    if impl == "plain":
        cmd = [
            sys.executable,
            str(HERE / "plain.py"),
            str(work),
            name,
            "--first-step-file",
            str(mark),
            *(["--exit-after-first-step"] if quick else []),
        ]
    else:
        hook = HOOK.format(here=str(HERE), mark=str(mark), quit=quick)
        cmd = [
            sys.executable,
            "-c",
            hook,
            "train",
            str(Path(case["recipe"]).resolve()),
            *case.get("overrides", []),
            "-o",
            str(work / "runs" / f"startup-{tag}"),
            "--restart",
        ]
    env = source_env(work, src)
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=work)
    total = time.time() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.decode()[-2000:]}")
    rec = json.loads(mark.read_text())
    want = Path(src or ROOT).resolve() / "dist_train"
    if "src" in rec and Path(rec["src"]).resolve().parent != want:  # plain.py writes no src
        raise RuntimeError(f"{tag} measured dist_train from {rec['src']}, not {want}")
    # CPU seconds (user + system, all threads) beside the wall clock: on a machine shared with
    # other jobs they vary far less, because waiting for a core is not counted.
    cpu = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    return {
        "first_step_s": rec["t"] - t0,
        "first_step_cpu_s": rec["cpu"],
        "peak_rss_mib": rec["rss"],
        "total_s": total,
        "total_cpu_s": cpu,
    }


def startup_line(pair: dict) -> str:
    before = pair.get("before")
    tail = (
        f"; baseline tree: first step {before['first_step_s']:.2f}s, whole "
        f"{before['total_s']:.2f}s (CPU {before['first_step_cpu_s']:.2f} / "
        f"{before['total_cpu_s']:.2f}), RSS {before['peak_rss_mib']:.0f} MiB"
        if before
        else ""
    )
    return (
        f"first step plain {pair['plain']['first_step_s']:.2f}s dist "
        f"{pair['dist']['first_step_s']:.2f}s; whole process plain "
        f"{pair['plain']['total_s']:.2f}s dist {pair['dist']['total_s']:.2f}s (CPU s: first "
        f"step {pair['plain']['first_step_cpu_s']:.2f} / {pair['dist']['first_step_cpu_s']:.2f}"
        f", whole {pair['plain']['total_cpu_s']:.2f} / {pair['dist']['total_cpu_s']:.2f}); "
        f"RSS plain "
        f"{pair['plain']['peak_rss_mib']:.0f} dist {pair['dist']['peak_rss_mib']:.0f} MiB" + tail
    )


def startup_rows(name: str, pairs: list[dict], targets: dict) -> list[dict]:
    """Fixed cost per run: first step and whole process as dist/plain ratios, peak RSS as
    dist - plain; each the median of the paired rounds, with the range of those rounds."""
    med, rows = statistics.median, []
    for key, label, target in (
        ("first_step_s", "time to first step (s)", "startup"),
        ("total_s", "whole process (s)", "total"),
        ("first_step_cpu_s", "CPU s to first step", "startup"),
        ("total_cpu_s", "whole process CPU s", "total"),
        ("peak_rss_mib", "peak RSS (MiB)", "rss_mib"),
    ):
        a = [p["plain"][key] for p in pairs]
        b = [p["dist"][key] for p in pairs]
        if key == "peak_rss_mib":
            paired = [d - p for p, d in zip(a, b, strict=True)]
            value, want = med(paired), targets[target]
            r = row(
                f"{name}: {label}",
                med(a),
                med(b),
                value,
                f"<= +{want:.0f} MiB",
                value <= want,
                f"{value - want:.0f} MiB over the target",
                "+MiB",
            )
        else:
            paired = [d / p for p, d in zip(a, b, strict=True)]
            value, want = med(paired), targets[target]
            r = row(
                f"{name}: {label}",
                med(a),
                med(b),
                value,
                f"<= {want}x",
                value <= want,
                f"{value / want - 1:+.0%} over the target",
            )
        r["paired"] = [round(v, 3) for v in paired]
        r["range"] = [min(paired), max(paired)]
        r["plain_range"], r["dist_range"] = [min(a), max(a)], [min(b), max(b)]
        if "before" in pairs[0]:  # the baseline tree, paired with the same plain runs
            c = [p["before"][key] for p in pairs]
            if key == "peak_rss_mib":
                before = [d - p for p, d in zip(a, c, strict=True)]
            else:
                before = [d / p for p, d in zip(a, c, strict=True)]
            r["before"], r["before_range"] = med(before), [min(before), max(before)]
            r["before_median"] = med(c)
        rows.append(r)
    return rows


def row(label, plain, dist, ratio, target, ok, miss, ratio_label="ratio") -> dict:
    return {
        "case": label,
        "plain": plain,
        "dist_train": dist,
        ratio_label: ratio,
        "target": target,
        "met": ok,
        "miss": None if ok else miss,
    }
