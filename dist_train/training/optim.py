"""Optimizers with per-pattern parameter groups, and lr schedules counted in optimizer steps.

Schedules are a multiplier of each group's lr evaluated at the optimizer-step count, so the lr
at step k is the same on 1, 2 or 64 processes (accelerate's scheduler wrapper would step once
per process; we step ours exactly once per optimizer step instead).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from dist_train.config.schema import OptimizerConfig, SchedulerConfig
from dist_train.errors import UserError


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Trainable parameters split by `optimizer.param_groups` globs (first match wins)."""
    groups = [
        {
            "params": [],
            "lr": g.lr or cfg.lr,
            "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay,
            "pattern": g.params,
        }
        for g in cfg.param_groups
    ]
    default = {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay, "pattern": ["*"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen: never handed to the optimizer, so it can never move
        target = next(
            (g for g in groups if any(fnmatch.fnmatch(name, pat) for pat in g["pattern"])), default
        )
        target["params"].append(p)
    for i, g in enumerate(groups):
        if not g["params"]:
            names = [n for n, _ in model.named_parameters()]
            raise UserError(
                f"optimizer.param_groups[{i}].params {g['pattern']}: matches no "
                f"trainable parameter; names look like {names[:4]}."
            )
    out = groups + ([default] if default["params"] else [])
    if not out:
        raise UserError("every parameter is frozen (freeze); nothing to train.")
    for g in out:
        g.pop("pattern")
    return out


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    # foreach kernels batch the per-parameter update loop (fewer Python-level ops per step);
    # on CUDA (the model is placed before this), fused kernels do the whole update in one.
    cuda = all(p.device.type == "cuda" for p in model.parameters())
    kernel = {"fused": True} if cuda else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            **kernel,
        )
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kernel
        )
    return torch.optim.RMSprop(
        groups,
        lr=cfg.lr,
        alpha=cfg.alpha,
        eps=cfg.eps,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """lr = base_lr * warmup(k) * shape(k) * plateau_factor; stepped once per optimizer step.

    Reduce-on-plateau reuses torch's ReduceLROnPlateau on a one-parameter dummy optimizer whose
    lr *is* the factor, so it composes with warmup and is checkpointed with the rest.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total: int):
        self.cfg, self.total = cfg, max(total, 1)
        self._dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        mode = "max" if cfg.monitor.rsplit("/", 1)[-1] not in ("loss", "mse", "mae") else "min"
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._dummy, mode=mode, factor=cfg.factor, patience=cfg.patience
        )
        # lr constant between evaluations (plateau changes it in `observe`): stepping only
        # moves the checkpointed counter, skipping LambdaLR's recompute (~30 us per step).
        self._static = cfg.name in ("constant", "plateau") and not cfg.warmup_steps
        super().__init__(optimizer, self._factor)

    def step(self, epoch: int | None = None) -> None:
        if self._static and epoch is None and self._step_count > 0:
            self.last_epoch += 1
            self._step_count += 1
            return
        super().step(epoch)

    def _factor(self, k: int) -> float:
        cfg, warm = self.cfg, self.cfg.warmup_steps
        scale = min(1.0, (k + 1) / warm) if warm and k < warm else 1.0
        t = min(max(k - warm, 0) / max(self.total - warm, 1), 1.0)
        floor = cfg.min_lr / self._peak if self._peak else 0.0
        if cfg.name == "cosine":
            scale *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        elif cfg.name == "linear":
            scale *= floor + (1 - floor) * (1 - t)
        elif cfg.name == "step":
            scale *= cfg.gamma ** (max(k - warm, 0) // cfg.step_size)
        elif cfg.name == "exponential":
            scale *= cfg.gamma ** (max(k - warm, 0) / cfg.step_size)
        elif cfg.name == "onecycle":
            scale = _one_cycle(k, self.total, warm or int(0.3 * self.total))
        return scale * self._dummy.param_groups[0]["lr"]

    @property
    def _peak(self) -> float:
        return max(self.base_lrs) if hasattr(self, "base_lrs") else 0.0

    def observe(self, metrics: dict[str, float]) -> None:
        """At each evaluation: feed the plateau monitor (a no-op for other schedules)."""
        if self.cfg.name == "plateau" and self.cfg.monitor in metrics:
            self.plateau.step(metrics[self.cfg.monitor])
            self._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=False):
                g["lr"] = base * self._factor(self.last_epoch)

    def state_dict(self) -> dict:
        state = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("optimizer", "lr_lambdas", "cfg", "_dummy", "plateau", "_static")
        }
        state["plateau"] = self.plateau.state_dict()
        state["factor_lr"] = self._dummy.param_groups[0]["lr"]
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.plateau.load_state_dict(state.pop("plateau"))
        self._dummy.param_groups[0]["lr"] = state.pop("factor_lr")
        self.__dict__.update(state)


def _one_cycle(k: int, total: int, up: int) -> float:
    """Cosine ramp from 1/25 of the peak up to the peak, then cosine anneal to 1/1e4 of it."""
    start, end = 1 / 25, 1 / 1e4
    if k < up:
        return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * k / max(up, 1)))
    t = min((k - up) / max(total - up, 1), 1.0)
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int, peak_lr: float) -> Schedule:
    if cfg.name == "onecycle" and cfg.max_lr:
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] = g["lr"] * cfg.max_lr / peak_lr
    return Schedule(optimizer, cfg, total_steps)


def logged_lrs(optimizer: torch.optim.Optimizer, n_overrides: int) -> dict[str, float]:
    """The learning rates a log line reports: `lr` is the main group's (the parameters no
    `optimizer.param_groups` entry matched; param_groups() puts it after the overrides) and
    `lr/group{i}` is entry i's. If the overrides took every parameter there is no main group
    and `lr` is entry 0's."""
    groups = optimizer.param_groups
    main = groups[n_overrides] if len(groups) > n_overrides else groups[0]
    lrs = {"lr": main["lr"]}
    for i in range(min(n_overrides, len(groups))):
        lrs[f"lr/group{i}"] = groups[i]["lr"]
    return lrs
