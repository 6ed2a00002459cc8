"""Run output: metrics.jsonl (always), console lines / progress bar, wandb, tensorboard.

Only the main process touches files, the console or trackers; every other rank gets a
`RunLog` whose methods do nothing (and never imports wandb), so no caller needs an
`if is_main` of its own.

One job is one tracker run, across resumes and requeues: the run id lives in every checkpoint
and comes back through `run_id`. A resumed job replays the steps after its checkpoint, so
`metrics.jsonl` is rewound to the checkpoint step, TensorBoard purges the replayed steps, and
wandb (whose history cannot be rewound, offline least of all) is sent only steps it has not
seen. Every step therefore appears once, in increasing order, in each of them. What wandb has
seen is read from metrics.jsonl, never from wandb's own files (see `_Wandb`).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
import time
from pathlib import Path

from dist_train.config.schema import TrackingConfig, default_mode
from dist_train.extras import missing, wandb_mode
from dist_train.numbers import is_metric_value

TRACKED = ("train", "eval")  # event kinds that carry step-indexed figures for the trackers
PLAIN_LINE_SECONDS = 10.0  # not a terminal: at most one progress line per this many seconds


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        total_steps: int,
        tracking: TrackingConfig,
        recipe: dict,
        run_id: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.active, self.run_dir, self.total = is_main, run_dir, total_steps
        self.run_id = run_id
        self._fh = None
        self._bar = None
        self._start = time.monotonic()
        self._last_line: float | None = None
        self._rate_from: tuple[float, int] | None = None  # (time, step) the ETA is measured from
        self._epoch = (0, 0)
        self._trackers: list = []
        self._last_step: dict[str, int] = {}  # per tracked kind: the last step in metrics.jsonl
        self._evals: list[dict] = []
        self._last_train: dict = {}
        if not is_main:
            return
        self.tty = sys.stderr.isatty()
        path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            rewind_jsonl(path, resume_step)
        kept = read_jsonl(path)
        for record in kept:
            self._remember(record)
        self._fh = open(path, "a", buffering=1)  # noqa: SIM115 (line-buffered: tail -f)
        self.run_id = run_id or new_run_id()
        backlog = [r for r in kept if r.get("event") in TRACKED and isinstance(r.get("step"), int)]
        finished = [r for r in kept if r.get("event") == "wandb"]
        self._trackers = _open_trackers(
            run_dir, tracking, recipe, self.run_id, resume_step, backlog, finished
        )

    def info(self, message: str) -> None:
        if self.active:
            (self._bar.write if self._bar else print)(message, flush=True)

    def event(self, kind: str, **fields) -> None:
        """One record in metrics.jsonl; `train`/`eval` records also go to the trackers."""
        if not self.active:
            return
        step = fields.get("step")
        if kind in TRACKED and step is not None and step <= self._last_step.get(kind, -1):
            return  # replayed after a resume: this step is already in the log (same values)
        record = {"event": kind, **fields, "time": round(time.monotonic() - self._start, 3)}
        self._fh.write(json.dumps(record, default=float) + "\n")
        self._remember(record)
        if kind not in TRACKED:
            return
        for tracker in self._trackers:
            tracker.log(_scalars(fields), step or 0)

    def _remember(self, record: dict) -> None:
        kind, step = record.get("event"), record.get("step")
        if kind in TRACKED and isinstance(step, int):
            self._last_step[kind] = step
        if kind == "eval":
            self._evals.append(record)
        elif kind == "train":
            self._last_train = record

    def start_epoch(self, epoch: int, epochs: int, steps: int, initial: int = 0) -> None:
        self._epoch = (epoch, epochs)
        if not self.active or not self.tty:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=steps,
            initial=initial,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            mininterval=0.5,
        )

    def advance(self, postfix: dict | None = None, step: int | None = None) -> None:
        """Called once per optimizer step (with figures at the log interval). A terminal gets a
        tqdm bar that redraws on its own timer; anything else (a SLURM log, a pipe) gets a plain
        line at the first log interval, then at most every PLAIN_LINE_SECONDS, and at the end."""
        if not self.active:
            return
        now = time.monotonic()
        if step is not None and self._rate_from is None:
            self._rate_from = (now, step)
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        if postfix is None or step is None:
            return
        due = self._last_line is None or now - self._last_line >= PLAIN_LINE_SECONDS
        if due or step >= self.total:
            self._last_line = now
            print(self._plain_line(step, postfix, now), flush=True)

    def _plain_line(self, step: int, postfix: dict, now: float) -> str:
        epoch, epochs = self._epoch
        parts = [
            f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%)",
            f"epoch {epoch + 1}/{epochs}",
            *(f"{k} {v}" for k, v in postfix.items()),
        ]
        t0, s0 = self._rate_from or (now, step)
        if step > s0 and step < self.total:
            parts.append(f"ETA {_clock((self.total - step) * (now - t0) / (step - s0))}")
        return "  ".join(parts)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, final: dict, best_step: int | None = None) -> None:
        """End-of-run table: final figures, those at the best checkpoint, and each metric's best
        over all evaluations of this run (including those before a resume)."""
        if self.active:
            self.info(
                summary_table(
                    final, self._evals, self._last_train, best_step, time.monotonic() - self._start
                )
            )

    def close(self) -> None:
        self.end_epoch()
        for tracker in self._trackers:
            try:
                note = tracker.finish()
            except Exception as err:  # e.g. wandb's service process killed with the job
                self.info(f"{tracker.name}: did not close cleanly ({str(err)[:200]})")
                continue  # no record: a resume treats the part as unfinished and re-sends it
            if note and self._fh:  # what the tracker holds, for the next resume to continue
                self.event(**note)
        self._trackers = []
        if self._fh:
            self._fh.close()
            self._fh = None


def new_run_id() -> str:
    """wandb-style id (8 lowercase letters/digits), chosen by us so it exists with or without
    wandb and can go into the first checkpoint."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a kill mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def rewind_jsonl(path: Path, step: int) -> None:
    """Drop the records after `step` (the resumed checkpoint): the resumed job logs them again.
    Atomic (write + rename)."""
    records = read_jsonl(path)
    if not records:
        return
    kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def summary_table(
    final: dict, evals: list[dict], last_train: dict, best_step: int | None, seconds: float
) -> str:
    steps = last_train.get("step") or (evals[-1]["step"] if evals else 0)
    head = f"run summary: {steps} optimizer steps, {_clock(seconds)} in this process"
    at_best = next((e for e in evals if e.get("step") == best_step), None)
    keys = [k for k, v in final.items() if is_metric_value(v) and not k.endswith("/rows")]
    rows = [("metric", "final", f"best ckpt (step {best_step})" if at_best else "", "best (step)")]
    if is_metric_value(last_train.get("train/loss")):
        rows.append(("train/loss", _fmt(last_train["train/loss"]), "", ""))
    for key in keys:
        values = [(e[key], e["step"]) for e in evals if is_metric_value(e.get(key))]
        best = (min if default_mode(key) == "min" else max)(
            values, key=lambda p: p[0], default=None
        )
        rows.append(
            (
                key,
                _fmt(final[key]),
                _fmt(at_best.get(key)) if at_best else "",
                f"{_fmt(best[0])} ({best[1]})" if best else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join([head, *lines])


def _scalars(fields: dict) -> dict:
    """The figures a tracker plots: numbers other than the step/epoch counters."""
    return {k: v for k, v in fields.items() if is_metric_value(v) and k not in ("step", "epoch")}


def _fmt(value) -> str:
    return f"{value:.4f}" if is_metric_value(value) else ""


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Wandb:
    """One wandb run per job, created by the main process only.

    The id is ours (kept in checkpoints) and passed with resume="allow": online, a resumed job
    continues the same run. Offline, each (re)start writes its own `offline-run-*-ID` directory
    with the same id; `wandb sync RUN_DIR/wandb` uploads them in start order into that one run.

    What the run already holds comes from metrics.jsonl (wandb's own files are not read):
    online, the server's step; offline, the `wandb` record each part that closed cleanly
    (a finished run, an exception, a preemption) leaves with its last step (and which a
    resume from an earlier checkpoint rewinds away, like the steps after it). A part without
    one was killed (SIGKILL, OOM, node loss) and lost an unknown tail, up to a 32 KiB block of
    its .wandb file: it is moved out of `wandb/` into `wandb-unfinished/` (kept, not synced),
    and its steps are re-sent from metrics.jsonl. Either way the history is complete and
    strictly increasing across the parts `wandb sync` uploads.
    """

    name = "wandb"

    def __init__(
        self,
        run_dir: Path,
        cfg,
        recipe: dict,
        run_id: str,
        backlog: list[dict],
        finished: list[dict],
    ) -> None:
        try:
            import wandb
        except ImportError:  # checked before start-up too; here for callers that did not
            raise missing("wandb", "tracking.wandb") from None

        mode = wandb_mode(cfg)
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=cfg.tags or None,
            config=recipe,
            name=recipe.get("name"),
            dir=str(run_dir),
            id=run_id,
            resume="allow",
        )
        if mode == "offline":  # before init: the killed parts never share wandb/ with ours
            _set_aside_unfinished(run_dir, run_id, finished)
        try:
            self.run = wandb.init(mode=mode, settings=_settings(wandb, mode), **kwargs)
        except Exception as err:  # no network / no credentials: never stop the training
            if mode != "online":
                raise
            print(
                f"wandb: online init failed ({str(err).splitlines()[0][:200]}); "
                "logging offline instead",
                flush=True,
            )
            mode = "offline"
            _set_aside_unfinished(run_dir, run_id, finished)
            self.run = wandb.init(mode=mode, settings=_settings(wandb, mode), **kwargs)
        self.mode = mode
        self.seen_step = self._logged_before(mode, run_dir, run_id, finished)
        self.last_step = self.seen_step
        for record in backlog:  # steps the run lacks (lost in a kill), from metrics.jsonl
            self.log(_scalars(record), record["step"])
        if mode == "offline":
            print(
                f"wandb: offline run {run_id} in {Path(self.run.dir).parent}; upload it with "
                f"`wandb sync {run_dir / 'wandb'}` (all resumed parts, in order)",
                flush=True,
            )

    def _logged_before(self, mode: str, run_dir: Path, run_id: str, finished: list) -> int:
        """The last step this run already holds (-1: none)."""
        if mode == "online":
            return self.run.step - 1 if self.run.resumed else -1
        if mode != "offline":
            return -1
        parts = {p.name for p in (run_dir / "wandb").glob(f"offline-run-*-{run_id}")}
        return max((r["step"] for r in finished if r.get("part") in parts), default=-1)

    def log(self, scalars: dict, step: int) -> None:
        if step > self.seen_step:
            self.run.log(scalars, step=step)
            self.last_step = max(self.last_step, step)

    def finish(self) -> dict | None:
        """Close the run; offline, the metrics.jsonl record that marks this part complete."""
        self.run.finish()  # returns once everything logged is written (offline: the file)
        if self.mode != "offline":
            return None
        # `step`: the last step the part holds. A resume from an earlier checkpoint rewinds
        # the record away with the steps after it, and re-sends them: still no gap, no repeat.
        return {"kind": "wandb", "step": self.last_step, "part": Path(self.run.dir).parent.name}


def _set_aside_unfinished(run_dir: Path, run_id: str, finished: list[dict]) -> None:
    """Move this run's offline parts that never closed cleanly out of `wandb/` (see _Wandb)."""
    done = {r.get("part") for r in finished}
    for part in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}")):
        if part.name not in done:
            aside = run_dir / "wandb-unfinished"
            aside.mkdir(exist_ok=True)
            os.replace(part, aside / part.name)


def _settings(wandb, mode: str):
    # Offline, our one line replaces wandb's banner and its end-of-run sparklines.
    return wandb.Settings(silent=True) if mode == "offline" else wandb.Settings(quiet=True)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing("tensorboard", "tracking.tensorboard") from None

        # purge_step: TensorBoard hides the events a killed attempt wrote after the checkpoint.
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # once per log interval: a kill loses nothing already logged

    def finish(self) -> None:
        self.writer.close()


def _open_trackers(
    run_dir: Path,
    cfg: TrackingConfig,
    recipe: dict,
    run_id: str,
    resume_step: int | None,
    backlog: list[dict],
    finished: list[dict],
) -> list:
    trackers: list = []
    if cfg.wandb is not None and wandb_mode(cfg.wandb) != "disabled":  # disabled: no import
        trackers.append(_Wandb(run_dir, cfg.wandb, recipe, run_id, backlog, finished))
    if cfg.tensorboard:
        trackers.append(_TensorBoard(run_dir, resume_step))
    return trackers
