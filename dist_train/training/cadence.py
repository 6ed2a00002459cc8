"""When validation runs: every `train.eval_every_steps` optimizer steps, at the end of every
`train.eval_every_epochs`-th epoch, and when training ends early or reaches its last step.

Steps are counted over the run (as HF's `eval_steps`), so a cadence that does not divide the
epoch drifts across epoch boundaries. A step-based cadence replaces the per-epoch one unless
the recipe gives both (config/schema.py sets `eval_every_epochs` to 0 then). Each evaluation
counts once, whichever rule asked for it: early-stopping and plateau patience and the best
checkpoint see one evaluation per step at most (`TrainState.last_eval_step`, kept in the
checkpoint, so a resume does not repeat the evaluation of the step it resumes at).
"""

from __future__ import annotations

from dist_train.config.schema import TrainConfig


def due_after_step(t: TrainConfig, step: int) -> bool:
    """After optimizer step `step` (counted from 1 over the run)."""
    return bool(t.eval_every_steps) and step % t.eval_every_steps == 0


def due_after_epoch(t: TrainConfig, epoch: int, stopping: bool) -> bool:
    """After the loop over 0-based `epoch` ended (complete, or `stopping` early/at the end)."""
    return stopping or (bool(t.eval_every_epochs) and (epoch + 1) % t.eval_every_epochs == 0)
