"""Render completions with each segment coloured by its credit, for W&B and the run folder."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np


def _colour(value: float, scale: float) -> str:
    """Green for positive credit, red for negative, white for none; opacity by magnitude."""
    if scale <= 0 or not np.isfinite(value):
        return "rgba(0,0,0,0)"
    a = min(1.0, abs(value) / scale)
    return f"rgba(46,160,67,{a:.2f})" if value >= 0 else f"rgba(218,54,51,{a:.2f})"


def credit_html(text: str, segmentation, phi: Sequence[float]) -> str:
    """One completion as HTML: segments highlighted by credit (hover shows the value)."""
    phi = np.asarray(phi, dtype=float)
    scale = float(np.max(np.abs(phi))) if phi.size else 0.0
    out, pos = [], 0
    for (s, e), v in zip(segmentation.spans, phi, strict=True):
        out.append(html.escape(text[pos:s]))
        out.append(
            f'<span title="{v:+.4f}" style="background:{_colour(v, scale)};'
            f'border-radius:3px;padding:0 2px">{html.escape(text[s:e])}</span>'
        )
        pos = e
    out.append(html.escape(text[pos:]))
    return "".join(out)


def credit_table_html(requests, texts, segmentations, phis, metrics, title: str = "") -> str:
    """A table of request | completion coloured by credit | metrics."""
    rows = []
    for req, text, seg, phi, m in zip(requests, texts, segmentations, phis, metrics, strict=True):
        stats = " ".join(f"{k}={v:.3f}" for k, v in m.items())
        rows.append(
            f"<tr><td>{html.escape(req)}</td><td>{credit_html(text, seg, phi)}</td>"
            f"<td><code>{html.escape(stats)}</code></td></tr>"
        )
    return (
        f"<h4>{html.escape(title)}</h4>"
        '<table border="1" style="border-collapse:collapse;font-family:sans-serif">'
        "<tr><th>request</th><th>completion (green: credit, red: blame)</th><th>metrics</th></tr>"
        + "".join(rows)
        + "</table>"
    )
