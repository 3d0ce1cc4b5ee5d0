"""PNG plots of training metrics over steps (matplotlib, Agg backend: no display needed).

Generic on purpose: any job passes its per-step metric dicts, the keys to draw (one panel each)
and optional vertical markers (epoch starts, index refreshes, evaluations).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from whetstone.config.base import StorageConfig


def render_metrics_png(
    history: Sequence[dict[str, Any]],
    keys: Sequence[str],
    markers: Sequence[tuple[float, str]] = (),
    x_key: str = "step",
    title: str | None = None,
    smooth: int = 0,
) -> bytes:
    """Draw one panel per key against ``x_key`` and return the PNG bytes.

    Args:
        history: per-step dicts, e.g. ``{"step": 3, "loss": 0.69, ...}``; entries missing a key
            (or holding a non-finite value) are skipped for that panel.
        keys: metric names to plot, one panel each.
        markers: ``(x, label)`` pairs drawn as dashed vertical lines on every panel.
        x_key: the x axis metric.
        title: figure title.
        smooth: if > 1, also draw a trailing moving average over this many points.

    Returns:
        PNG bytes.

    Raises:
        ValueError: no keys, or no entry has ``x_key`` and any of the keys.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not keys:
        raise ValueError("keys: give at least one metric to plot")
    series = {}
    for key in keys:
        points = [(float(m[x_key]), float(m[key])) for m in history
                  if x_key in m and isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        series[key] = points
    if not any(series.values()):
        raise ValueError(f"none of {list(keys)} appears with {x_key!r} in {len(history)} history entries")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys) + 0.6), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        xs, ys = [p[0] for p in series[key]], [p[1] for p in series[key]]
        ax.plot(xs, ys, lw=1, alpha=0.6 if smooth > 1 else 1.0, label=key)
        if smooth > 1 and len(ys) >= smooth:
            avg = [sum(ys[i - smooth + 1 : i + 1]) / smooth for i in range(smooth - 1, len(ys))]
            ax.plot(xs[smooth - 1 :], avg, lw=2, label=f"{key} ({smooth}-step mean)")
        for x, label in markers:
            ax.axvline(x, color="grey", ls="--", lw=0.8)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        va="top", ha="right", color="grey")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if smooth > 1:
            ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel(x_key)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_metrics(
    history: Sequence[dict[str, Any]],
    keys: Sequence[str],
    uri: str,
    markers: Sequence[tuple[float, str]] = (),
    x_key: str = "step",
    title: str | None = None,
    smooth: int = 0,
    storage: StorageConfig | None = None,
) -> str:
    """Render (see :func:`render_metrics_png`) and write the PNG to ``uri`` (local path or ``s3://``).

    Returns:
        ``uri``.
    """
    from whetstone import storage as store

    store.write_bytes(uri, render_metrics_png(history, keys, markers, x_key, title, smooth), storage)
    return uri
