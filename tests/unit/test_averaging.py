"""Weight averaging (`train.ema`, `train.swa`; dist_train/training/ema.py): the update equals
torch's AveragedModel, the exported weights are the average of the raw weights the
checkpoints recorded, evaluation uses them and says so, and bad settings exit 2.

Resume (bitwise, one process): tests/reliability/test_resume_features.py; two processes:
tests/dist/test_eval_steps.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from procs import cli_here, weights
from torch import nn

from dist_train.training.ema import AVERAGED_FILE, WeightAverage

RECIPE = """name: iris
data: {source: "sklearn:iris", target: target, task: multiclass}
model: {layers: [{linear: 16}, relu, {linear: out}]}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
train: {epochs: 1, batch_size: 8, log_every_steps: 5}
tracking: {wandb: {mode: disabled}}
"""  # 120 training rows: 15 optimizer steps per epoch


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "iris.yaml"
    path.write_text(RECIPE)
    return path


def _events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r for r in rows if r["event"] == kind]


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_steps(net: nn.Module, averages: list, steps: int) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        for avg in averages:
            avg.update_parameters(net) if hasattr(avg, "update_parameters") else avg.update()


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_update_equals_torch_averaged_model(kind):
    """Parameters and batch-norm statistics as AveragedModel(use_buffers=True) computes them
    (EMA bitwise: the same foreach lerp); `num_batches_tracked` copied, not averaged."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    net = _toy()
    ours = WeightAverage(net, kind, decay=0.9)
    fn = get_ema_multi_avg_fn(0.9) if kind == "ema" else None
    theirs = AveragedModel(net, multi_avg_fn=fn, use_buffers=True)
    _train_steps(net, [ours, theirs], steps=6)
    assert ours.count == int(theirs.n_averaged) == 6
    mine, ref = ours.module.state_dict(), theirs.module.state_dict()
    floats = [k for k, v in mine.items() if v.is_floating_point()]
    assert len(floats) == 7  # 3 linear, batch norm weight, bias, mean, var (bias=False: a
    # bias before batch norm gets no gradient, so its average would equal it)
    for key in floats:
        if kind == "ema":
            assert torch.equal(mine[key], ref[key]), key
        else:  # AveragedModel divides by a device counter, we by a Python int: one rounding
            assert torch.allclose(mine[key], ref[key], rtol=0, atol=1e-6), key
        assert not torch.equal(mine[key], net.state_dict()[key]), key  # an average, not a copy
    nbt = "1.num_batches_tracked"
    assert int(mine[nbt]) == int(net.state_dict()[nbt]) == 6


def test_exported_ema_is_the_ema_of_the_checkpointed_weights(tmp_path):
    """A checkpoint after every step records the raw trajectory; the export must be the EMA of
    that trajectory at the configured cadence (every 2nd step, decay 0.8), computed here in
    float64, and evaluation must have used it."""
    recipe, run = _recipe(tmp_path), tmp_path / "run"
    over = [
        "train.ema={decay: 0.8, every_steps: 2}",
        "checkpoint.every_steps=1",
        "checkpoint.keep=20",
        "train.eval_every_steps=5",
    ]
    r = cli_here("train", str(recipe), "-o", str(run), *over)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exponential moving average (decay 0.8, every 2 step(s))" in r.stdout
    raw = {k: weights(run / f"checkpoints/step-{k:06d}/model.safetensors") for k in range(1, 16)}
    exported = weights(run / "model.safetensors")

    def ema(steps: list[int]) -> dict:
        avg = {n: t.double() for n, t in raw[steps[0]].items()}
        for k in steps[1:]:
            avg = {n: 0.8 * avg[n] + 0.2 * raw[k][n].double() for n in avg}
        return avg

    want = ema([2, 4, 6, 8, 10, 12, 14])  # the first update copies; step 15 is no update
    assert max(float((exported[n].double() - want[n]).abs().max()) for n in want) < 1e-6
    every_step = ema(list(range(1, 16)))  # a wrong cadence is visible
    assert max(float((exported[n].double() - every_step[n]).abs().max()) for n in want) > 1e-4
    assert max(float((exported[n] - raw[15][n]).abs().max()) for n in want) > 1e-3
    # the last checkpoint holds both: raw weights, and the average as exported
    final = run / "checkpoints/step-000015"
    assert weights(final / AVERAGED_FILE).keys() == exported.keys()
    assert all(torch.equal(weights(final / AVERAGED_FILE)[n], exported[n]) for n in exported)
    # evaluations at steps 5, 10, then the last step; all of the averaged weights
    evals = _events(run, "eval")
    assert [(e["step"], e["weights"]) for e in evals] == [(5, "ema"), (10, "ema"), (15, "ema")]
    assert "epoch 1 step 5 valid (ema weights):" in r.stdout
    # the final metrics are those of the exported (averaged) weights
    out = tmp_path / "eval.json"
    r = cli_here(
        "eval", str(recipe), "--checkpoint", str(run / "model.safetensors"), "-o", str(out)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["valid/loss"] == pytest.approx(evals[-1]["valid/loss"], 1e-6)


def test_swa_averages_the_epoch_ends_from_start_epoch(tmp_path):
    """SWA from epoch 2 of 3, at epoch ends: the mean of the weights after epochs 2 and 3;
    epoch 1 is evaluated with the raw weights (no average exists yet)."""
    recipe, run = _recipe(tmp_path), tmp_path / "run"
    r = cli_here(
        "train", str(recipe), "-o", str(run), "train.epochs=3", "train.swa.start_epoch=2",
        "checkpoint.keep=3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ends = [weights(run / f"checkpoints/step-{k:06d}/model.safetensors") for k in (30, 45)]
    exported = weights(run / "model.safetensors")
    for n, t in exported.items():
        want = (ends[0][n].double() + ends[1][n].double()) / 2
        assert float((t.double() - want).abs().max()) < 1e-6, n
    evals = _events(run, "eval")
    assert [(e["step"], e["weights"]) for e in evals] == [(15, "raw"), (30, "swa"), (45, "swa")]


def test_checkpoints_without_or_with_a_broken_average(tmp_path):
    """A checkpoint from before the average (or of the other kind) starts it afresh with a
    notice; a torn file is a one-paragraph error naming it."""
    from safetensors.torch import save_file

    from dist_train.errors import UserError

    net = _toy()
    ema = WeightAverage(net, "ema", decay=0.9)
    assert "holds no averaged weights; the ema starts now" in ema.load(tmp_path)
    _train_steps(net, [ema], steps=2)
    ema.write(tmp_path)
    swa = WeightAverage(net, "swa")
    assert "written for train.ema, the recipe asks for train.swa" in swa.load(tmp_path)
    assert swa.count == 0
    again = WeightAverage(_toy(), "ema", decay=0.9)
    assert again.load(tmp_path) is None and again.count == 2
    state = ema.module.state_dict()
    assert all(torch.equal(v, again.module.state_dict()[k]) for k, v in state.items())
    save_file({"0.weight": torch.zeros(1)}, str(tmp_path / AVERAGED_FILE), {"kind": "ema"})
    with pytest.raises(UserError, match=f"{AVERAGED_FILE} cannot be loaded"):
        WeightAverage(net, "ema").load(tmp_path)


BAD = [
    (["train.ema.decay=1.0"], "train.ema.decay"),
    (["train.ema.decay=0"], "train.ema.decay"),
    (["train.ema.every_steps=0"], "train.ema.every_steps"),
    (["train.swa.start_epoch=5"], "train.swa.start_epoch: 5 is after the last epoch"),
    (["train.swa.start_epoch=1", "train.ema.decay=0.9"], "train.swa: give one of"),
    (["train.eval_every_steps=5", "data.valid_fraction=0"], "train.eval_every_steps: there is no"),
    (["train.eval_every_steps=0"], "train.eval_every_steps"),
    (["train.profile.active=0"], "train.profile.active"),
]


@pytest.mark.parametrize(("overrides", "expect"), BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_settings_exit_2_naming_the_key(tmp_path, overrides, expect):
    run = tmp_path / "run"
    r = cli_here("train", str(_recipe(tmp_path)), "-o", str(run), *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert expect in r.stderr
    assert not run.exists()  # refused before anything was written


def test_profile_ranks_that_do_not_exist_exit_2(tmp_path):
    run = tmp_path / "run"
    r = cli_here("train", str(_recipe(tmp_path)), "-o", str(run), "train.profile.ranks=[0,2]")
    assert r.returncode == 2 and "train.profile.ranks: [2] do not exist" in r.stderr, r.stderr
    assert not run.exists()
