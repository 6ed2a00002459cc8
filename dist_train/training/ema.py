"""Weight averaging: an exponential moving average (`train.ema`) or the stochastic weight
average (`train.swa`) of the model's weights, evaluated and exported in place of the raw ones.

The averaged copy is a deep copy of the unwrapped module (no DDP), updated after optimizer steps
with torch's own averaging kernels (`torch.optim.swa_utils.get_ema_multi_avg_fn` /
`get_swa_multi_avg_fn`: the foreach lerp `AveragedModel` runs). It differs from `AveragedModel`
in two ways: the number of averaged snapshots is a host integer (AveragedModel reads its device
counter twice per update, a GPU sync every step), and integer buffers (batch norm's
`num_batches_tracked`) are copied rather than averaged into a truncated float. Floating-point
buffers (batch-norm running statistics) are averaged like parameters, as `AveragedModel(...,
use_buffers=True)` does, so the average needs no extra pass over the data.

Under DDP the parameters are identical on every rank after each step, so every rank's average
is identical too, with no communication. Batch-norm statistics are not: each rank updates them
with its own micro-batch, and DDP makes rank 0's the model's at the next forward. Rank 0's
average is therefore the one checkpointed and exported, and the other ranks take its buffers
(one broadcast, only for models with floating-point buffers) before every evaluation.

Checkpoints keep the raw weights (accelerate's `model.safetensors`) and the average in
`averaged.safetensors` (the bare module's keys, so `dist-train eval --checkpoint` loads it;
the kind and the number of snapshots averaged are in its metadata).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from dist_train.config.schema import TrainConfig
from dist_train.errors import UserError

AVERAGED_FILE = "averaged.safetensors"


class WeightAverage:
    """The averaged copy of `net` and when to update it (every rank holds one)."""

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        *,
        decay: float = 0.999,
        every_steps: int | None = 1,
        start_epoch: int = 1,
    ) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_multi_avg_fn

        self.kind, self.decay = kind, decay
        self.every_steps, self.start_epoch = every_steps, start_epoch
        self.module = copy.deepcopy(net)
        if getattr(self.module, "_compiled_call_impl", None) is not None:
            # Module.compile() compiled the original's bound __call__: the copy would run the
            # raw weights. The average is evaluated eagerly instead.
            self.module._compiled_call_impl = None
        self.module.requires_grad_(False)
        self.count = 0  # snapshots averaged so far (0: nothing yet, the raw weights are used)
        self._avg_fn = get_ema_multi_avg_fn(decay) if kind == "ema" else get_swa_multi_avg_fn()
        mine = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        theirs = dict(net.named_parameters()) | dict(net.named_buffers())
        self._floats: dict[tuple, tuple[list, list]] = {}  # (device, dtype) -> (avg, src)
        self._others: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, avg in mine.items():
            src = theirs[name]
            if avg.is_floating_point():
                lists = self._floats.setdefault((avg.device, avg.dtype), ([], []))
                lists[0].append(avg.detach()), lists[1].append(src.detach())
            else:
                self._others.append((avg.detach(), src.detach()))
        self._float_buffers = [b for b in self.module.buffers() if b.is_floating_point()]

    @classmethod
    def from_recipe(cls, t: TrainConfig, net: nn.Module) -> WeightAverage | None:
        if t.ema is not None:
            return cls(net, "ema", decay=t.ema.decay, every_steps=t.ema.every_steps)
        if t.swa is not None:
            return cls(net, "swa", every_steps=t.swa.every_steps, start_epoch=t.swa.start_epoch)
        return None

    def describe(self) -> str:
        if self.kind == "ema":
            return (
                f"weights: exponential moving average (decay {self.decay}, every "
                f"{self.every_steps} step(s)) evaluated and exported; checkpoints keep both"
            )
        when = f"every {self.every_steps} step(s)" if self.every_steps else "at each epoch end"
        return (
            f"weights: stochastic weight average from epoch {self.start_epoch}, {when}, "
            "evaluated and exported once it exists; checkpoints keep both"
        )

    def due_after_step(self, step: int, epoch: int) -> bool:
        """After optimizer step `step` (1-based, counted over the run) of 0-based `epoch`."""
        if self.every_steps is None or epoch + 1 < self.start_epoch:
            return False
        return step % self.every_steps == 0

    def due_at_epoch_end(self, epoch: int) -> bool:
        return self.every_steps is None and epoch + 1 >= self.start_epoch

    @property
    def weights(self) -> str:
        """Which weights evaluation and export use now: `ema`/`swa`, or `raw` before the first
        update."""
        return self.kind if self.count else "raw"

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average (no device read, no collective)."""
        if self.count == 0:
            for avg, src in self._pairs():
                avg.copy_(src)
        else:
            for avg, src in self._floats.values():
                self._avg_fn(avg, src, self.count)
            for avg, src in self._others:
                avg.copy_(src)
        self.count += 1

    def _pairs(self):
        for avg, src in self._floats.values():
            yield from zip(avg, src, strict=True)
        yield from self._others

    def sync_buffers(self, accelerator) -> None:
        """Collective (every rank, before an evaluation): rank 0's averaged batch-norm
        statistics on every rank, so the ranks evaluate one model (see the module docstring)."""
        if accelerator.num_processes == 1 or not self._float_buffers or not self.count:
            return
        import torch.distributed as dist

        for buf in self._float_buffers:
            dist.broadcast(buf, src=0)

    def write(self, directory: Path) -> None:
        """The average into a checkpoint directory (main process, inside the atomic save)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        meta = {"kind": self.kind, "count": str(self.count)}
        save_file(tensors, str(directory / AVERAGED_FILE), metadata=meta)

    def load(self, checkpoint: Path) -> str | None:
        """Restore the average saved with a checkpoint (every rank reads the same file).
        Returns a notice when the checkpoint has no average of this kind (it was written
        without one, e.g. before `--allow-changed` added it): the average starts afresh."""
        path = checkpoint / AVERAGED_FILE
        if not path.is_file():
            return f"note: {checkpoint} holds no averaged weights; the {self.kind} starts now"
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("kind") != self.kind:
            return (
                f"note: {path} was written for train.{meta.get('kind')}, the recipe asks for "
                f"train.{self.kind}; the {self.kind} starts now"
            )
        try:
            self.module.load_state_dict(load_file(str(path)))
            self.count = int(meta["count"])
        except Exception as err:  # a torn or edited file: say which, never a traceback
            raise UserError(
                f"checkpoint {checkpoint}: {AVERAGED_FILE} cannot be loaded "
                f"({str(err).splitlines()[0][:160]}). Delete this checkpoint directory to "
                "resume from the previous one, or pass --restart."
            ) from None
        return None
