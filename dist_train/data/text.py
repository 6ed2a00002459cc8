"""Text columns -> token rows with transformers' fast tokenizer (extra `[hf]`).

Each row becomes one int64 tensor [K, data.max_length] (K = the tokenizer's outputs:
input_ids, attention_mask, token_type_ids for pairs), padded once to max_length, so the table
stays two tensors and every promise of the float path (global batch, exact gathered metrics,
exact resume) holds unchanged; model/backbone.py's TokenInputs cuts each batch to its longest
row (dynamic padding) and hands the model keyword arguments.
"""

from __future__ import annotations

import difflib

import numpy as np
import torch

from dist_train.config.schema import DataConfig
from dist_train.errors import UserError


def text_columns(cfg: DataConfig) -> list[str]:
    return [cfg.text] if isinstance(cfg.text, str) else list(cfg.text)


def load_tokenizer(path: str | None):
    """A fast tokenizer from a directory (or hub id, where there is network)."""
    from dist_train.extras import require

    require("transformers", "data.tokenizer")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    fix = (
        "point data.tokenizer (default: model.hf.pretrained) at a directory written by "
        "tokenizer.save_pretrained (tokenizer.json / vocab files), or a hub id where there is "
        "network."
    )
    if not path:
        raise UserError(f"data.tokenizer: not set; {fix}")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"data.tokenizer `{path}`: no tokenizer there ({str(err).splitlines()[0][:200]}); {fix}"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"data.tokenizer `{path}`: only a slow tokenizer is available; {fix}")
    return tok


def tokenize(frame, cfg: DataConfig, source: str) -> tuple[torch.Tensor, list[str], bool]:
    """(rows [N, K, max_length] int64, the K input names, right-padded?) from the text
    column(s) of `frame`, in one batched call of the fast (Rust, multi-threaded) tokenizer."""
    tok = load_tokenizer(cfg.tokenizer)
    texts = []
    for name in text_columns(cfg):
        col = _strings(frame, name, source)
        bad = next((i for i, v in enumerate(col) if not isinstance(v, str)), None)
        if bad is not None:
            raise UserError(
                f"data.text `{name}`: row {bad} is {col[bad]!r}, not text; fill or drop it."
            )
        texts.append(col)
    enc = tok(
        *texts,
        truncation=True,
        max_length=cfg.max_length,
        padding="max_length",
        return_tensors="np",
    )
    names = [n for n in tok.model_input_names if n in enc]
    rows = np.stack([np.asarray(enc[n], dtype=np.int64) for n in names], axis=1)
    return torch.from_numpy(rows), names, tok.padding_side == "right"


def _strings(frame, name: str, source: str) -> list:
    """One column as a Python list, through arrow in one call for a datasets.Dataset (its
    per-row access formats each row separately)."""
    if name not in frame.column_names:
        close = difflib.get_close_matches(name, frame.column_names, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise UserError(
            f"data.text: column `{name}` not in {source}; {hint}columns: "
            f"{', '.join(frame.column_names[:20])}"
        )
    arrow = getattr(frame, "with_format", None)
    if arrow is not None:
        return arrow("arrow")[name].to_pylist()
    return list(frame[name])
