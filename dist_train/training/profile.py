"""`train.profile`: torch.profiler over a few optimizer steps of the chosen ranks.

The schedule counts optimizer steps from the start of this process's training (also after a
resume): `wait` steps untouched, `warmup` steps profiled and discarded, `active` steps
recorded. When the window closes, each profiling rank writes `RUN_DIR/profile/rank-R.trace.json`
(chrome://tracing or https://ui.perfetto.dev) and `rank-R.top-ops.txt`, the operators sorted by
self CPU time, and prints that table. The profiler only observes: no RNG draw, no change to
the math, so the weights are those of a run without it (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_train.config.run import ProfileConfig
from dist_train.errors import UserError


def check_ranks(cfg: ProfileConfig | None, world_size: int) -> None:
    """Before anything is written: every rank named must exist (the same answer on all)."""
    if cfg is None:
        return
    bad = [r for r in cfg.ranks if not 0 <= r < world_size]
    if bad:
        raise UserError(
            f"train.profile.ranks: {bad} do not exist in a run of {world_size} process(es) "
            f"(ranks 0..{world_size - 1}); name existing ranks, e.g. [0]."
        )


class StepProfiler:
    """A no-op unless this rank profiles. `step()` after each optimizer step; `stop()` at the
    end (a window the run cut short is still written; one it never reached is reported)."""

    def __init__(
        self,
        cfg: ProfileConfig | None,
        run_dir: Path,
        rank: int,
        device: torch.device,
        first_step: int,
    ) -> None:
        self.prof = None
        self.written = False
        if cfg is None or rank not in cfg.ranks:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.cfg, self.rank, self.out = cfg, rank, run_dir / "profile"
        start = first_step + cfg.wait + cfg.warmup + 1
        self.steps = f"optimizer steps {start}-{start + cfg.active - 1}"
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1),
            on_trace_ready=self._write,
        )
        self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.stop()
        if not self.written:
            print(
                f"profile (rank {self.rank}): the run ended before {self.steps}; nothing "
                "recorded (lower train.profile.wait/warmup)",
                flush=True,
            )

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"rank-{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=self.cfg.row_limit
        )
        (self.out / f"rank-{self.rank}.top-ops.txt").write_text(table + "\n")
        self.written = True
        print(
            f"profile (rank {self.rank}, {self.steps}): top operators by self CPU time; "
            f"trace in {trace}\n{table}",
            flush=True,
        )
