"""Run output: metrics.jsonl (always), console lines / progress bar, wandb, tensorboard.

Only the main process touches files, the console or trackers; every other rank gets a
`RunLog` whose methods do nothing, so no caller needs an `if is_main` of its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .config import TrackingConfig


class RunLog:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, tracking: TrackingConfig,
                 recipe: dict, run_id: str | None = None) -> None:
        self.active, self.run_dir, self.total = is_main, run_dir, total_steps
        self.run_id = run_id
        self._fh = None
        self._bar = None
        self._last_line = self._start = time.monotonic()
        self._trackers: list = []
        if not is_main:
            return
        self._fh = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: tail -f
        self.tty = sys.stderr.isatty()
        self._trackers = _open_trackers(run_dir, tracking, recipe, run_id)
        if self._trackers and hasattr(self._trackers[0], "run_id"):
            self.run_id = self._trackers[0].run_id

    def info(self, message: str) -> None:
        if self.active:
            (self._bar.write if self._bar else print)(message, flush=True)

    def event(self, kind: str, **fields) -> None:
        if not self.active:
            return
        record = {"event": kind, **fields, "time": round(time.monotonic() - self._start, 3)}
        self._fh.write(json.dumps(record, default=float) + "\n")
        scalars = {k: v for k, v in fields.items() if isinstance(v, (int, float))
                   and k not in ("step", "epoch")}
        for tracker in self._trackers:
            tracker.log(scalars, fields.get("step", 0))

    def start_epoch(self, epoch: int, epochs: int, steps: int, initial: int = 0) -> None:
        if not self.active or not self.tty:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                         unit="step", dynamic_ncols=True, leave=True, mininterval=0.5)

    def advance(self, postfix: dict | None = None) -> None:
        """Called once per optimizer step; tqdm redraws on its own timer."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif postfix and self.active and time.monotonic() - self._last_line > 10:
            # Not a terminal (SLURM log, pipe): a plain line at most every 10 s.
            self._last_line = time.monotonic()
            print("  " + "  ".join(f"{k} {v}" for k, v in postfix.items()), flush=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_epoch()
        for tracker in self._trackers:
            tracker.finish()
        if self._fh:
            self._fh.close()
            self._fh = None


class _Wandb:
    def __init__(self, run_dir: Path, cfg, recipe: dict, run_id: str | None) -> None:
        import wandb

        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group,
                              tags=cfg.tags or None, config=recipe, name=recipe.get("name"),
                              dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                              mode=mode)
        self.run_id = self.run.id if mode != "disabled" else run_id
        if mode == "offline":
            print(f"wandb: offline run in {self.run.dir}; upload it later with "
                  f"`wandb sync {Path(self.run.dir).parent}`", flush=True)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self) -> None:
        self.run.finish()


class _TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()


def _open_trackers(run_dir: Path, cfg: TrackingConfig, recipe: dict, run_id: str | None) -> list:
    trackers: list = []
    if cfg.wandb is not None:
        trackers.append(_Wandb(run_dir, cfg.wandb, recipe, run_id))
    if cfg.tensorboard:
        trackers.append(_TensorBoard(run_dir))
    return trackers
