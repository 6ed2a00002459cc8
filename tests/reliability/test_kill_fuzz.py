# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Kill fuzz: SIGKILL one training process at seeded-random moments (resume loading, mid-step,
and at every stage of a checkpoint write via DIST_TRAIN_FAULT), resume after each, and the final
weights are bitwise those of an uninterrupted run. After every kill each checkpoint marked
COMPLETE must load, and the next resume must name the newest complete one, never a half-written
one.

Each attempt is a fork of the test process (no import cost): CI runs 20 kills;
DIST_TRAIN_FUZZ_ROUNDS=100 (and DIST_TRAIN_FUZZ_SEED) for a longer local hunt.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from procs import cli_forked, cli_here
from rel_helpers import (  # noqa: F401 (fixtures)
    assert_checkpoint_loads,
    bitwise_equal,
    events,
    logged_steps,
    rel_data,
    rel_recipe,
    weights,
)

from dist_train.run.checkpoint import FAULT_POINTS

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("DIST_TRAIN_FUZZ_ROUNDS", "20"))
SEED = int(os.environ.get("DIST_TRAIN_FUZZ_SEED", "20240611"))
TOTAL = 60  # optimizer steps of the recipe (20 per epoch x 3)
EVERY = 3
# dropout + noise augmentation: the restored RNG streams matter; a checkpoint every 3 steps.
OVERRIDES = [
    f"checkpoint.every_steps={EVERY}",
    "checkpoint.keep=2",
    "model.layers.3=dropout",
    "data.augment.noise=0.05",
]


def _complete(ckpts: Path) -> list[Path]:
    return sorted(p for p in ckpts.glob("step-*") if (p / "COMPLETE").is_file())


def _fresh(paths, since: float) -> list[Path]:
    """Those created by this attempt (a killed attempt's leftovers are older)."""
    out = []
    for p in paths:
        try:
            if p.stat().st_mtime >= since:
                out.append(p)
        except FileNotFoundError:  # renamed or pruned while we looked
            pass
    return out


def partial_saves(ckpts: Path, since: float) -> list[Path]:
    """Saves this attempt began but did not seal: a temp dir, or a step dir with no marker."""
    unsealed = [p for p in ckpts.glob("step-*") if not (p / "COMPLETE").exists()]
    return _fresh([*ckpts.glob(".tmp-step-*"), *unsealed], since)


def _plan(rng: random.Random, run: Path, out: Path, base: int, since: float):
    """(kind, DIST_TRAIN_FAULT or None, kill condition or None) of one attempt. A fault kills at
    a random stage of one of the next saves; the other kinds kill from outside, at the latest
    a few steps past the next save (progress) and before the end (the run never finishes)."""
    saves = [s for s in range(base + 1, min(base + 10, TOTAL)) if s % EVERY == 0]
    kind = rng.choice(["fault", "fault", "step", "time"] if saves else ["step", "time"])
    if kind == "fault":
        return kind, f"{rng.choice(FAULT_POINTS)}@{rng.choice(saves)}", None
    bound = min(base + rng.randint(4, 6), TOTAL - 1)
    delay = rng.uniform(0.05, 2.0)

    def past_bound() -> bool:  # the plan line is printed after metrics.jsonl was rewound
        return "dist-train:" in _text(out) and logged_steps(run) >= bound

    if kind == "step":
        return kind, None, past_bound
    return kind, None, lambda: time.time() - since >= delay or past_bound()


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _incomplete(ckpts: Path) -> set[Path]:
    return {p for p in ckpts.glob("step-*") if not (p / "COMPLETE").is_file()}


def _check_resume_line(text: str, expected: Path | None, incomplete: set[Path]) -> None:
    """What the attempt said about resuming, if it got that far: it resumed from the newest
    complete checkpoint and skipped only checkpoints that were incomplete when it started."""
    if "resuming from" in text:
        named = text.split("resuming from ", 1)[1].split()[0]
        assert expected is not None and Path(named) == expected, (named, expected)
    for line in text.splitlines():
        if line.startswith("skipping incomplete checkpoint"):
            assert Path(line.split()[3]) in incomplete, line


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(
    rel_recipe, reference_run, tmp_path
):
    ref = weights(reference_run(rel_recipe, *OVERRIDES) / "model.safetensors")
    rng = random.Random(SEED)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["train", str(rel_recipe), "-o", str(run), *OVERRIDES]
    kinds: Counter = Counter()
    during_save = 0
    for i in range(KILLS):
        done = _complete(ckpts)
        expected = done[-1] if done else None
        base = int(expected.name.split("-")[1]) if expected else 0
        incomplete = _incomplete(ckpts)
        out = tmp_path / f"attempt-{i:02d}.log"
        since = time.time()
        kind, fault, until = _plan(rng, run, out, base, since)
        faults = {"DIST_TRAIN_FAULT": fault} if fault else {}
        code = cli_forked(out, *args, until=until, **faults)
        assert code == -9, f"attempt {i} ({kind} {fault}) ended with {code}:\n{_text(out)[-2000:]}"
        kinds[kind] += 1
        during_save += bool(partial_saves(ckpts, since))
        _check_resume_line(_text(out), expected, incomplete)
        assert not (run / "model.safetensors").exists()
        for path in _complete(ckpts):
            assert_checkpoint_loads(path)
    print(
        f"\n  {KILLS} kills: {dict(kinds)}; {during_save} left a partial save behind; "
        f"latest complete: {_complete(ckpts)[-1].name if _complete(ckpts) else None}"
    )
    assert during_save >= 2, "the fuzz never hit a checkpoint write; change the seed"

    expected = _complete(ckpts)[-1] if _complete(ckpts) else None
    incomplete = _incomplete(ckpts)
    r = cli_here(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_resume_line(r.stdout, expected, incomplete)
    assert bitwise_equal(weights(run / "model.safetensors"), ref)
    assert [e["step"] for e in events(run, "train")] == list(range(1, TOTAL + 1))
