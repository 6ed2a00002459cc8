"""The one HTML page of `dist-train report` (run reports and sweep reports share it), and the
one rule for how a report numbers epochs. Stdlib only."""

from __future__ import annotations

import base64
import html
import pathlib

# metrics.jsonl (the trainer's log) stores 0-based `epoch`; people, the trainer's console
# ("epoch 1 valid ...") and every report count from 1. Said once on every report page.
EPOCH_NOTE = "Epochs count from 1 (metrics.jsonl stores them from 0)."

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1500px;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:.3em .7em}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best{background:#fff6d5}
code{background:#f6f6f6;padding:0 .2em}.note{color:#a15c00}img{max-width:100%;height:auto}
"""


def shown_epoch(logged: int | float) -> int:
    """The epoch a report shows for a logged (0-based) `epoch`."""
    return int(logged) + 1


def png(path: pathlib.Path, title: str) -> str:
    """A section with the PNG inlined (the page opens offline, as one file)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    title = html.escape(title)
    return f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{data}'>"


def write_page(path: pathlib.Path, title: str, heading: str, parts: list[str]) -> pathlib.Path:
    """Write a self-contained page: `parts` are HTML fragments (already escaped) after the
    heading and the epoch note."""
    head = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(heading)}</h1>",
        f"<p>{EPOCH_NOTE}</p>",
    ]
    path.write_text("\n".join([*head, *parts, "</body></html>\n"]), encoding="utf-8")
    return path
