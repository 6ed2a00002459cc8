"""What counts as a number, in the two senses dist_train needs (stdlib only)."""

from __future__ import annotations

import math
from typing import Any


def is_metric_value(value: Any) -> bool:
    """A finite int/float logged or plotted as a metric; bools (JSON true/false) and NaN/inf
    are not (a NaN loss is reported by the non-finite guard, never plotted as a point)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parses_as_number(value: Any) -> bool:
    """A table cell that `float()` accepts ("3", "1e-3", 2, True): used to decide whether a
    data column is numeric before converting it."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
