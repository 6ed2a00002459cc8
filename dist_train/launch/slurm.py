"""SLURM job scripts for `dist-train submit` and sweeps: render, check, submit.

The templates are package data in `dist_train/launch/templates/` (the repository's
`slurm/` folder links there, where users look for them; override with
DIST_TRAIN_SLURM_TEMPLATES); their placeholders are `@{name}` so that bash's own `${...}`
stays readable. `slurm/common.sh` is pasted into every script:
it holds the preemption glue (USR1/TERM forwarding, requeue on exit 75 or on
the file named by $DIST_TRAIN_REQUEUE_FILE). No torch import: the CLI imports this module
just to print a script.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import subprocess
from collections.abc import Sequence
from pathlib import Path

from dist_train.config.base import batch_split_error
from dist_train.errors import UserError

KINDS = ("single_node", "multi_node", "cpu")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,2}):([0-5]\d):([0-5]\d)$")
_UNSAFE_PATH = re.compile(r"[\s'\"$`\\%]")
_TASK_LINE = "# @task: job arrays (sweeps) pick RECIPE and RUN_DIR here\n"


class _Template(string.Template):
    """`@{name}` placeholders only: `$`, `${x}`, `$@` and `"${a[@]}"` pass through."""

    delimiter = "@"
    pattern = r"""@(?:
        (?P<escaped>(?!)) |
        (?P<named>(?!)) |
        {(?P<braced>[a-z_][a-z0-9_]*)} |
        (?P<invalid>(?!))
    )"""


def templates_dir() -> Path:
    """Where the .sbatch templates are: env override, else the package's own copy."""
    env = os.environ.get("DIST_TRAIN_SLURM_TEMPLATES")
    return Path(env) if env else Path(__file__).resolve().parent / "templates"


def read_template(name: str) -> str:
    """A template's text; a missing file is an installation problem, said as one (exit 2)."""
    path = templates_dir() / name
    try:
        return path.read_text()
    except OSError as err:
        where = (
            "DIST_TRAIN_SLURM_TEMPLATES points there; fix or unset it"
            if os.environ.get("DIST_TRAIN_SLURM_TEMPLATES")
            else "the installed dist_train package lacks its package data; reinstall it "
            "(pip install --force-reinstall dist-train)"
        )
        raise UserError(
            f"slurm template {name} is missing: looked for {path} ({err.strerror}); {where}."
        ) from None


def _fill(name: str, values: dict[str, str]) -> str:
    """Substitute a template strictly: a placeholder without a value must not become a blank."""
    text = read_template(name)
    try:
        return _Template(text).substitute(values)
    except KeyError as e:
        raise UserError(
            f"slurm template {templates_dir() / name} has the placeholder @{{{e.args[0]}}}, "
            f"which dist-train does not fill (it fills {', '.join(sorted(values))}); "
            "remove it from the template or restore the packaged one."
        ) from None


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _join(args: Sequence[object]) -> str:
    return " ".join(_q(a) for a in args)


def preflight(
    kind: str,
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    num_processes: int | None = None,
    time: str = "01:00:00",
    grace_s: int = 120,
    global_batch: int | None = None,
    grad_accum: int = 1,
    run_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Reject requests SLURM would accept but that cannot train, before queueing.

    Why here: a bad request otherwise waits in the queue for hours and then
    fails (or silently trains a different batch size). Each message names
    the flag and the fix, as one paragraph.
    """
    _check_shape(kind, nodes, gpus_per_node, num_processes)
    seconds = time_to_seconds(time)
    if grace_s < 0 or grace_s >= seconds:
        raise ValueError(
            f"--grace {grace_s}s must be >= 0 and shorter than --time {time}; the "
            f"checkpoint is written in that window before the time limit."
        )
    if run_dir is not None and _UNSAFE_PATH.search(str(run_dir)):
        raise ValueError(
            f"--output {run_dir!s} contains whitespace, a quote, '$', '%' or a backslash; "
            f"#SBATCH --output cannot carry it. Choose a plain path."
        )
    if kind == "cpu":
        world, flags = num_processes or 1, f"--processes {num_processes or 1}"
    else:
        world = nodes * gpus_per_node
        flags = f"--nodes {nodes} x --gpus-per-node {gpus_per_node}"
    if global_batch is None:
        global_batch = world * grad_accum  # no batch to check: only grad_accum itself
    problem = batch_split_error(global_batch, world, grad_accum)
    if problem:
        raise ValueError(f"{flags}: {problem}")


def _check_shape(kind: str, nodes: int, gpus_per_node: int, num_processes: int | None) -> None:
    """Kind, nodes, GPUs and processes must describe one consistent job."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} is not one of {', '.join(KINDS)}; pick one.")
    if nodes < 1:
        raise ValueError(f"--nodes {nodes} must be at least 1; use --nodes 1 for one machine.")
    if gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {gpus_per_node} is negative; use 0 for CPU jobs.")
    if kind != "cpu" and gpus_per_node < 1:
        raise ValueError(
            f"--kind {kind} launches one process per GPU but --gpus-per-node is "
            f"{gpus_per_node}; request at least 1 GPU or use --kind cpu."
        )
    if kind in ("single_node", "cpu") and nodes != 1:
        raise ValueError(
            f"--kind {kind} runs on one node but --nodes is {nodes}; use --kind multi_node."
        )
    if kind == "cpu" and num_processes is not None and num_processes < 1:
        raise ValueError(f"--processes {num_processes} must be at least 1 for --kind cpu.")
    if kind == "cpu" and gpus_per_node > 0:
        raise ValueError(
            f"--kind cpu with --gpus-per-node {gpus_per_node} would leave the GPUs idle; use "
            f"--kind single_node (or multi_node), or --gpus-per-node 0 for a CPU job."
        )
    if kind != "cpu" and num_processes is not None and num_processes != nodes * gpus_per_node:
        raise ValueError(
            f"--processes {num_processes} does not match --nodes {nodes} x --gpus-per-node "
            f"{gpus_per_node} = {nodes * gpus_per_node}: GPU jobs run one process per GPU; drop "
            f"--processes (it is for --kind cpu) or change --gpus-per-node."
        )


def time_to_seconds(time: str) -> int:
    """Parse SLURM's HH:MM:SS or D-HH:MM:SS (the two forms we emit and accept)."""
    m = _TIME_RE.match(time)
    if not m:
        raise ValueError(
            f"--time {time!r} is not HH:MM:SS or D-HH:MM:SS; write e.g. --time 04:00:00 "
            f"or --time 2-00:00:00."
        )
    days, h, mi, s = (int(g) if g else 0 for g in m.groups())
    if days * 86400 + h * 3600 + mi * 60 + s == 0:
        raise ValueError("--time 00:00:00 is zero; SLURM needs at least one minute (00:01:00).")
    return days * 86400 + h * 3600 + mi * 60 + s


def _sbatch_extra(
    kind: str,
    gpus_per_node: int,
    cpus_per_task: int | None,
    partition: str | None,
    extra: Sequence[str],
    mem: str | None = None,
) -> str:
    """Optional #SBATCH lines: only what was asked for, so site defaults apply otherwise."""
    lines = []
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if kind != "cpu" and gpus_per_node > 0:
        lines.append(f"#SBATCH --gres=gpu:{gpus_per_node}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    for item in extra:
        item = item.strip()
        lines.append(item if item.startswith("#SBATCH") else f"#SBATCH {item}")
    return "\n".join(lines)


def _launch_flags(kind: str, nodes: int, gpus_per_node: int) -> str:
    """accelerate counts processes over all machines; --multi_gpu only when > 1."""
    if kind == "cpu":
        return ""
    total = nodes * gpus_per_node
    return ("--multi_gpu " if total > 1 else "") + f"--num_processes {total}"


def render_sbatch(
    kind: str,
    *,
    job_name: str,
    run_dir: str | os.PathLike[str],
    recipe_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    nodes: int = 1,
    gpus_per_node: int = 0,
    num_processes: int | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    time: str = "01:00:00",
    partition: str | None = None,
    grace_s: int = 120,
    port_base: int = 20000,
    extra_sbatch: Sequence[str] = (),
    launcher_args: Sequence[str] = (),
    ifname: str | None = None,
    rdzv_timeout_s: int = 900,
    python: str = "python",
    module: str = "dist_train",
    env: dict[str, str] | None = None,
    output: str | None = None,
) -> str:
    """Return the text of a job script; it runs `python -m dist_train train RECIPE -o RUN_DIR ...`.

    kind: single_node (accelerate, one process per GPU), multi_node (srun, one
    accelerate launcher per node), cpu (torchrun, `num_processes` ranks).
    `env` adds exports (e.g. DIST_TRAIN_REQUEUE_START_NOW=1 on test clusters).
    """
    # fmt: off
    preflight(kind, nodes=nodes, gpus_per_node=gpus_per_node, num_processes=num_processes,
              time=time, grace_s=grace_s, run_dir=run_dir)
    # fmt: on
    train = f'-m {_q(module)} train "$RECIPE" -o "$RUN_DIR" {_join(overrides)}'
    values = {
        "job_name": re.sub(r"[^\w.-]", "_", job_name) or "dist_train",
        "time": time,
        "output": output or f"{run_dir}/slurm-%j.out",
        "grace_s": str(grace_s),
        "sbatch_extra": _sbatch_extra(
            kind, gpus_per_node, cpus_per_task, partition, extra_sbatch, mem
        ),
        "run_dir": _q(run_dir),
        "port_base": str(port_base),
        "env_block": "\n".join(f"export {k}={_q(v)}" for k, v in (env or {}).items()),
        "common": read_template("common.sh").rstrip("\n"),
        "recipe": _q(recipe_path),
        "train_cmd": train.rstrip(),
        "python": _join(shlex.split(python)),
        "launch_flags": _launch_flags(kind, nodes, gpus_per_node),
        "launcher_args": _join(launcher_args),
        "gpus_per_node": str(gpus_per_node),
        "nodes": str(nodes),
        "num_processes": str(num_processes or 1),
        "ifname": _q(ifname or ""),
        "rdzv_timeout_s": str(rdzv_timeout_s),
    }
    return _fill(f"{kind}.sbatch", values)


def array_script(
    trial_recipes: Sequence[str | os.PathLike[str]],
    *,
    sweep_dir: str | os.PathLike[str],
    max_concurrent: int | None = None,
    kind: str = "cpu",
    job_name: str = "sweep",
    task_ids: Sequence[int] | None = None,
    **render_kwargs: object,
) -> str:
    """A job array over trial recipes: task i trains trial_recipes[i] into sweep_dir/trial-NNN.

    Why an array: one queue entry for the whole sweep, with `%K` capping how
    many trials run at once. Each task picks its recipe and run dir from
    SLURM_ARRAY_TASK_ID; requeue is per task (ARRAYJOB_TASK). `task_ids` limits the array to
    some trials (e.g. the unfinished ones of a resumed sweep).
    """
    if not trial_recipes:
        raise ValueError("the sweep has no trials; array_script needs at least one recipe file.")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"--max-concurrent {max_concurrent} must be at least 1.")
    ids = sorted(task_ids) if task_ids is not None else list(range(len(trial_recipes)))
    if not ids or ids[0] < 0 or ids[-1] >= len(trial_recipes):
        raise ValueError(f"task ids {ids} do not index the {len(trial_recipes)} trial recipes.")
    limit = f"%{max_concurrent}" if max_concurrent else ""
    extra = [*render_kwargs.pop("extra_sbatch", ()), f"--array={_ranges(ids)}{limit}"]  # type: ignore[misc]
    text = render_sbatch(
        kind,
        job_name=job_name,
        run_dir=sweep_dir,
        recipe_path=trial_recipes[0],
        extra_sbatch=extra,
        output=f"{sweep_dir}/slurm-%A_%a.out",
        **render_kwargs,  # type: ignore[arg-type]
    )
    table = "\n".join(f"    {_q(r)}" for r in trial_recipes)
    pick = (
        f"# Job array: task i trains recipe i into RUN_DIR/trial-NNN.\nDT_RECIPES=(\n{table}\n)\n"
        'RECIPE="${DT_RECIPES[$SLURM_ARRAY_TASK_ID]}"\n'
        'RUN_DIR="$RUN_DIR/$(printf \'trial-%03d\' "$SLURM_ARRAY_TASK_ID")"\n'
    )
    head, sep, tail = text.partition(_TASK_LINE)
    if not sep:
        raise UserError(
            f"slurm template {templates_dir() / kind}.sbatch lacks the line "
            f"{_TASK_LINE.strip()!r} that job arrays need; restore the packaged template."
        )
    return head + sep + pick + tail


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (sbatch --array syntax)."""
    out, start = [], ids[0]
    for prev, cur in zip(ids, [*ids[1:], None], strict=False):
        if cur is None or cur != prev + 1:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ",".join(out)


def submit(
    script_text: str,
    run_dir: str | os.PathLike[str],
    dry_run: bool = False,
    name: str = "job.sbatch",
) -> str:
    """Write run_dir/<name> and queue it with `sbatch --parsable`; return the job id.

    The one sbatch submitter (`submit` writes job.sbatch, `sweep --slurm` sweep.sbatch). The
    script is kept in the run dir so a requeued or resubmitted run is reproducible and `cat`
    shows what ran. dry_run writes the file and returns "" without calling sbatch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # #SBATCH --output needs it to exist
    path = run_dir / name
    path.write_text(script_text)
    path.chmod(0o755)
    if dry_run:
        return ""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FileNotFoundError(
            "sbatch is not on PATH: submit from a SLURM login node (the script was written to "
            f"{path}; submit it there with `sbatch {path}`, or pass --dry-run to only write it)."
        )
    proc = subprocess.run(
        [sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"sbatch rejected {path} (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout.strip().split(";")[0]
