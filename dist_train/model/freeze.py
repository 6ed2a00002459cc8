"""Freezing: which parameters train at each epoch, batch-norm statistics frozen with them.

A glob matches a parameter by its name (`layers.0.weight`) or by the name of any module that
holds it (`layers.0`, `bert.encoder`). A parameter is frozen at epoch e when a `freeze` glob
(or the deprecated `finetune.freeze`) matches it, no `unfreeze` glob does, and no schedule step
of epoch <= e does. A batch-norm layer whose parameters are all frozen stays in eval mode, so
its running statistics never change (a parameterless one follows the globs by its own name).

Static freezing (no schedule) is applied before the optimizer and DDP exist: frozen tensors are
never registered with either, exactly as before. With a schedule, DDP and the optimizer are
built with the FINAL trainable set (everything a step will unfreeze has requires_grad on while
they are built); then `apply(model, epoch)` switches requires_grad per epoch. Why this rather
than rebuilding DDP and the optimizer at the switch:
- The optimizer owns every parameter from step 0; a frozen one has no gradient, so torch's
  optimizers skip it (no update, no weight decay, no state) until it is unfrozen. Its
  param_groups never change, so a checkpoint from before or after the switch loads into the
  same optimizer and resume needs nothing special.
- DDP registers its gradient hooks at construction, so it is built with the final set and
  `find_unused_parameters=True`: the frozen ones are reported unused (globally unused
  parameters keep grad None), with no "Expected to have finished reduction" error, and the
  bucket layout is fixed at construction (DDP never rebuilds buckets in this mode), so a
  resumed run all-reduces in the same layout as the uninterrupted one.
- `apply` derives the state from the epoch alone (not from what happened before), so a run
  resumed on either side of a switch sets exactly what the uninterrupted run had.
The cost is DDP's unused-parameter search each step (one autograd-graph walk) in scheduled
runs only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from dist_train.config.schema import Recipe
from dist_train.errors import UserError

NEVER = 1 << 30  # the epoch of "the whole run": after every schedule step


def matches(name: str, pattern: str) -> bool:
    """`pattern` matches the parameter/buffer `name` or any module prefix of it."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


def _any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


class Freezing:
    """The freeze plan of one recipe over one model; checked against its names when built."""

    def __init__(self, recipe: Recipe, model: nn.Module) -> None:
        self.freeze: list[tuple[str, str]] = []  # (glob, recipe key)
        if recipe.freeze is not None:
            self.freeze += [(p, "freeze") for p in recipe.freeze.params]
        if recipe.finetune is not None:  # deprecated alias, same mechanism
            self.freeze += [(p, "finetune.freeze") for p in recipe.finetune.freeze]
        self.unfreeze = list(recipe.unfreeze or [])
        self.steps = recipe.freeze.steps() if recipe.freeze is not None else []
        self.names = [n for n, _ in model.named_parameters()]
        self._check()

    @property
    def active(self) -> bool:
        return bool(self.freeze)

    @property
    def scheduled(self) -> bool:
        return bool(self.steps)

    def frozen(self, name: str, epoch: int) -> bool:
        if not _any(name, (p for p, _ in self.freeze)) or _any(name, self.unfreeze):
            return False
        return not any(e <= epoch and _any(name, globs) for e, globs, _ in self.steps)

    def _check(self) -> None:
        """Every glob must do something: a typo would otherwise silently train everything."""
        example = f"names look like {self.names[:4]}"
        for pattern, key in self.freeze:
            if not _any_name(self.names, pattern):
                raise UserError(f"{key} {pattern!r}: matches no parameter; {example}.")
        for pattern in self.unfreeze:
            frozen = [n for n in self.names if _any(n, (p for p, _ in self.freeze))]
            if not _any_name(frozen, pattern):
                raise UserError(
                    f"unfreeze {pattern!r}: matches no frozen parameter (frozen: "
                    f"{frozen[:4]}); it lists exceptions to freeze."
                )
        for epoch, globs, key in self.steps:
            before = [n for n in self.names if self.frozen(n, epoch - 1)]
            for pattern in globs:
                if not _any_name(before, pattern):
                    raise UserError(
                        f"{key} {pattern!r}: matches no parameter still frozen at epoch "
                        f"{epoch} (frozen then: {before[:4]}); fix the glob or the order."
                    )
        if self.freeze and all(self.frozen(n, 0) for n in self.names):
            raise UserError(
                "freeze: every parameter is frozen at epoch 0, so nothing would train; keep "
                "some trainable with `unfreeze` (e.g. the head)."
            )

    def apply(self, model: nn.Module, epoch: int = 0) -> list[str]:
        """requires_grad and batch-norm mode as they are at `epoch` (NEVER: the final set);
        returns the names that became trainable (empty when nothing changed)."""
        opened = []
        for name, p in model.named_parameters():
            want = not self.frozen(name, epoch)
            if want and not p.requires_grad:
                opened.append(name)
            p.requires_grad_(want)
        for mod_name, mod in model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                self._set_bn(mod_name, mod, epoch, model.training)
        return opened

    def _set_bn(self, mod_name: str, mod: nn.Module, epoch: int, training: bool) -> None:
        params = list(mod.parameters())
        if params:
            frozen = all(not p.requires_grad for p in params)
        else:
            frozen = self.frozen(f"{mod_name}.running_mean", epoch)
        base = getattr(type(mod), "_unfrozen_class", type(mod))
        if frozen and not hasattr(type(mod), "_unfrozen_class"):
            mod.__class__ = _frozen_class(base)
            mod.eval()
        elif not frozen and hasattr(type(mod), "_unfrozen_class"):
            mod.__class__ = base
            mod.train(training)  # back to the model's mode

    @staticmethod
    def tell_ddp(accelerator) -> None:
        """DDP with the final set must expect the still-frozen parameters to get no gradient."""
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)

    def describe(self, model: nn.Module) -> list[str]:
        """Notes for the plan and `summary`: what is frozen, and what each step unfreezes."""
        if not self.active:
            return []
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        frozen0 = [n for n in self.names if self.frozen(n, 0)]
        lines = [f"freeze: {sum(sizes[n] for n in frozen0):,} parameters frozen at epoch 0"]
        if any(key == "finetune.freeze" for _, key in self.freeze):
            lines.append("  (finetune.freeze is deprecated: write the top-level `freeze:`)")
        for epoch, globs, _ in self.steps:
            opened = [
                n for n in self.names if self.frozen(n, epoch - 1) and not self.frozen(n, epoch)
            ]
            lines.append(
                f"  after {epoch} epoch{'s' if epoch > 1 else ''}: unfreezes {', '.join(globs)} "
                f"({sum(sizes[n] for n in opened):,} parameters)"
            )
        return lines


def _any_name(names: list[str], pattern: str) -> bool:
    return any(matches(n, pattern) for n in names)


_FROZEN: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """A subclass whose train() always means eval(): running stats never update. It keeps the
    original class (`_unfrozen_class`) so an unfreezing step can put it back."""
    if cls not in _FROZEN:

        def train(self, mode: bool = True):
            return super(_FROZEN[cls], self).train(False)

        _FROZEN[cls] = type(
            f"Frozen{cls.__name__}", (cls,), {"train": train, "_unfrozen_class": cls}
        )
    return _FROZEN[cls]


def build_freezing(recipe: Recipe, model: nn.Module) -> Freezing | None:
    plan = Freezing(recipe, model)
    return plan if plan.active else None


def group_rows(model: nn.Module) -> list[tuple[str, int, int]]:
    """(group, trainable, frozen) for any model: the groups are the children of the first
    module below the root that holds parameters in more than one child (wrappers with a single
    such child, like our Net around a layer list or a transformers model, are looked through),
    so a layer list shows `layers.0`, `layers.3`, ... and a BERT classifier `...bert`,
    `...classifier`."""
    prefix, mod = "", model
    while not any(True for _ in mod.parameters(recurse=False)):
        kids = [(n, m) for n, m in mod.named_children() if any(True for _ in m.parameters())]
        if len(kids) != 1:
            break
        name, mod = kids[0]
        prefix += f"{name}."
    rows = []
    own = list(mod.parameters(recurse=False))
    parts = [(prefix.rstrip(".") or "(model)", own)] if own else []
    parts += [(prefix + n, list(m.parameters())) for n, m in mod.named_children()]
    for group, params in parts:
        if params:
            trainable = sum(p.numel() for p in params if p.requires_grad)
            rows.append((group, trainable, sum(p.numel() for p in params) - trainable))
    return rows


def format_groups(model: nn.Module) -> str:
    rows = group_rows(model)
    head = ("group", "trainable", "frozen")
    table = [head] + [(g, f"{t:,}", f"{f:,}") for g, t, f in rows]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    lines = [
        "  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2])])
        for r in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
