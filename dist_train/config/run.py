"""Run-level recipe sections: checkpoints, fine-tuning, trackers, SLURM defaults, sweeps, and
the training loop's add-ons (weight averaging, profiling)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from dist_train.config.base import Strict, default_mode


class BestCheckpoint(Strict):
    monitor: str = Field("valid/loss", description="metric deciding the best checkpoint")
    mode: Literal["min", "max"] | None = Field(None, description="default: from the metric name")


class CheckpointConfig(Strict):
    every_steps: int | None = Field(None, ge=1, description="save every N optimizer steps")
    every_epochs: int = Field(1, ge=0, description="save every N epochs (0: never)")
    keep: int = Field(2, ge=1, description="keep the last K complete checkpoints")
    best: BestCheckpoint | None = Field(None, description="also keep the best checkpoint")


class FinetuneConfig(Strict):
    from_: str = Field(
        alias="from",
        description="pretrained weights: a .safetensors file, a run or checkpoint dir, a "
        "torch.save state dict (.pt/.pth/.bin, loaded weights_only), or a transformers "
        "save_pretrained dir (model.safetensors / pytorch_model.bin, sharded or not)",
    )
    key_map: dict[str, str | None] = Field(
        default_factory=dict,
        description="ordered prefix renames of the file's tensor names, first match wins, e.g. "
        '{"0.": "layers.0."}, {"backbone.": ""}, {"": "layers."}; null drops those tensors',
    )
    strict: bool = Field(
        False,
        description="fail (exit 2) when a model tensor is missing from the file or a file "
        "tensor is unused (reinit and dropped names excepted)",
    )
    freeze: list[str] = Field(
        default_factory=list, description="deprecated alias of the top-level `freeze` globs"
    )
    reinit: list[str] = Field(default_factory=list, description="globs to keep freshly initialised")
    allow_shape_mismatch: bool = Field(
        False, description="reinitialise tensors whose shape differs instead of failing"
    )
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class UnfreezeStep(Strict):
    epoch: int = Field(
        ge=1,
        description="0-based epoch (as metrics.jsonl counts) from which these become trainable, "
        "i.e. after this many epochs",
    )
    unfreeze: list[str] = Field(
        min_length=1, description="globs over parameter or module names to make trainable"
    )


class FreezeConfig(Strict):
    """Frozen parameters (a list of globs is the short form of `{params: [...]}`)."""

    params: list[str] = Field(
        min_length=1,
        description="globs over parameter names (layers.0.weight) or module names (layers.0, "
        "bert.encoder): requires_grad off, batch-norm statistics frozen with their layer",
    )
    unfreeze_at_epoch: int | None = Field(
        None,
        ge=1,
        description="every frozen parameter trains from this epoch on (0-based: after this many)",
    )
    schedule: list[UnfreezeStep] = Field(
        default_factory=list, description="gradual unfreezing: groups made trainable per epoch"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, raw: object) -> object:
        return {"params": raw} if isinstance(raw, list) else raw

    @model_validator(mode="after")
    def _one_schedule(self) -> FreezeConfig:
        if self.unfreeze_at_epoch is not None and self.schedule:
            raise ValueError(
                "freeze: give unfreeze_at_epoch (everything at once) or schedule (groups "
                "per epoch), not both"
            )
        epochs = [s.epoch for s in self.schedule]
        if epochs != sorted(set(epochs)):
            raise ValueError(
                f"freeze.schedule: epochs {epochs} must increase strictly; put the globs of one "
                "epoch into one entry"
            )
        return self

    def steps(self) -> list[tuple[int, list[str], str]]:
        """(epoch, globs, recipe key) of every unfreezing, in order."""
        if self.unfreeze_at_epoch is not None:
            return [(self.unfreeze_at_epoch, ["*"], "freeze.unfreeze_at_epoch")]
        return [
            (s.epoch, s.unfreeze, f"freeze.schedule[{i}].unfreeze")
            for i, s in enumerate(self.schedule)
        ]


class WandbConfig(Strict):
    project: str = Field("dist-train", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (team/user)")
    group: str | None = Field(None, description="wandb group")
    tags: list[str] = Field(default_factory=list, description="wandb tags")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="default: $WANDB_MODE, else offline (never hangs without network)"
    )


class TrackingConfig(Strict):
    wandb: WandbConfig | None = Field(None, description="log to Weights & Biases")
    tensorboard: bool = Field(False, description="write TensorBoard events to RUN_DIR/tensorboard")


class SlurmConfig(Strict):
    """Defaults for `dist-train submit` (flags on the command line win)."""

    nodes: int = Field(1, ge=1, description="nodes to allocate (multi_node when > 1)")
    gpus_per_node: int = Field(
        0, ge=0, description="GPUs per node, one process each (0: a CPU job)"
    )
    processes: int | None = Field(
        None, ge=1, description="CPU jobs only: processes (gloo ranks) on the node"
    )
    time: str = Field(
        "01:00:00",
        pattern=r"^(\d+-)?\d{1,2}:[0-5]\d:[0-5]\d$",
        description="time limit, HH:MM:SS or D-HH:MM:SS",
    )
    partition: str | None = Field(None, description="SLURM partition (default: the site's)")
    grace_s: int = Field(
        120, ge=0, description="seconds before the time limit when USR1 asks for a checkpoint"
    )
    cpus_per_task: int | None = Field(
        None,
        ge=1,
        description="CPUs per node-level task (default: processes per node x train.threads, "
        "or x 1: one core per rank)",
    )
    mem: str | None = Field(
        None,
        pattern=r"^\d+[KMGT]?$",
        description="memory per node (sbatch --mem), e.g. 64G (default: the site's)",
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description="extra sbatch options, e.g. --account=abc, --qos=high"
    )
    ifname: str | None = Field(
        None, description="network interface for NCCL/gloo (NCCL/GLOO_SOCKET_IFNAME), e.g. ib0"
    )
    rdzv_timeout_s: int = Field(
        900, ge=1, description="multi-node: seconds the nodes wait for each other at start"
    )


class SweepParam(Strict):
    """One searched recipe key: exactly one distribution (sampled by the sweep driver)."""

    log_uniform: tuple[float, float] | None = Field(
        None, description="[lo, hi], lo > 0: exp(U(ln lo, ln hi)); lr 10^-U(2,4) is [1e-4, 1e-2]"
    )
    uniform: tuple[float, float] | None = Field(None, description="[lo, hi]: U(lo, hi)")
    int_uniform: tuple[int, int] | None = Field(
        None, description="[lo, hi]: an integer in lo..hi, both included"
    )
    choice: list[Any] | None = Field(
        None, min_length=1, description="values, one drawn uniformly per trial"
    )
    grid: list[Any] | None = Field(
        None, min_length=1, description="values, every one tried (cartesian product over grids)"
    )

    @model_validator(mode="after")
    def _one_valid(self) -> SweepParam:
        given = [k for k in SWEEP_DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one distribution, got {len(given)} ({', '.join(given) or 'none'}); "
                f"one of {', '.join(SWEEP_DISTRIBUTIONS)}, e.g. {{log_uniform: [1.0e-4, 1.0e-2]}}"
            )
        kind = given[0]
        if kind in ("log_uniform", "uniform", "int_uniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind} [{lo}, {hi}] needs lo < hi; write [low, high]")
            if kind == "log_uniform" and lo <= 0:
                raise ValueError(
                    f"log_uniform [{lo}, {hi}] needs lo > 0 (no log of a non-positive number); "
                    "use uniform, or a positive lower bound"
                )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SWEEP_DISTRIBUTIONS if getattr(self, k) is not None)


SWEEP_DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice", "grid")


class SweepConfig(Strict):
    """`dist-train sweep`: grid params form a cartesian product; at every grid point `trials`
    random draws of the other params. Trial i draws from seed (seed, i) only, so raising `trials`
    keeps the earlier trials."""

    trials: int = Field(
        1, ge=1, description="random trials per grid point (no grid params: the number of trials)"
    )
    seed: int = Field(
        0, ge=0, description="seeds the sampling of all trials (same seed, same trials)"
    )
    metric: str = Field("valid/loss", description="valid/loss or valid/<metric> to optimize")
    direction: Literal["min", "max"] | None = Field(
        None, description="min or max (default: from the metric name)"
    )
    params: dict[str, SweepParam] = Field(
        min_length=1,
        description="dotted recipe key (e.g. optimizer.lr) -> {log_uniform|uniform|int_uniform|"
        "choice|grid: [...]}",
    )

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        for key in self.params:
            if key == "name" or key.split(".")[0] == "sweep" or not all(key.split(".")):
                raise ValueError(
                    f"sweep.params.{key}: not a searchable key; name a recipe key such as "
                    "optimizer.lr (not name or sweep.*)"
                )
        randoms = [k for k, p in self.params.items() if p.kind != "grid"]
        if self.trials > 1 and not randoms:
            raise ValueError(
                f"sweep.trials: {self.trials} trials per grid point but no random params would "
                "repeat identical trials; drop trials, or add e.g. seed: {choice: [0, 1, 2]}"
            )
        if self.direction is None:
            self.direction = default_mode(self.metric)
        return self


class EmaConfig(Strict):
    """Exponential moving average of the weights (evaluated and exported instead of them)."""

    decay: float = Field(
        0.999, gt=0, lt=1, description="ema = decay * ema + (1 - decay) * weights, per update"
    )
    every_steps: int = Field(1, ge=1, description="optimizer steps between updates")


class SwaConfig(Strict):
    """Stochastic weight averaging: the equal-weight mean of the weights from an epoch on."""

    start_epoch: int = Field(
        ge=1,
        description="first epoch (counted from 1, as printed) whose weights enter the average",
    )
    every_steps: int | None = Field(
        None,
        ge=1,
        description="average every N optimizer steps from start_epoch on (default: at the end "
        "of each epoch)",
    )


class ProfileConfig(Strict):
    """torch.profiler over a few optimizer steps: a chrome trace and a top-ops table."""

    wait: int = Field(1, ge=0, description="optimizer steps skipped before profiling")
    warmup: int = Field(1, ge=0, description="steps profiled but discarded (warm caches)")
    active: int = Field(3, ge=1, description="steps recorded into the trace")
    ranks: list[int] = Field([0], min_length=1, description="ranks that profile")
    row_limit: int = Field(20, ge=1, description="rows of the printed top-ops table")
