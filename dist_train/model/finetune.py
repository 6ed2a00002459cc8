"""Fine-tuning: pretrained weights into the recipe's model, with a load report.

Runs on the bare model after it was built and initialised (`model.init` included) and before
anything wraps it: loaded tensors replace the initial ones, so `model.init` only ever shapes
what the recipe itself creates (a new head, tensors the file lacks). Freezing is its own step
(model/freeze.py). Reading files and renaming keys: model/pretrained.py.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from dist_train.config.schema import FinetuneConfig
from dist_train.errors import UserError
from dist_train.model.pretrained import apply_key_map, load_weights

__all__ = ["LoadReport", "load_weights", "prepare_finetune", "save_report"]

SHOWN = 4  # names listed per category in the printed table (all of them in load_report.json)
# Data statistics the recipe computes (data.standardize), not weights: never "missing".
FROM_DATA = ("input_norm.",)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # finetune.reinit globs
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    shape_mismatched: list[str] = field(default_factory=list)  # reinitialised (allowed)
    dropped: list[str] = field(default_factory=list)  # removed by a null key_map rule

    def table(self) -> list[str]:
        """The printed report: one row per category, its count and the first names."""
        rows = [
            ("loaded", self.loaded),
            ("reinitialised", self.reinitialised),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape-mismatched", self.shape_mismatched),
        ]
        if self.dropped:
            rows.append(("dropped (key_map)", self.dropped))
        width = max(len(r[0]) for r in rows)
        lines = [f"finetune: tensors from {self.source}"]
        for label, names in rows:
            shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
            lines.append(f"  {label:<{width}}  {len(names):>5}  {shown}".rstrip())
        return lines


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def prepare_finetune(model: nn.Module, cfg: FinetuneConfig | None) -> LoadReport | None:
    """Load the pretrained tensors that fit (key_map applied), keep the rest as built."""
    if cfg is None:
        return None
    raw = load_weights(cfg.from_)
    source, dropped = apply_key_map(raw, cfg.key_map, cfg.from_)
    own = model.state_dict()
    report = LoadReport(cfg.from_, dropped=dropped)
    mismatched = []
    for name, tensor in own.items():
        if _matches(name, cfg.reinit):
            report.reinitialised.append(name)
        elif name not in source:
            if not name.startswith(FROM_DATA):
                report.missing.append(name)
        elif source[name].shape != tensor.shape:
            report.shape_mismatched.append(name)
            mismatched.append(
                f"{name}: checkpoint {list(source[name].shape)} vs model {list(tensor.shape)}"
            )
        else:
            report.loaded.append(name)
    report.unexpected = [k for k in source if k not in own]
    if mismatched and not cfg.allow_shape_mismatch:
        raise UserError(
            f"finetune.from {cfg.from_}: shapes differ from this recipe's model:\n    "
            + "\n    ".join(mismatched)
            + '\n  list them in finetune.reinit (e.g. a new head: "layers.6.*") or set '
            "finetune.allow_shape_mismatch: true to reinitialise them."
        )
    if not report.loaded:
        raise UserError(
            f"finetune.from {cfg.from_}: no tensor matches this model (e.g. model "
            f"has {list(own)[:3]}, file has {list(source)[:3]}); wrong architecture? "
            'Rename the file\'s tensors with finetune.key_map, e.g. {"0.": "layers.0."}.'
        )
    if cfg.strict and (report.missing or report.unexpected):
        raise UserError(
            f"finetune.strict: {cfg.from_} does not cover this model exactly: "
            f"{len(report.missing)} missing {report.missing[:6]}, {len(report.unexpected)} "
            f"unexpected {report.unexpected[:6]}. Rename with finetune.key_map, drop file "
            "tensors with a null key_map rule, list new layers in finetune.reinit, or set "
            "finetune.strict: false."
        )
    model.load_state_dict({k: source[k] for k in report.loaded}, strict=False)
    return report


def save_report(run_dir: Path, report: LoadReport | None) -> None:
    """RUN_DIR/load_report.json: every name of every category (main process only)."""
    if report is None:
        return
    data = asdict(report) | {
        "counts": {k: len(v) for k, v in asdict(report).items() if isinstance(v, list)}
    }
    (run_dir / "load_report.json").write_text(json.dumps(data, indent=2) + "\n")
