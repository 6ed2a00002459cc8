# ruff: noqa: F811  (pytest fixtures imported from rel_helpers are parameters here)
"""Kill fuzz: SIGKILL one training process at 20+ seeded-random moments (start-up, resume
loading, mid-step, while a checkpoint is being written, between its rename and its COMPLETE
marker), resume after each, and the final weights are bitwise those of an uninterrupted run.
After every kill each checkpoint marked COMPLETE must load, and the next resume must name the
newest complete one, never a half-written one.

Cost: one process, a checkpoint every 3 steps; each attempt pays ~3-5 s of start-up.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from rel_helpers import (  # noqa: F401 (fixtures)
    ROOT,
    bitwise_equal,
    cli,
    env,
    events,
    kill_tree,
    logged_steps,
    rel_data,
    rel_recipe,
    weights,
)

pytestmark = pytest.mark.slow

KILLS = 20
TOTAL = 60  # optimizer steps of the recipe (20 per epoch x 3)
# dropout + noise augmentation: the restored RNG streams matter; a checkpoint every 3 steps.
OVERRIDES = [
    "checkpoint.every_steps=3",
    "checkpoint.keep=2",
    "model.layers.3=dropout",
    "data.augment.noise=0.05",
]


def _complete(ckpts: Path) -> list[Path]:
    return sorted(p for p in ckpts.glob("step-*") if (p / "COMPLETE").is_file())


def _loads(path: Path) -> None:
    """Every file of a complete checkpoint loads (safely) and holds what it should."""
    import json

    import torch
    from accelerate.utils import load
    from safetensors.torch import load_file

    state = json.loads((path / "train_state.json").read_text())
    assert state["step"] == int(path.name.split("-")[1])
    assert load_file(str(path / "model.safetensors"))
    assert torch.load(path / "optimizer.bin", weights_only=True)["state"]
    assert "last_epoch" in torch.load(path / "scheduler.bin", weights_only=True)
    assert "torch_manual_seed" in load(path / "random_states_0.pkl")


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


def _condition(kind: str, rng: random.Random, run: Path, out: Path, base: int, since: float):
    """When to kill this attempt. Every kind falls back to a step bound past the next save
    (so most attempts make progress) and before the end (so the run never finishes)."""
    ckpts = run / "checkpoints"
    bound = min(base + rng.randint(4, 6), TOTAL - 1)
    delay = rng.uniform(0.2, 6.0)

    def training() -> bool:  # the plan line is printed after metrics.jsonl was rewound
        return out.exists() and "dist-train:" in out.read_text()

    def past_bound() -> bool:
        return training() and logged_steps(run) >= bound

    def saving() -> bool:
        return bool(_fresh(ckpts.glob(".tmp-step-*"), since))

    def unsealed() -> bool:
        return bool(
            _fresh([p for p in ckpts.glob("step-*") if not (p / "COMPLETE").exists()], since)
        )

    return {
        "step": past_bound,
        "saving": lambda: saving() or past_bound(),
        "unsealed": lambda: unsealed() or past_bound(),
        "time": lambda: time.time() - since >= delay or past_bound(),
    }[kind]


def _attempt(args: list[str], cond, out: Path) -> bool:
    """Run until `cond()` holds, then SIGKILL; True if killed (False: it ended by itself)."""
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dist_train", *args],
            cwd=ROOT,
            env=env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if cond():
                    kill_tree(proc.pid)
                    proc.wait()
                    return True
                time.sleep(0.0005)
            assert proc.poll() is not None, "attempt hung"
            return False
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


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
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(rel_recipe, tmp_path):
    r = cli("train", str(rel_recipe), "-o", str(tmp_path / "ref"), *OVERRIDES)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = weights(tmp_path / "ref" / "model.safetensors")

    rng = random.Random(20240611)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["train", str(rel_recipe), "-o", str(run), *OVERRIDES]
    kinds: Counter = Counter()
    during_save = 0
    for i in range(KILLS):
        done = _complete(ckpts)
        expected = done[-1] if done else None
        base = int(expected.name.split("-")[1]) if expected else 0
        incomplete = _incomplete(ckpts)
        kind = rng.choice(["step", "saving", "unsealed", "time"])
        out = tmp_path / f"attempt-{i:02d}.log"
        since = time.time()
        killed = _attempt(args, _condition(kind, rng, run, out, base, since), out)
        assert killed, f"attempt {i} ({kind}) ended by itself:\n{out.read_text()[-2000:]}"
        kinds[kind] += 1
        during_save += bool(partial_saves(ckpts, since))
        _check_resume_line(out.read_text(), expected, incomplete)
        assert not (run / "model.safetensors").exists()
        for path in _complete(ckpts):
            _loads(path)
    print(
        f"\n  {KILLS} kills: {dict(kinds)}; {during_save} left a partial save behind; "
        f"latest complete: {_complete(ckpts)[-1].name if _complete(ckpts) else None}"
    )
    assert during_save >= 2, "the fuzz never hit a checkpoint write; change the seed"

    expected = _complete(ckpts)[-1] if _complete(ckpts) else None
    incomplete = _incomplete(ckpts)
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_resume_line(r.stdout, expected, incomplete)
    assert bitwise_equal(weights(run / "model.safetensors"), ref)
    assert sorted({e["step"] for e in events(run, "train")}) == list(range(1, TOTAL + 1))
