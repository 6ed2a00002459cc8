"""Mixup and CutMix on whole training batches, with soft targets, world-size invariant.

Partners: in epoch e, training row r is mixed with row `perm_e[r]` (a permutation of the
training split drawn from (seed, epoch)), with its own lambda ~ Beta(alpha, alpha), its own
CutMix box and its own apply / mixup-or-cutmix draws. All of them are looked up by the row's
id in per-epoch tables, so a row's mixed input and soft target depend only on (seed, epoch,
row): 1 process, N processes and any `train.grad_accum` split see the same mixed global batch
(same weights within 1e-5), and a resume needs no random state. The textbook version (mix with
a shuffled copy of the batch) cannot give that here: the global batch is split over processes
and accumulation micro-batches, so in-batch partners would change with the world size, and
trading rows between ranks would cost an all-gather of inputs per step and still not reach a
later micro-batch. The partner is instead fetched from the training rows by one indexing op
(on the device when the rows live there); lazy rows bring their partners with the batch, read
in the DataLoader worker with the batch itself (data/rows.py `LazyRows.fetch_partners`). It is
a uniformly random training row, as in the shuffled-batch version, just not restricted to the
same batch.

All of it is batched tensor arithmetic; the tables cost O(rows) once per epoch.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.data.images import unit_float
from dist_train.errors import UserError

if TYPE_CHECKING:
    from dist_train.config.schema import AugmentConfig, Recipe
    from dist_train.data.loaders import TensorRows

_TAG = 0x6D6978  # "mix": this module's stream, apart from any other seeded by (seed, epoch)


def mixing(cfg: AugmentConfig | None) -> bool:
    return cfg is not None and (cfg.mixup > 0 or cfg.cutmix > 0)


def check_mixing(recipe: Recipe, input_shape: tuple[int, ...]) -> None:
    """Mixing needs class targets, CutMix an image [C, H, W]: exit 2 before anything runs."""
    cfg = recipe.data.augment
    if not mixing(cfg):
        return
    key = "data.augment.mixup" if cfg.mixup > 0 else "data.augment.cutmix"
    if recipe.data.task == "regression":
        raise UserError(
            f"{key}: mixup/cutmix mix class targets into soft labels, but data.task is "
            "regression; remove the key (or set it to 0)."
        )
    if cfg.cutmix > 0 and len(input_shape) != 3:
        raise UserError(
            f"data.augment.cutmix: cuts a box out of images of shape [C, H, W], but each row "
            f"here is {list(input_shape)}; set data.shape (e.g. [1, 8, 8]) for image rows, or "
            "use data.augment.mixup for tables."
        )


def make_mixer(recipe: Recipe, rows: TensorRows, num_classes: int) -> Mixer | None:
    """The mixer of the training rows; lazy rows (data/rows.py `LazyRows`) are set to fetch
    each row's partner with the batch, in the DataLoader worker."""
    cfg = recipe.data.augment
    if not mixing(cfg):
        return None  # alpha 0: nothing drawn, nothing changed (bitwise the unmixed run)
    soft_classes = num_classes if recipe.loss.name == "cross_entropy" else 0
    if hasattr(rows, "fetch_partners"):
        seed, n = recipe.seed, len(rows)
        rows.fetch_partners(functools.partial(partner_order, seed, n=n))
    return Mixer(cfg, recipe.seed, rows, soft_classes)


def partner_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Each training row's mixing partner in `epoch`: the first draw of `epoch_draws`."""
    return _generator(seed, epoch).permutation(n)


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, epoch, _TAG])


class Mixer:
    """`mixer(x, y, idx, epoch) -> (mixed x, soft targets)` for one training micro-batch."""

    def __init__(self, cfg: AugmentConfig, seed: int, rows: TensorRows, classes: int) -> None:
        self.cfg, self.seed, self.rows = cfg, seed, rows
        self.classes = classes  # cross_entropy: one-hot width; 0: targets mixed as numbers
        self._epoch: int | None = None
        self._tables: dict[str, torch.Tensor] = {}
        self._fetch_checked: int | None = None  # the epoch whose fetched partners were checked

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int, fetched=()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fetched`: (partner row indices, their features, their targets) when the batch
        brought them (lazy rows, fetched in the worker); else they are looked up here."""
        t = self.tables(epoch, idx.device)
        partner, lam, cut = t["partner"][idx], t["lam"][idx], t["cut"][idx]
        if fetched:
            ids, xp, yp = fetched
            # The worker drew them from the epoch the trainer set: a mismatch would silently
            # mix the wrong rows, so it is checked. Once per epoch (the first batch): a wrong
            # epoch is wrong for every batch of it, and `torch.equal` on an accelerator waits
            # for the device, which a check on every step would add to the loop.
            if self._fetch_checked != epoch:
                if not torch.equal(ids.to(partner.device), partner):
                    raise RuntimeError(f"mixup partners fetched for another epoch than {epoch}")
                self._fetch_checked = epoch
            xp = unit_float(xp.to(x.device, non_blocking=True))
            yp = yp.to(y.device)
        else:
            xp, yp = self._partner_rows(partner, x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        weight = lam.to(x.device, x.dtype).view(view)  # the row's own share; 1: left unmixed
        if self.cfg.cutmix > 0:
            h, w = x.shape[-2:]
            ys = torch.arange(h, device=x.device).view(1, h, 1)
            xs = torch.arange(w, device=x.device).view(1, 1, w)
            box = [t[k][idx].to(x.device).view(-1, 1, 1) for k in ("y0", "y1", "x0", "x1")]
            inside = (ys >= box[0]) & (ys < box[1]) & (xs >= box[2]) & (xs < box[3])
            keep = (~inside).unsqueeze(1).to(x.dtype)  # [N, 1, H, W]: 1 = the row's own pixel
            weight = torch.where(cut.to(x.device).view(view), keep, weight)
        mixed = x * weight + xp * (1 - weight)
        return mixed, self._targets(y, yp, lam.to(y.device))

    def _targets(self, y: torch.Tensor, yp: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Class probabilities for cross_entropy (its label smoothing then applies on top, as
        torch defines it for probability targets); mixed 0/1 (or multi-hot) numbers else."""
        if self.classes:
            a, b = F.one_hot(y, self.classes).float(), F.one_hot(yp, self.classes).float()
        else:
            a, b = y.float(), yp.float()
        lam = lam.view((-1,) + (1,) * (a.dim() - 1))
        return a * lam + b * (1 - lam)

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's batches are drawn: lazy rows fetch this epoch's partners."""
        if hasattr(self.rows, "set_epoch"):
            self.rows.set_epoch(epoch)

    def _partner_rows(self, partner: torch.Tensor, device: torch.device):
        src = self.rows
        if not hasattr(src, "x"):  # lazy rows bring their partners with the batch
            raise RuntimeError("a lazy batch without its mixing partners (make_mixer arms it)")
        if partner.device != src.x.device:  # rows kept on the host, batch on an accelerator
            partner = partner.to(src.x.device)
        # uint8 image rows: the same [0, 1] floats as the batch they are mixed into
        return unit_float(src.x[partner].to(device, non_blocking=True)), src.y[partner].to(device)

    def tables(self, epoch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-row draws of one epoch, from (seed, epoch) only; rebuilt when the epoch changes."""
        if self._epoch != epoch or next(iter(self._tables.values())).device != device:
            shape = tuple(self.rows[0][0].shape)
            draws = epoch_draws(self.cfg, self.seed, epoch, len(self.rows), shape)
            self._tables = {k: torch.from_numpy(v).to(device) for k, v in draws.items()}
            self._epoch = epoch
        return self._tables


def epoch_draws(
    cfg: AugmentConfig, seed: int, epoch: int, n: int, shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """partner, lam (the row's own share: 1 where not mixed), cut (CutMix rather than mixup)
    and the CutMix box [y0, y1) x [x0, x1) of every training row in `epoch`."""
    rng = _generator(seed, epoch)
    partner = rng.permutation(n)  # partner_order's draw
    applied = rng.random(n) < cfg.mix_prob
    if cfg.mixup > 0 and cfg.cutmix > 0:
        cut = rng.random(n) < cfg.switch_prob
    else:
        cut = np.full(n, cfg.cutmix > 0)
    lam = rng.beta(cfg.mixup, cfg.mixup, n) if cfg.mixup > 0 else np.ones(n)
    out = {"partner": partner}
    if cfg.cutmix > 0:
        h, w = shape[-2:]
        lam_cut = rng.beta(cfg.cutmix, cfg.cutmix, n)
        # A box of area (1 - lam) around a uniform centre, clipped to the image (as in the
        # CutMix paper); lam is then recomputed from the clipped area: the pixels' true share.
        ratio = np.sqrt(1.0 - lam_cut)
        ch, cw = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
        cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        area = (y1 - y0) * (x1 - x0)
        out |= {"y0": y0, "y1": y1, "x0": x0, "x1": x1}
        lam = np.where(cut, 1.0 - area / (h * w), lam)
    out["lam"] = np.where(applied, lam, 1.0).astype(np.float32)
    out["cut"] = cut & applied
    return out
