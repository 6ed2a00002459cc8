"""`train.profile` (dist_train/training/profile.py): a chrome trace that loads as JSON, the
top-ops table printed and saved, and the same weights as a run without the profiler."""

from __future__ import annotations

import json

from procs import bitwise_equal, cli_here, weights

RECIPE = """name: iris
data: {source: "sklearn:iris", target: target, task: multiclass}
model: {layers: [{linear: 16}, relu, {dropout: 0.2}, {linear: out}]}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 1, batch_size: 8, log_every_steps: 5}
tracking: {wandb: {mode: disabled}}
"""  # 15 optimizer steps; dropout draws random numbers, so an extra RNG draw would show


def test_profiler_writes_a_trace_and_the_top_ops_and_changes_no_number(tmp_path):
    recipe = tmp_path / "iris.yaml"
    recipe.write_text(RECIPE)
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    assert cli_here("train", str(recipe), "-o", str(plain)).returncode == 0
    spec = "train.profile={wait: 2, warmup: 1, active: 3, row_limit: 8}"
    r = cli_here("train", str(recipe), "-o", str(profiled), spec)
    assert r.returncode == 0, r.stderr[-3000:]
    trace = profiled / "profile/rank-0.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"}  # the active window
    assert any(e.get("name") == "aten::addmm" for e in events)  # the linear layers ran in it
    table = (profiled / "profile/rank-0.top-ops.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert "profile (rank 0, optimizer steps 4-6): top operators by self CPU time" in r.stdout
    assert table.strip().splitlines()[3] in r.stdout  # the table itself is printed
    assert bitwise_equal(
        weights(profiled / "model.safetensors"), weights(plain / "model.safetensors")
    )


def test_a_window_the_run_never_reaches_is_reported(tmp_path):
    recipe = tmp_path / "iris.yaml"
    recipe.write_text(RECIPE)
    r = cli_here("train", str(recipe), "-o", str(tmp_path / "run"), "train.profile.wait=20")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the run ended before optimizer steps 22-24; nothing recorded" in r.stdout
    assert not (tmp_path / "run/profile").exists()
