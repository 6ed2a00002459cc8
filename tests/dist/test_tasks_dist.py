"""Class-balanced sampling and multi-label metrics on real gloo ranks (torchrun)."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch
import yaml
from dist_helpers import RECIPE, audit_rows, events, make_multilabel_table, run_info
from procs import cli, max_diff, weights

pytestmark = pytest.mark.dist


def test_balanced_sampler_same_rows_and_weights_on_1_and_2_processes(
    reference_run, tiny_recipe, tiny_data
):
    """`data.sampler: balanced` draws one global sequence of rows from (seed, epoch): 2 ranks
    train on exactly the rows of 1 process at every step (same weights within 1e-5), and the
    draw really evens out the classes of this skewed table."""
    args = ("data.sampler=balanced", "train.epochs=2", "checkpoint.every_epochs=0")
    one = reference_run(tiny_recipe, *args, DIST_TRAIN_AUDIT_SAMPLES="1")
    two = reference_run(tiny_recipe, *args, nproc=2, DIST_TRAIN_AUDIT_SAMPLES="1")
    assert run_info(one)["world_size"] == 1 and run_info(two)["world_size"] == 2
    rows1, rows2 = audit_rows(one), audit_rows(two)
    assert len(rows1) == 2 * (480 // 24) and rows1 == rows2
    assert max_diff(weights(one / "model.safetensors"), weights(two / "model.safetensors")) < 1e-5
    lines = tiny_data["train"].read_text().splitlines()[1:]
    labels = [int(line.rsplit(",", 1)[1]) for line in lines]
    natural = Counter(labels)
    drawn = Counter(labels[i] for ids in rows1.values() for i in ids)
    assert max(natural.values()) / min(natural.values()) > 2  # the table is skewed ...
    assert max(drawn.values()) / min(drawn.values()) < 1.25  # ... the draws are not
    assert sum(drawn.values()) == 2 * 480 - 2 * (480 % 24)
