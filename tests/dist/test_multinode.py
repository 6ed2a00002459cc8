"""Multi-node, run for real on one machine: two network namespaces ("nodes") joined by a veth
pair, one launcher per node started by the rendered slurm/multi_node.sbatch step itself
(`dt_node_main`: node rank from SLURM_NODEID, main address from the first host of
`scontrol show hostnames`), gloo bound to the veth (the template's --ifname). Only the
addresses of the namespaces this test creates are used; they are deleted at the end.

The GPU template's launcher line is used as it is (`accelerate launch --multi_gpu
--num_processes 4`): with no CUDA, each rank's Accelerator(cpu=True) is a gloo rank."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import events, run_info
from procs import ROOT, env, forbid_in_fast_loop, kill_tree, max_diff, weights

from dist_train.launch import slurm

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ADDRS = ("10.77.0.1", "10.77.0.2")
IFNAME = "dt0"  # the same name inside both namespaces: the template renders one --ifname


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Namespaces A and B, each with its end of one veth pair (named dt0) and loopback up."""
    forbid_in_fast_loop("a two-node launch")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: cannot create network namespaces")
    tag = f"{os.getpid() % 100000}"
    names = [f"dtn{tag}a", f"dtn{tag}b"]
    try:
        _ip("netns", "add", names[0])
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot create network namespaces here (needs root): {err.stderr.strip()}")
    try:
        _ip("netns", "add", names[1])
        _ip("link", "add", f"dtv{tag}a", "type", "veth", "peer", "name", f"dtv{tag}b")
        for ns, end, addr in zip(names, (f"dtv{tag}a", f"dtv{tag}b"), ADDRS, strict=True):
            _ip("link", "set", end, "netns", ns)
            _ip("-n", ns, "link", "set", end, "name", IFNAME)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _node_script(tmp_path: Path, recipe: Path, run: Path, overrides: list[str]) -> Path:
    """The rendered job script up to the end of `dt_node_main`, then one call of it: what
    `srun ... bash -c dt_node_main` runs on each node. A fake `scontrol` lists the nodes."""
    text = slurm.render_sbatch(
        "multi_node",
        job_name="two-nodes",
        run_dir=run,
        recipe_path=recipe,
        overrides=overrides,
        nodes=2,
        gpus_per_node=2,
        ifname=IFNAME,
        python=sys.executable,
        rdzv_timeout_s=300,
    )
    end = "# END dt_node_main"
    script = tmp_path / "node.sh"
    script.write_text(text.split(end)[0] + f"{end}\ndt_node_main\n")
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(
        '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "%s\\n" ' + " ".join(ADDRS) + "\n"
    )
    fake.chmod(0o755)
    return script


def _start(tmp_path: Path, namespaces: list[str], script: Path, job_id: int):
    procs = []
    for node, ns in enumerate(namespaces):
        node_env = env(
            PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            PYTHONPATH=str(ROOT),
            SLURM_NODEID=str(node),
            SLURM_JOB_NUM_NODES="2",
            SLURM_JOB_ID=str(job_id),
            SLURM_JOB_NODELIST="node[1-2]",
        )
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 (closed by the test)
        cmd = ["ip", "netns", "exec", ns, "bash", str(script)]
        procs.append(
            (subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    return procs


def _trained(run: Path) -> bool:
    try:
        return (run / "metrics.jsonl").exists() and bool(events(run, "train"))
    except ValueError:  # a line being written
        return False


def _log(tmp_path: Path, node: int) -> str:
    return (tmp_path / f"node{node}.log").read_text()


def test_two_nodes_over_veth_train_with_world_size_4_like_one_process(
    two_nodes, tiny_recipe, reference_run, tmp_path
):
    ref = reference_run(tiny_recipe, "train.epochs=1")
    run = tmp_path / "run"
    script = _node_script(tmp_path, tiny_recipe, run, ["train.epochs=1"])
    procs = _start(tmp_path, two_nodes, script, job_id=4242)
    for proc, log in procs:
        assert proc.wait(timeout=900) == 0, _log(tmp_path, 0)[-3000:] + _log(tmp_path, 1)[-3000:]
        log.close()
    assert "node rank 1 of 2, main 10.77.0.1:" in _log(tmp_path, 1)  # the template's derivation
    assert run_info(run)["world_size"] == 4
    assert max_diff(weights(run / "model.safetensors"), weights(ref / "model.safetensors")) < 1e-5


def test_killing_one_node_is_reported_by_the_other_within_the_collective_timeout(
    two_nodes, tiny_recipe, tmp_path
):
    run = tmp_path / "run"
    timeout_s = 30
    script = _node_script(
        tmp_path, tiny_recipe, run, ["train.epochs=50", f"train.collective_timeout_s={timeout_s}"]
    )
    procs = _start(tmp_path, two_nodes, script, job_id=4343)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and procs[0][0].poll() is None:
        if _trained(run):
            break
        time.sleep(0.5)
    assert _trained(run), _log(tmp_path, 0)[-3000:]  # training over the veth link
    kill_tree(procs[1][0].pid)  # node B: launcher and ranks, SIGKILL
    killed = time.monotonic()
    code = procs[0][0].wait(timeout=timeout_s + 120)
    waited = time.monotonic() - killed
    for _, log in procs:
        log.close()
    text = _log(tmp_path, 0)
    assert code != 0
    assert "lost the other ranks" in text, text[-3000:]
    assert waited < timeout_s + 60, waited  # within the timeout (plus the launcher's exit)
