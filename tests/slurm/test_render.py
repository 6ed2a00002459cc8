"""Job-script rendering, preflight checks and the shell glue, without a SLURM cluster.

The rank-table and signal tests RUN the rendered bash with simulated SLURM
variables and fake `scontrol`/launchers, so they check the code that will run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dist_train.launch import slurm

RECIPE = "recipes/mnist.yaml"


def render(kind: str, run_dir: Path | str = "/runs/r1", **kw: object) -> str:
    base: dict[str, object] = {"job_name": "t", "run_dir": str(run_dir), "recipe_path": RECIPE}
    if kind != "cpu":
        base["gpus_per_node"] = 4
    base.update(kw)
    return slurm.render_sbatch(kind, **base)  # type: ignore[arg-type]


def bash_syntax_ok(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    """A stand-in executable on a private PATH dir (returns the dir)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    exe.chmod(0o755)
    return bindir


@pytest.mark.parametrize("kind", slurm.KINDS)
def test_every_kind_renders_valid_bash_with_the_contract(kind: str) -> None:
    nodes = 2 if kind == "multi_node" else 1
    text = render(kind, nodes=nodes, overrides=["train.lr=0.1", "data.name=a b"], grace_s=90)
    bash_syntax_ok(text)
    assert not re.search(r"@\{[a-z_]", text)
    for line in (
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/runs/r1/slurm-%j.out",
        f"#SBATCH --nodes={nodes}",
    ):
        assert line in text.splitlines(), line
    assert '-m dist_train train "$RECIPE" -o "$RUN_DIR" train.lr=0.1 \'data.name=a b\'' in text
    assert "scontrol requeue" in text and "DIST_TRAIN_REQUEUE_FILE" in text


def test_sbatch_directives_come_before_any_command() -> None:
    """sbatch ignores #SBATCH lines after the first command: they must all be in the header."""
    text = render(
        "single_node",
        partition="gpu",
        cpus_per_task=32,
        extra_sbatch=["--account=ml", "#SBATCH --qos=hi"],
    )
    lines = text.splitlines()
    first_cmd = next(i for i, s in enumerate(lines) if s.strip() and not s.startswith("#"))
    sbatch_idx = [i for i, s in enumerate(lines) if s.startswith("#SBATCH")]
    assert max(sbatch_idx) < first_cmd
    for want in (
        "--partition=gpu",
        "--gres=gpu:4",
        "--cpus-per-task=32",
        "--account=ml",
        "--qos=hi",
    ):
        assert any(s.startswith("#SBATCH") and want in s for s in lines), want


def test_single_node_process_counts() -> None:
    one = render("single_node", gpus_per_node=1)
    assert "--num_processes 1" in one and "--multi_gpu" not in one
    four = render("single_node", gpus_per_node=4)
    assert "--multi_gpu --num_processes 4" in four


def test_cpu_uses_torchrun_with_accelerate_cpu_flag() -> None:
    text = render("cpu", num_processes=3)
    assert "export ACCELERATE_USE_CPU=1" in text
    assert "torch.distributed.run --nnodes 1 --nproc_per_node 3" in text
    assert "--gres" not in text


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "multi_node", "nodes": 0}, "--nodes"),
        ({"kind": "single_node", "gpus_per_node": -1}, "--gpus-per-node"),
        ({"kind": "single_node", "gpus_per_node": 0}, "--kind cpu"),
        ({"kind": "single_node", "nodes": 2, "gpus_per_node": 1}, "--kind multi_node"),
        ({"kind": "gpu", "gpus_per_node": 1}, "--kind"),
        (
            {"kind": "multi_node", "nodes": 2, "gpus_per_node": 4, "global_batch": 100},
            "multiple of 8",
        ),
        (
            {
                "kind": "multi_node",
                "nodes": 2,
                "gpus_per_node": 4,
                "global_batch": 64,
                "grad_accum": 3,
            },
            "grad_accum",
        ),
        ({"kind": "cpu", "grad_accum": 0}, "grad_accum"),
        ({"kind": "cpu", "time": "90"}, "HH:MM:SS"),
        ({"kind": "cpu", "time": "1:2:3:4"}, "D-HH:MM:SS"),
        ({"kind": "cpu", "time": "00:61:00"}, "--time"),
        ({"kind": "cpu", "time": "00:00:00"}, "one minute"),
        ({"kind": "cpu", "time": "00:02:00", "grace_s": 120}, "--grace"),
        ({"kind": "cpu", "run_dir": "/runs/my run"}, "--output"),
        ({"kind": "cpu", "num_processes": 0}, "--processes"),
    ],
)
def test_preflight_names_the_flag_and_the_fix(kwargs: dict[str, object], needle: str) -> None:
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
        slurm.preflight(kind, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_preflight_accepts_consistent_requests() -> None:
    slurm.preflight(
        "multi_node", nodes=2, gpus_per_node=4, global_batch=256, grad_accum=2, time="1-00:00:00"
    )
    slurm.preflight("cpu", num_processes=2, global_batch=64, time="00:01:00", grace_s=30)
    assert slurm.time_to_seconds("2-01:00:05") == 2 * 86400 + 3605


def _node_block(text: str) -> str:
    """The rendered script from its first command to the end of dt_node_main: settings,
    the common glue and the per-node function, without the final srun."""
    start = text.index("set -uo pipefail")
    end = text.index("# END dt_node_main")
    return text[start:end]


def test_multi_node_rank_table(tmp_path: Path) -> None:
    """2 nodes x 4 GPUs: machine ranks 0 and 1, one main address and port, world size 8."""
    text = render("multi_node", run_dir=tmp_path / "run", nodes=2, gpus_per_node=4, ifname="ib0")
    bindir = fake_bin(
        tmp_path,
        "scontrol",
        """\
        [[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] || { echo "bad: $*" >&2; exit 1; }
        printf 'gpu-07\\ngpu-08\\n'
        """,
    )
    script = (
        _node_block(text)
        + '\ndt_node_main\necho "IFNAME=$NCCL_SOCKET_IFNAME/$GLOO_SOCKET_IFNAME"\n'
    )
    table = []
    for node_id in (0, 1):
        env = {
            **os.environ,
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "SLURM_NODEID": str(node_id),
            "SLURM_JOB_NODELIST": "gpu-[07-08]",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_ID": "123456",
            "DIST_TRAIN_SLURM_DRY_RUN": "1",
        }
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        argv = proc.stdout.splitlines()
        assert argv[-1] == "IFNAME=ib0/ib0"

        def arg(flag: str, argv: list[str] = argv) -> str:
            return argv[argv.index(flag) + 1]

        world, machines = int(arg("--num_processes")), int(arg("--num_machines"))
        table.append(
            (
                int(arg("--machine_rank")),
                arg("--main_process_ip"),
                int(arg("--main_process_port")),
                world,
                world // machines,
            )
        )
        assert argv[argv.index("-m", 2) + 1 :][:2] == ["dist_train", "train"]
    assert table == [
        (0, "gpu-07", 20000 + 123456 % 20000, 8, 4),
        (1, "gpu-07", 20000 + 123456 % 20000, 8, 4),
    ]


def test_array_script_picks_recipe_and_run_dir_per_task(tmp_path: Path) -> None:
    recipes = [f"/sweep/trial-{i}.yaml" for i in range(3)]
    text = slurm.array_script(recipes, sweep_dir="/sweep/s1", max_concurrent=2)
    bash_syntax_ok(text)
    assert "#SBATCH --array=0-2%2" in text.splitlines()
    assert "#SBATCH --output=/sweep/s1/slurm-%A_%a.out" in text.splitlines()
    start = text.index("RUN_DIR=")
    pick = text[start : text.index("DT_PORT_BASE=")]
    out = subprocess.run(
        ["bash", "-c", pick + 'echo "$RECIPE|$RUN_DIR"'],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"},
    ).stdout
    assert out.strip() == "/sweep/trial-1.yaml|/sweep/s1/trial-001"
    with pytest.raises(ValueError, match="no trials"):
        slurm.array_script([], sweep_dir="/sweep/s1")


def _glue(text: str) -> str:
    return text[
        text.index("# ---- dist_train SLURM glue") : text.index(
            "# ---- end of dist_train SLURM glue"
        )
    ]


@pytest.mark.parametrize(
    ("env", "ref"),
    [
        ({"SLURM_JOB_ID": "77"}, "77"),
        ({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}, "70_3"),
    ],
)
def test_requeue_target_is_array_aware(env: dict[str, str], ref: str) -> None:
    script = _glue(render("cpu")) + "dt_job_ref\n"
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert out.stdout.strip() == ref


FAKE_LAUNCHER = """\
import signal, subprocess, sys
# Like torchrun: ranks in their own sessions; dies on USR1 (default action); exit 1 if a rank fails.
# Each rank keeps the inherited USR1 disposition (ignored under dt_start) for argv[3] seconds of
# "start-up" before installing its handler, like the trainer importing its modules.
rank = "import signal,sys,time\\nopen(sys.argv[1] + '.started', 'w').close()\\n" \\
       "time.sleep(float(sys.argv[2]))\\n" \\
       "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\\n" \\
       "open(sys.argv[1] + '.ready', 'w').close()\\ntime.sleep(60)\\n"
delay = sys.argv[3] if len(sys.argv) > 3 else "0"
procs = [subprocess.Popen([sys.executable, "-c", rank, f"{sys.argv[1]}/rank{i}", delay],
                          start_new_session=True) for i in range(2)]
codes = [p.wait() for p in procs]
open(sys.argv[1] + "/codes", "w").write(" ".join(map(str, codes)))
if 75 in codes:
    open(sys.argv[2], "w").close()  # the trainer's job: touch $DIST_TRAIN_REQUEUE_FILE
sys.exit(1 if any(codes) else 0)
"""


def test_usr1_reaches_the_ranks_and_the_job_is_requeued(tmp_path: Path) -> None:
    """The batch shell's USR1 must reach both ranks (not kill the launcher), and the
    flattened exit status (1) plus the requeue file must lead to `scontrol requeue`."""
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    log = tmp_path / "scontrol.log"
    bindir = fake_bin(tmp_path, "scontrol", f'echo "$*" >> {log}\n')
    script = (
        f"RUN_DIR={tmp_path}\n"
        + _glue(render("cpu"))
        + f'dt_run {sys.executable} {tmp_path}/launcher.py {tmp_path} "$DIST_TRAIN_REQUEUE_FILE"\n'
        "dt_finish $?\n"
    )
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    shell = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"rank{i}.ready").exists() for i in range(2)):
        assert time.monotonic() < deadline and shell.poll() is None, "ranks did not start"
        time.sleep(0.05)
    shell.send_signal(signal.SIGUSR1)
    _, err = shell.communicate(timeout=20)
    assert shell.returncode == 0, err
    assert (tmp_path / "codes").read_text() == "75 75"
    assert log.read_text().split("\n")[0] == "requeue 4242"
    assert "forwarding to the ranks" in err


def test_a_signal_lost_during_start_up_is_sent_again(tmp_path: Path) -> None:
    """USR1 that reaches the ranks while they still ignore it (start-up, before the trainer's
    handler) is lost; the batch shell re-sends it until the launcher exits, so the ranks still
    stop with a checkpoint and the job is requeued."""
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    log = tmp_path / "scontrol.log"
    bindir = fake_bin(tmp_path, "scontrol", f'echo "$*" >> {log}\n')
    script = (
        f"RUN_DIR={tmp_path}\n"
        + _glue(render("cpu"))
        + f"dt_run {sys.executable} {tmp_path}/launcher.py {tmp_path} "
        '"$DIST_TRAIN_REQUEUE_FILE" 1.5\n'
        "dt_finish $?\n"
    )
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4343",
        "DT_REFORWARD_S": "1",
    }
    shell = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"rank{i}.started").exists() for i in range(2)):
        assert time.monotonic() < deadline and shell.poll() is None, "ranks did not start"
        time.sleep(0.02)
    shell.send_signal(signal.SIGUSR1)  # the ranks ignore USR1 for 1.5 s more
    sent = time.monotonic()
    _, err = shell.communicate(timeout=20)
    assert shell.returncode == 0, err
    assert (tmp_path / "codes").read_text() == "75 75", err
    assert log.read_text().split("\n")[0] == "requeue 4343"
    assert "got SIGUSR1: forwarding" in err and "re-sending SIGUSR1" in err, err
    assert time.monotonic() - sent < 10, err


def test_plain_failure_is_not_requeued(tmp_path: Path) -> None:
    log = tmp_path / "scontrol.log"
    bindir = fake_bin(tmp_path, "scontrol", f'echo "$*" >> {log}\n')
    script = (
        f"RUN_DIR={tmp_path}\n" + _glue(render("cpu")) + "dt_run bash -c 'exit 3'\ndt_finish $?\n"
    )
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "5"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 3
    assert not log.exists()


def test_submit_writes_the_script_and_parses_the_job_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    assert slurm.submit("#!/bin/bash\n", run_dir, dry_run=True) == ""
    assert (run_dir / "job.sbatch").read_text() == "#!/bin/bash\n"
    bindir = fake_bin(
        tmp_path, "sbatch", 'echo "$@" > "$(dirname "$0")/args"; echo "917;cluster"\n'
    )
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert slurm.submit("#!/bin/bash\n", run_dir) == "917"
    assert (bindir / "args").read_text().split() == ["--parsable", str(run_dir / "job.sbatch")]


def test_submit_without_sbatch_says_where_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sbatch is not on PATH"):
        slurm.submit("#!/bin/bash\n", tmp_path / "run")
    assert (tmp_path / "run" / "job.sbatch").exists()


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, dist_train.launch.slurm; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "False", out.stderr
