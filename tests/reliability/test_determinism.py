"""Determinism: the same recipe and seed give bitwise-identical weights on a rerun (CPU fp32),
on 1 process and on 2 — with augmentation (random shifts) and dropout drawing random numbers.
"""

from __future__ import annotations

import pytest
from procs import cli_here
from rel_helpers import bitwise_equal, cli, weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# digits_cnn: conv + batchnorm + dropout + random-shift augmentation; one epoch (22 steps).
ARGS = ["train", "recipes/digits_cnn.yaml", "train.epochs=1", "train.log_every_steps=5"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_rerun_gives_bitwise_identical_weights(nproc, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        # One process: a fresh process, then a rerun inside the test process (nothing cached
        # by an earlier run in the same process may change the result either).
        r = (
            cli_here(*ARGS, "-o", str(out))
            if nproc == 1 and i
            else cli(*ARGS, "-o", str(out), nproc=nproc)
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"world size {nproc} " in r.stdout  # the launch really had nproc ranks
        runs.append(weights(out / "model.safetensors"))
    assert bitwise_equal(runs[0], runs[1])
    if nproc == 1:  # a different seed really changes them (the comparison is not vacuous)
        out = tmp_path / "other_seed"
        r = cli_here(*ARGS, "-o", str(out), "seed=1")
        assert r.returncode == 0, r.stderr[-3000:]
        assert not bitwise_equal(runs[0], weights(out / "model.safetensors"))
