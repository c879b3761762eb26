"""Drawing and number formatting that every task's plot and table share (one look for all of them).

Each task draws its own PNG and writes its own markdown section (its module's ``plot`` and
``table``); these helpers keep the figures' backend and the tables' number formats the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (evaluation runs headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Any) -> None:
    """Write a task's PNG (120 dpi, trimmed to what is drawn) and free the figure."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def band(pairs: list) -> tuple[np.ndarray, np.ndarray]:
    """[[lo, hi] or None per point] -> (lo, hi) arrays, NaN where undefined."""
    lo = np.array([np.nan if p is None else p[0] for p in pairs])
    hi = np.array([np.nan if p is None else p[1] for p in pairs])
    return lo, hi


def fmt(value: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals; "n/a" when undefined (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def with_interval(value: float | None, interval: list[float] | None) -> str:
    """"0.123 [0.101, 0.15]" (3 significant digits: influences span many decades); the value alone
    when its interval is undefined."""
    if value is None:
        return "n/a"
    if interval is None:
        return f"{value:.3g}"
    return f"{value:.3g} [{interval[0]:.3g}, {interval[1]:.3g}]"


def percent_interval(value: float, interval: list[float] | None) -> str:
    """"85% [64-95]": accuracy with its 95% interval in percent."""
    if interval is None:
        return f"{value:.0%}"
    return f"{value:.0%} [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]"
