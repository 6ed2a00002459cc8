"""The Trainer's defects fixed in issue 12 (each test failed before its fix), and the private
torch/accelerate APIs the training side keeps, checked so an upgrade fails here, not for users."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import torch
from torch import nn

from dist_train.config.recipe import load_recipe
from dist_train.config.schema import TrainConfig
from dist_train.errors import UserError
from dist_train.model.head import Head
from dist_train.training import signals
from dist_train.training.step import FiniteCheck, Stepper, direct_optimizer, total_norm
from dist_train.training.trainer import Preempted, train

RECIPE = """name: iris
data: {source: "sklearn:iris", target: target, task: multiclass}
model: {layers: [{linear: 16}, relu, {linear: out}]}
loss: cross_entropy
optimizer: {name: sgd, lr: 0.1}
train: {epochs: 2, batch_size: 8, log_every_steps: 5}
tracking: {wandb: {mode: disabled}}
"""


def _recipe(tmp_path, *overrides: str):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return load_recipe(str(path), list(overrides))


def _events(run_dir, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [r for r in rows if r.get("event") == kind]


def test_restart_with_a_build_error_leaves_the_previous_run_alone(tmp_path):
    """--restart used to clear the directory while planning it, before the data was loaded:
    a bad data setting plus --restart wiped the previous run. Now nothing goes before the
    build succeeded."""
    out = tmp_path / "run"
    train(_recipe(tmp_path), str(out))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert (out / "model.safetensors").is_file() and (out / "checkpoints").is_dir()
    with pytest.raises(UserError, match="nope"):
        train(_recipe(tmp_path, "data.target=nope"), str(out), restart=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    train(_recipe(tmp_path), str(out), restart=True)  # a good recipe does restart
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_signal_stops_its_own_run_only_and_the_handlers_come_back(tmp_path):
    """The CLI installs the handlers first thing; a signal arriving before train() starts
    must stop that run. It used to stop every later in-process run too (the request was never
    cleared) and left our handlers in place (Ctrl-C no longer raised KeyboardInterrupt)."""
    before = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    signals.install()  # as `dist-train train` does, before importing torch
    os.kill(os.getpid(), signal.SIGUSR1)  # e.g. SLURM's warning, during start-up
    with pytest.raises(Preempted):
        train(_recipe(tmp_path), str(tmp_path / "first"))
    assert (tmp_path / "first" / "checkpoints").is_dir()  # stopped with a checkpoint
    assert {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS} == before
    train(_recipe(tmp_path), str(tmp_path / "second"))  # not stopped by the earlier signal
    info = json.loads((tmp_path / "second" / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 2 * (120 // 8)
    assert {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS} == before


def test_logged_lr_is_the_main_groups_and_each_group_has_its_own_key(tmp_path):
    """With optimizer.param_groups the first torch group is the override; `lr` used to be its
    lr instead of the recipe's optimizer.lr."""
    recipe = _recipe(tmp_path, "optimizer.param_groups=[{params: ['layers.0.*'], lr: 0.5}]")
    train(recipe, str(tmp_path / "run"))
    logged = _events(tmp_path / "run", "train")
    assert logged
    for row in logged:  # constant schedule: the configured values
        assert row["lr"] == pytest.approx(0.1)
        assert row["lr/group0"] == pytest.approx(0.5)


def _fp16_stepper(scale: float):
    """A Stepper whose optimizer carries a real torch GradScaler on the CPU: the fp16 path
    (scaled backward, unscale, scaler-skipped steps) without a GPU. Only the autocast to fp16
    is left out (the model is not prepared)."""
    from accelerate import Accelerator

    from dist_train.training.distributed import forget_previous_accelerator

    forget_previous_accelerator()
    acc = Accelerator(cpu=True, mixed_precision="fp16")  # on a CPU: no scaler of its own
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=scale), True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    optimizer = acc.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    cfg = TrainConfig(log_every_steps=1)  # the norm is computed (and logged) every step
    stepper = Stepper(acc, model, optimizer, Head("multiclass", "cross_entropy"), cfg)
    assert stepper.scaler is acc.scaler and stepper.direct is None  # accelerate's fp16 step
    return stepper, model, reference


def test_fp16_grad_norm_is_logged_unscaled():
    """The logged grad_norm was computed on scaled gradients (65536x the true norm)."""
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    stepper, _, reference = _fp16_stepper(2.0**16)
    out = stepper(x, y, boundary=True, step=0)
    nn.functional.cross_entropy(reference(x), y).backward()
    expected = total_norm([p.grad for p in reference.parameters()])
    assert out.applied and not out.scaler_skipped and out.updated
    assert torch.allclose(out.norm, expected, rtol=1e-6)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()  # unscaled once, not twice
    for a, b in zip(stepper.model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fp16_step_skipped_by_the_scaler_is_not_an_update():
    """An overflow makes the scaler skip the update: the trainer must not advance the lr
    schedule for it (`StepOutput.updated` is what `Trainer.after_step` steps it on)."""
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    x[0, 0] = float("inf")  # an overflowing batch, as fp16 produces early on
    stepper, model, _ = _fp16_stepper(2.0**16)
    weights = [p.detach().clone() for p in model.parameters()]
    out = stepper(x, y, boundary=True, step=0)
    assert out.scaler_skipped and not out.updated
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert stepper.scaler.get_scale() == 2.0**15  # the scaler backed off, as on a GPU
    assert all(p.grad is None for p in model.parameters())  # nothing carries over


def test_steps_the_scaler_skipped_do_not_move_the_lr_schedule(tmp_path, monkeypatch):
    """The whole trainer on an fp16 accelerator with a real CPU GradScaler whose scale is so
    large that every step overflows (as the first steps of an fp16 run may): the schedule used
    to advance on each skipped step; now the lr stays at its first value and no update lands."""
    from accelerate import Accelerator

    from dist_train.training import trainer as trainer_module
    from dist_train.training.distributed import forget_previous_accelerator

    def fp16_on_cpu(recipe):
        forget_previous_accelerator()
        # As make_accelerator: our schedule is stepped by the trainer, not by accelerate's
        # wrapper (which would also skip on overflow, but steps once per process).
        acc = Accelerator(cpu=True, mixed_precision="fp16", step_scheduler_with_optimizer=False)
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**127), True
        return acc

    monkeypatch.setattr(trainer_module, "make_accelerator", fp16_on_cpu)
    recipe = _recipe(tmp_path, "scheduler.name=cosine")
    train(recipe, str(tmp_path / "run"))
    logged = _events(tmp_path / "run", "train")
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    assert all(r["lr"] == pytest.approx(0.1) for r in logged)  # cosine would have decayed it
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["mixed_precision"] == "fp16" and info["steps"] == 30  # every batch counted


def test_two_precisions_train_in_one_process(tmp_path):
    """accelerate's AcceleratorState is a singleton that refuses another precision; the private
    `AcceleratorState._reset_state` (distributed.forget_previous_accelerator) allows it."""
    from accelerate.state import AcceleratorState

    assert callable(getattr(AcceleratorState, "_reset_state", None)), "accelerate changed"
    train(_recipe(tmp_path, "train.mixed_precision=bf16", "train.epochs=1"), str(tmp_path / "a"))
    train(_recipe(tmp_path, "train.epochs=1"), str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "run.json").read_text())["mixed_precision"] == "no"


def test_private_apis_the_training_side_relies_on_still_exist():
    """If one disappears, the heartbeat report or the fused check silently degrade: fail here."""
    from torch.distributed import distributed_c10d

    assert callable(getattr(distributed_c10d, "_get_default_store", None)), "torch changed"
    assert callable(getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None))
    assert callable(getattr(torch, "_foreach_norm", None))  # step.total_norm's one kernel
    check = FiniteCheck()
    grads = [torch.randn(3), torch.randn(2, 2)]
    assert check(grads)
    assert torch.device("cpu") in check.flags  # the fused kernel ran, not the norm fallback
    grads[1][0, 1] = float("nan")
    assert not check(grads)


def test_direct_optimizer_step_equals_accelerates_bitwise():
    """The step bypasses AcceleratedOptimizer.step (its is_lomo_available() lookups cost
    20-200 us a step); it must stay the same update, and `.optimizer` must stay its inner."""
    from accelerate import Accelerator

    from dist_train.training.distributed import forget_previous_accelerator

    forget_previous_accelerator()
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    nets = [nn.Linear(5, 2)]
    nets.append(copy.deepcopy(nets[0]))
    opts = [
        acc.prepare_optimizer(torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9)) for n in nets
    ]
    inner = direct_optimizer(opts[0], acc)
    assert inner is opts[0].optimizer and isinstance(inner, torch.optim.SGD)
    x = torch.randn(4, 5)
    for _ in range(3):
        for net in nets:
            net(x).square().sum().backward()
        inner.step()
        opts[1].step()
        inner.zero_grad(set_to_none=True)
        opts[1].zero_grad(set_to_none=True)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
