"""The only place config meets constructors: data, model, loss head, optimizer, schedule.

`build_components` is the one build sequence; train, eval, predict, check and summary all call
it, so what `check` accepts is what `train` builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dist_train.config.schema import Recipe
from dist_train.data.sources import DataBundle, load_data
from dist_train.errors import UserError
from dist_train.model import meta
from dist_train.model.head import Head
from dist_train.model.net import Net, build_model

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dist_train.training.optim import Schedule


@dataclass
class Components:
    """Everything built from a recipe before accelerate's prepare()."""

    data: DataBundle
    head: Head
    model: torch.nn.Module
    notes: list[str] = field(default_factory=list)  # fine-tuning load report, one line each
    optimizer: torch.optim.Optimizer | None = None  # None when built for eval/predict
    scheduler: Schedule | None = None
    total_steps: int = 0  # optimizer steps of the whole run (epochs x per epoch, or max_steps)
    steps_per_epoch: int = 0


def build_components(
    recipe: Recipe,
    accelerator: Accelerator | None = None,
    *,
    finetune: bool = True,
    optimizer: bool = True,
) -> Components:
    """data (rank 0 first) -> head -> model (seeded) -> [`finetune`: pretrained weights and
    freezing] -> [`optimizer`: DDP's unused-parameter probe -> device placement -> optimizer ->
    schedule]. train and check build everything; summary skips the optimizer; eval and predict
    skip both (their weights come from --checkpoint, and accelerate places the model).

    `accelerator` None builds on the CPU of this one process (check, summary)."""
    data = load_data_once(accelerator, recipe)
    head = make_head(recipe)
    world = accelerator.num_processes if accelerator is not None else 1
    local = None  # fsdp: this rank's shards of a model built on the meta device
    if optimizer and meta.wanted(recipe, world):
        model, local = meta.build_local_net(recipe, data, head, accelerator.process_index, world)
    else:
        model = build_net(recipe, data, head)
    notes: list[str] = []
    if finetune:
        from dist_train.model.finetune import prepare_finetune

        main = accelerator is None or accelerator.is_main_process
        notes = prepare_finetune(model, recipe.finetune, main)  # before wrapping: freeze holds
    if not optimizer:
        return Components(data, head, model, notes)
    from dist_train.training.distributed import configure_ddp, place_model

    if recipe.train.activation_checkpointing:  # after freezing; names unchanged
        from dist_train.model.blocks import apply_activation_checkpointing

        apply_activation_checkpointing(model, recipe.train.fsdp.wrap)
    fsdp = recipe.train.strategy == "fsdp"
    if accelerator is not None and accelerator.num_processes > 1 and not fsdp:
        configure_ddp(accelerator, model, data.train.x[:2], data.train.y[:2], head)
    if accelerator is not None:
        # On a GPU the model moves before the optimizer is built (fused optimizer kernels need
        # the parameters' device); `train.compile` compiles it in place (clean state dicts).
        # A meta model is placed by materialize, shard by shard (here only compiled).
        device = accelerator.device if local is None else torch.device("cpu")
        model = place_model(model, device, recipe.train.compile)
        if fsdp:  # sharded before the optimizer exists: it holds this rank's shards only
            from dist_train.training.fsdp import shard_model

            model = shard_model(model, recipe.train, accelerator.device)
        if local is not None:
            meta.materialize(model, local, accelerator.device)
    opt = build_optimizer(model, recipe.optimizer)
    n_train = len(data.train.y)
    total = total_steps(recipe, n_train)
    if total == 0:
        raise UserError(
            f"train.batch_size {recipe.train.batch_size} is larger than the "
            f"{n_train} training rows; lower it."
        )
    scheduler = build_scheduler(opt, recipe.scheduler, total, recipe.optimizer.lr)
    per_epoch = steps_per_epoch(n_train, recipe.train.batch_size)
    return Components(data, head, model, notes, opt, scheduler, total, per_epoch)


def load_data_once(accelerator: Accelerator | None, recipe: Recipe) -> DataBundle:
    """Rank 0 loads first (the datasets cache is written once, then reused). A data error is
    held until everyone has left the barrier, then raised on every rank alike: otherwise rank 0
    would exit mid-barrier and the others would die with a gloo traceback."""
    if accelerator is None:
        return build_data(recipe)
    data, error = None, None
    with accelerator.main_process_first():  # collective barrier on entry and exit
        try:
            data = build_data(recipe)
        except UserError as err:
            error = err
    if error is not None:
        raise error
    return data


def make_head(recipe: Recipe) -> Head:
    return Head(
        recipe.data.task, recipe.loss.name, recipe.loss.label_smoothing, recipe.loss.pos_weight
    )


def build_data(recipe: Recipe) -> DataBundle:
    return load_data(recipe.data, recipe.seed)


def build_net(recipe: Recipe, data: DataBundle, head: Head) -> Net:
    """Seeded construction: every rank (and every rerun) starts from the same weights."""
    out = head.out_features or data.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = build_model(
            recipe.model.layers,
            recipe.model.module,
            recipe.model.init,
            data.input_shape,
            out,
            data.norm,
        )
    _check_output(net, data.input_shape, out, recipe)
    return net


def _check_output(net: Net, input_shape: tuple[int, ...], out: int, recipe: Recipe) -> None:
    """The model must emit one score per class (or 1): caught here, not at the first eval."""
    was_training = net.training
    net.eval()
    device = next(net.parameters(), torch.empty(0)).device  # meta (model/meta.py) or cpu
    with torch.no_grad():
        got = tuple(net(torch.zeros(2, *input_shape, device=device)).shape[1:])
    net.train(was_training)
    if got != (out,):
        need = f"{out} ({recipe.data.task}, loss {recipe.loss.name})"
        raise UserError(
            f"model: the last layer outputs shape {list(got)} per row but the task "
            f"needs {need}; end model.layers with `- linear: out` (plus sigmoid "
            "for loss bce)."
        )


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the partial last batch is dropped so every step sees exactly
    `batch_size` samples on any world size (what makes 1 and N processes agree)."""
    return n_train // batch_size


def total_steps(recipe: Recipe, n_train: int) -> int:
    per_epoch = steps_per_epoch(n_train, recipe.train.batch_size)
    total = per_epoch * recipe.train.epochs
    return min(total, recipe.train.max_steps) if recipe.train.max_steps else total


def build_optimizer(model: Net, cfg) -> torch.optim.Optimizer:
    from dist_train.training.optim import build_optimizer as _make

    return _make(model, cfg)


def build_scheduler(optimizer, cfg, total: int, peak_lr: float) -> Schedule:
    from dist_train.training.optim import build_scheduler as _make

    return _make(optimizer, cfg, total, peak_lr)
