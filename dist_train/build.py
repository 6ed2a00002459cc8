"""The only place config meets constructors: data, model, loss head, optimizer, schedule.

`build_components` is the one build sequence; train, eval, predict, check and summary all call
it, so what `check` accepts is what `train` builds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dist_train.config.schema import Recipe
from dist_train.config.tasks import check_against_data
from dist_train.data.sources import DataBundle, load_data
from dist_train.errors import UserError
from dist_train.model import meta
from dist_train.model.head import Head
from dist_train.model.net import Net, build_model

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dist_train.model.finetune import LoadReport
    from dist_train.model.freeze import Freezing
    from dist_train.training.optim import Schedule


@dataclass
class Supplied:
    """Python objects `dist_train.fit` passes instead of the recipe's model/data sections."""

    model: torch.nn.Module | None = None
    train_data: Any = None  # a torch map-style Dataset of (x, y), or a datasets.Dataset
    valid_data: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> torchmetrics.Metric


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
    load_report: LoadReport | None = None  # finetune.from: what loaded (run dir's load_report.json)
    freezing: Freezing | None = None  # with a schedule the trainer applies each epoch's state


def build_components(
    recipe: Recipe,
    accelerator: Accelerator | None = None,
    *,
    finetune: bool = True,
    optimizer: bool = True,
    supplied: Supplied | None = None,
) -> Components:
    """data (rank 0 first) -> head -> model (seeded) -> [`finetune`: pretrained weights and
    freezing] -> [`optimizer`: DDP's unused-parameter probe -> device placement -> optimizer ->
    schedule]. train and check build everything; summary skips the optimizer; eval and predict
    skip both (their weights come from --checkpoint, and accelerate places the model).

    `accelerator` None builds on the CPU of this one process (check, summary). `supplied`:
    dist_train.fit's model/data/metrics objects in place of the recipe's sections."""
    supplied = supplied or Supplied()
    data = load_data_once(accelerator, recipe, supplied)
    check_against_data(recipe, data.num_classes)  # e.g. accuracy@k needs k < the classes
    head, notes = make_head(recipe, data)
    world = accelerator.num_processes if accelerator is not None else 1
    local = None  # fsdp: this rank's shards of a model built on the meta device
    if supplied.model is not None:
        model = supplied_model(supplied.model, recipe, data, head)
    elif optimizer and meta.wanted(recipe, world):
        model, local = meta.build_local_net(recipe, data, head, accelerator.process_index, world)
    else:
        model = build_net(recipe, data, head, accelerator, notes)
    report = freezing = None
    if finetune:
        from dist_train.model.finetune import prepare_finetune
        from dist_train.model.freeze import NEVER, build_freezing

        report = prepare_finetune(model, recipe.finetune)  # after model.init: loaded tensors win
        freezing = build_freezing(recipe, model)
        if freezing is not None:
            # Before wrapping. A schedule's final trainable set while DDP and the optimizer are
            # built (model/freeze.py says why); the trainer then applies each epoch's state.
            freezing.apply(model, NEVER if freezing.scheduled and optimizer else 0)
            notes += freezing.describe(model)
        notes = (report.table() if report is not None else []) + notes
    if not optimizer:
        return Components(data, head, model, notes, load_report=report, freezing=freezing)
    from dist_train.data.mix import check_mixing

    check_mixing(recipe, data.input_shape)  # train/check/lr-find: mixup needs class targets
    from dist_train.training.distributed import configure_ddp, place_model

    if recipe.train.activation_checkpointing:  # after freezing; names unchanged
        from dist_train.model.blocks import apply_activation_checkpointing

        apply_activation_checkpointing(model, recipe.train.fsdp.wrap)
    fsdp = recipe.train.strategy == "fsdp"
    if accelerator is not None and accelerator.num_processes > 1 and not fsdp:
        configure_ddp(accelerator, model, data.train.head(2), data.train.y[:2], head)
        if freezing is not None and freezing.scheduled:
            freezing.tell_ddp(accelerator)
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
    if freezing is not None and freezing.scheduled and accelerator is None:
        freezing.apply(model, 0)  # check: show the state training starts in
    return Components(data, head, model, notes, opt, scheduler, total, per_epoch, report, freezing)


def load_data_once(
    accelerator: Accelerator | None, recipe: Recipe, supplied: Supplied | None = None
) -> DataBundle:
    """Rank 0 loads first (the datasets cache is written once, then reused). A data error is
    held until everyone has left the barrier, then raised on every rank alike: otherwise rank 0
    would exit mid-barrier and the others would die with a gloo traceback."""
    if supplied is not None and supplied.train_data is not None:
        from dist_train.data.python import load_python_data

        # In memory already, on every rank alike: nothing is cached, so no rank goes first.
        return load_python_data(recipe.data, recipe.seed, supplied.train_data, supplied.valid_data)
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


def make_head(recipe: Recipe, data: DataBundle) -> tuple[Head, list[str]]:
    """The head, with `balanced` loss weights computed from the training split (the same on
    every rank: every rank holds the whole split), and notes saying which weights it uses."""
    from dist_train.data.balance import loss_weights, sampler_note

    loss, task = recipe.loss, recipe.data.task
    cw, pw, notes = loss_weights(loss, task, data.train.y, data.num_classes)
    if recipe.data.sampler == "balanced":
        notes.append(sampler_note(data.train.y))
    return Head(task, loss.name, loss.label_smoothing, pw, cw), notes


def build_data(recipe: Recipe) -> DataBundle:
    return load_data(data_config(recipe), recipe.seed)


def data_config(recipe: Recipe):
    """`recipe.data` with the tokenizer resolved (data.text: default model.hf.pretrained)."""
    cfg = recipe.data
    hf = recipe.model.hf if recipe.model is not None else None  # fit(model=...): no section
    if cfg.text is not None and cfg.tokenizer is None and hf is not None:
        return cfg.model_copy(update={"tokenizer": hf.pretrained})
    return cfg


def build_net(
    recipe: Recipe,
    data: DataBundle,
    head: Head,
    accelerator: Accelerator | None = None,
    notes: list[str] | None = None,
) -> Net:
    """Seeded construction: every rank (and every rerun) starts from the same weights."""
    out = head.out_features or data.num_classes
    m = recipe.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        if m.factory is not None or m.hf is not None or (m.module and m.layers):
            from dist_train.model.backbone import build_backbone_net

            net, said = build_backbone_net(m, data, out, accelerator)
            (notes if notes is not None else []).extend(said)
        else:
            net = build_model(m.layers, m.module, m.init, data.input_shape, out, data.norm)
    check_output(net, data.input_shape, out, recipe, data.train.dtype)
    return net


def supplied_model(
    model: torch.nn.Module, recipe: Recipe, data: DataBundle, head: Head
) -> torch.nn.Module:
    """A copy of fit()'s model (the caller's object never changes, so a second fit() starts
    from the same weights); the data statistics of data.standardize have no place in it. A
    model whose output is not a tensor (a transformers ModelOutput, a dict, a tuple) is
    wrapped so that its logits come out (model/backbone.py's one rule); its parameter names
    then read `backbone.<its own names>`, as for model.factory."""
    if data.norm is not None:
        raise UserError(
            "data.standardize: fit(model=...) trains your module as given, which cannot hold "
            "the train-split statistics; standardise in your Dataset or model, or drop it."
        )
    model = copy.deepcopy(model).cpu().train()
    with torch.no_grad():
        probe = model.eval()(torch.zeros(2, *data.input_shape))
    model.train()
    if not isinstance(probe, torch.Tensor):
        model = Net(torch.nn.Identity(), backbone=model, where="fit(model=...)")
    check_output(model, data.input_shape, head.out_features or data.num_classes, recipe)
    return model


def check_output(
    net: Net, input_shape: tuple[int, ...], out: int, recipe: Recipe, dtype=torch.float32
) -> None:
    """The model must emit one score per class (or 1): caught here, not at the first eval."""
    was_training = net.training
    net.eval()
    device = next(net.parameters(), torch.empty(0)).device  # meta (model/meta.py) or cpu
    with torch.no_grad():
        got = tuple(net(torch.zeros(2, *input_shape, dtype=dtype, device=device)).shape[1:])
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
