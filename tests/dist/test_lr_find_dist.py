"""`dist-train lr-find` on 2 processes: the global batch and the rank-averaged loss give the
same curve and the same suggestion as 1 process, and only rank 0 writes."""

from __future__ import annotations

import json

import pytest
from procs import cli, cli_here

pytestmark = pytest.mark.dist

# The notes' SGD MLP without its dropout: masks are drawn per rank (as in training), which
# would make the two curves statistically, not numerically, equal.
ARGS = ("lr-find", "recipes/wine_mlp.yaml", "--set", "model.layers.2.dropout=0")


def test_two_processes_give_the_same_suggestion(tmp_path):
    one = cli_here(*ARGS, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*ARGS, "--out", str(tmp_path / "two"), "--write-override", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "lr_find.json").read_text()) for d in ("one", "two"))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["suggestion"] == a["suggestion"] and b["steepest"] == a["steepest"]
    assert 1e-3 <= a["suggestion"] <= 1e-2
    # The same lrs and losses up to the lowest point (past it the blow-up amplifies the
    # all-reduce's rounding).
    low = a["median"].index(min(a["median"]))
    assert a["lrs"][: low + 1] == b["lrs"][: low + 1]
    assert max(abs(x - y) for x, y in zip(a["losses"][: low + 1], b["losses"], strict=False)) < 1e-4
    assert two.stdout.count("suggested lr") == 1  # printed once, by rank 0
    assert (tmp_path / "two" / "override.txt").read_text().startswith("optimizer.lr=")
