"""The step body: forward, backward, clip, optimizer step, and the non-finite guard."""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field

import torch

from dist_train.errors import NonFiniteStop

# Per prepared optimizer: (parameters, inner optimizer or None). Computed once per run.
_PLAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class StepOutput:
    loss: torch.Tensor  # un-scaled micro-batch loss, on device (never read per step)
    norm: torch.Tensor | None = None  # global gradient norm, when computed
    applied: bool | None = None  # None: not a boundary; False: skipped as non-finite
    bad_params: list[str] = field(default_factory=list)


def train_step(loop, x: torch.Tensor, y: torch.Tensor, boundary: bool) -> StepOutput:
    """One micro-batch: forward, backward (DDP all-reduces only on the accumulation boundary),
    and on the boundary the guard, clip and optimizer step."""
    t, acc, model = loop.recipe.train, loop.accelerator, loop.model
    params, direct = _plan(loop.optimizer, model, acc)
    if not boundary:
        with acc.no_sync(model):  # skip the gradient all-reduce until the boundary
            loss = loop.head.loss_fn(model(x), y)
            _backward(acc, loss, t.grad_accum, direct)
        return StepOutput(loss.detach())
    loss = loop.head.loss_fn(model(x), y)
    _backward(acc, loss, t.grad_accum, direct)
    # fp16's grad scaler already skips steps with inf/NaN gradients by design.
    guard = t.on_nonfinite != "ignore" and t.mixed_precision != "fp16"
    want_norm = (loop.state.step + 1) % t.log_every_steps == 0
    norm = None
    if t.max_grad_norm:
        norm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)  # FSDP: the model's own
    elif want_norm:
        norm = _total_norm([p.grad for p in params if p.grad is not None])
    # Gradients were all-reduced in backward, so this test (one host read per step; free on
    # CPU, the only per-step sync on a GPU; `train.on_nonfinite: ignore` removes it) gives the
    # same answer on every rank: no extra collective needed to agree.
    if guard and not (math.isfinite(norm) if norm is not None else _all_finite(params)):
        bad = [
            n.removeprefix("module.")  # DDP's wrapper prefix: report the recipe's names
            for n, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        if norm is None:  # the diagnostic reports it (inf or NaN)
            norm = _total_norm([p.grad for p in params if p.grad is not None])
        loop.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss.detach(), norm, applied=False, bad_params=bad)
    opt = direct or loop.optimizer
    opt.step()
    opt.zero_grad(set_to_none=True)
    return StepOutput(loss.detach(), norm, applied=True)


def _backward(acc, loss: torch.Tensor, accum: int, direct) -> None:
    """`accelerator.backward(loss / accum)` without its extra `loss / 1`: accelerate divides by
    its own accumulation count, which is always 1 here (accumulation is ours). With a grad
    scaler (fp16) or an engine owning backward (DeepSpeed, Megatron) accelerate's path runs."""
    scaled = loss / accum if accum > 1 else loss
    if direct is not None and acc.distributed_type.value not in ("DEEPSPEED", "MEGATRON_LM"):
        scaled.backward()
    else:
        acc.backward(scaled)


def _plan(optimizer, model, acc) -> tuple[list, torch.optim.Optimizer | None]:
    """The trainable parameters (listed once, not walked every step) and, when it is safe, the
    optimizer accelerate wraps, to be stepped directly.

    Safe when no grad scaler is active (fp16 needs accelerate's step: unscale, skip on
    overflow, scaler update) and the backend is not XLA (gradient all-reduce inside step()):
    `AcceleratedOptimizer.step()` then reduces to `if gradient_state.sync_gradients:
    optimizer.step()`, plus two `is_lomo_available()` package lookups (20-200 us each here)
    for LOMO optimizers, which dist_train never builds (optim.py makes torch.optim ones). We
    never use accelerate's `accumulate()` (accumulation is our own no_sync + boundary), so
    sync_gradients is always True here; we only step on a boundary. Its `zero_grad()` likewise
    adds only an `inspect.signature` call (~30 us) per step.
    """
    plan = _PLAN.get(optimizer)
    if plan is None:
        inner = getattr(optimizer, "optimizer", None)
        ok = (
            inner is not None
            and getattr(optimizer, "scaler", None) is None
            and acc.distributed_type.value != "XLA"
            and acc.gradient_state.sync_gradients
        )
        params = list(model.parameters())
        plan = _PLAN[optimizer] = (params, inner if ok else None)
    return plan


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm, as `torch.nn.utils.get_total_norm` computes it (per-tensor norms by
    one foreach kernel, then the norm of those), without its per-call grouping by device and
    dtype (~45 us of Python per step here); mixed devices fall back to it."""
    if not grads:
        return torch.zeros(())
    try:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    except RuntimeError:
        return torch.nn.utils.get_total_norm(grads)


_FLAGS: dict = {}  # per device: (found-non-finite flag, scale 1.0) for the fused check


def _all_finite(params: list[torch.Tensor]) -> bool:
    """No inf/NaN in any gradient, by the fused kernel GradScaler uses to find overflows (one
    pass over all gradients, multiplying them by 1.0: values unchanged). Between log steps it
    replaces the norm, which costs two kernels per parameter (~2x the time here).

    Sharded gradients (FSDP's DTensors) take the norm instead: a check of this rank's shard
    alone could let ranks disagree on skipping the step, while the norm of DTensors is the
    global one. Gradients on several devices fall back to the norm too."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    if any(type(g) is not torch.Tensor for g in grads):  # DTensor & co.: the global norm
        return math.isfinite(_total_norm(grads))
    device = grads[0].device
    if device not in _FLAGS:
        _FLAGS[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
    found, one = _FLAGS[device]
    try:
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    except (RuntimeError, NotImplementedError):  # e.g. gradients on several devices
        return math.isfinite(_total_norm(grads))
    return not bool(found)


def handle_nonfinite(loop, out: StepOutput, step_rows: list[torch.Tensor]) -> None:
    """A skipped step: log it; stop (with a diagnostic) when the recipe says so or after too
    many in a row. The previous complete checkpoint stays the latest: nothing bad is saved."""
    t, state, acc = loop.recipe.train, loop.state, loop.accelerator
    state.nonfinite_streak += 1
    step = state.step + 1
    loop.log.event("nonfinite", epoch=state.epoch, step=step, streak=state.nonfinite_streak)
    if t.on_nonfinite == "skip" and state.nonfinite_streak <= t.max_nonfinite_skips:
        loop.log.info(
            f"step {step}: non-finite gradient, step skipped "
            f"({state.nonfinite_streak}/{t.max_nonfinite_skips} in a row)"
        )
        return
    # Collective, reached by every rank (the decision is rank-identical): which rows it was.
    rows = acc.gather(torch.cat(step_rows)).tolist()
    path = loop.run_dir / f"nonfinite-step-{step:06d}.json"
    if acc.is_main_process:
        path.write_text(
            json.dumps(
                {
                    "step": step,
                    "epoch": state.epoch,
                    "loss": float(out.loss),
                    "grad_norm": float(out.norm),
                    "params_with_nonfinite_grad": out.bad_params,
                    "batch_rows": rows,
                    "consecutive": state.nonfinite_streak,
                },
                indent=2,
            )
        )
    why = (
        "train.on_nonfinite is stop"
        if t.on_nonfinite == "stop"
        else f"{state.nonfinite_streak} consecutive skips > train.max_nonfinite_skips"
    )
    raise NonFiniteStop(
        f"step {step}: non-finite loss/gradient ({why}); parameters affected: "
        f"{', '.join(out.bad_params[:6]) or 'none (loss only)'}. Diagnostic: {path}. The last "
        "good checkpoint is untouched. Try a lower optimizer.lr, train.max_grad_norm, or "
        "train.on_nonfinite: skip; check the rows listed for bad values."
    )
