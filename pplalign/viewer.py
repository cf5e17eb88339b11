"""A self-contained HTML view of a particle run: each final particle's text, normalised weight and ancestry.

Lineage. ``Particles.ancestors[t, i]`` is the index, before the resampling that followed step t, of the
parent of the particle that sits in slot i after it (identity where no resampling happened). Slot j at
step t + 1 was extended from slot j after step t, so the slot at step t of final particle i's line is

    a_{T−1}(i) = ancestors[T−1, i],     a_t(i) = ancestors[t, a_{t+1}(i)]   (t = T−2, …, 0),

a backward pass over the steps (:func:`lineage`). Two final particles share an ancestor at step t when
a_t agrees; the number of distinct a_0 is the number of step-0 particles that survived.

The page has inline CSS and an inline SVG (no scripts, no external assets), so it opens offline and
displays in a notebook cell: :func:`view` returns a :class:`ParticleView` with ``_repr_html_``. Machine-readable
attributes make the page testable: each particle row is ``<tr class="particle" data-index data-weight
data-lineage>`` and its text is in ``<td class="text">``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["lineage", "ParticleView", "view", "write_html"]


def lineage(ancestors: Any) -> np.ndarray:
    """[N, T] int: row i is the slot of final particle i's ancestor at each step (see the module docstring)."""
    anc = np.asarray(ancestors)
    if anc.ndim != 2:
        raise ValueError(f"ancestors must be [T, N]; got shape {anc.shape}")
    steps, n = anc.shape
    out = np.zeros((n, steps), np.int64)
    if steps == 0:
        return out
    out[:, -1] = anc[-1]
    for t in range(steps - 2, -1, -1):
        out[:, t] = anc[t, out[:, t + 1]]
    return out


def _normalized(log_weights: Any) -> np.ndarray:
    lw = np.asarray(log_weights, np.float64)
    if not np.any(np.isfinite(lw)):
        return np.zeros_like(lw)  # all weights zero: shown as 0, never NaN
    w = np.exp(lw - np.max(lw[np.isfinite(lw)]))
    return w / w.sum()


class ParticleView:
    """The rendered run: ``html`` (a full page), ``fragment`` (for a notebook), ``save(path)``."""

    def __init__(self, fragment: str, title: str):
        self.fragment = fragment
        self.title = title

    @property
    def html(self) -> str:
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"</head><body>\n{self.fragment}\n</body></html>\n")

    def _repr_html_(self) -> str:
        return self.fragment

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path


_CSS = """
.pv{font-family:system-ui,sans-serif;font-size:13px}
.pv table{border-collapse:collapse}
.pv td,.pv th{border-bottom:1px solid #ddd;padding:2px 6px;vertical-align:top;text-align:left}
.pv .bar{display:inline-block;height:9px;background:#4a7bd0}
.pv .text{font-family:ui-monospace,monospace;white-space:pre-wrap}
.pv .lineage{font-family:ui-monospace,monospace;color:#555}
.pv .rs{color:#b03030;font-weight:bold}
"""


def _svg(lines: np.ndarray, weights: np.ndarray, resampled: np.ndarray) -> str:
    """Lines of descent: column t, row = slot; one polyline per final particle, width ∝ its weight."""
    n, steps = lines.shape
    dx, dy = 28, max(4, min(14, 360 // max(n, 1)))
    width, height = dx * (steps + 1), dy * (n + 1)
    parts = [f'<svg class="tree" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for t in range(steps):
        colour = "#b03030" if resampled[t] else "#bbb"
        parts.append(f'<line x1="{dx * (t + 1)}" y1="0" x2="{dx * (t + 1)}" y2="{height}" stroke="{colour}" '
                     'stroke-width="0.5"/>')
    top = weights.max() if weights.size and weights.max() > 0 else 1.0
    for i in range(n):
        pts = " ".join(f"{dx * (t + 1)},{dy * (lines[i, t] + 1)}" for t in range(steps))
        w = 0.5 + 2.5 * weights[i] / top
        parts.append(f'<polyline data-particle="{i}" points="{pts}" fill="none" stroke="#4a7bd0" '
                     f'stroke-opacity="0.6" stroke-width="{w:.2f}"/>')
    parts.append("</svg>")
    return "".join(parts)


def view(particles: Any, decode: Optional[Callable[[Any], str]] = None, *, tokens: Any = None,
         title: str = "particles", max_particles: Optional[int] = None,
         step_decode: Optional[Callable[[Any], Sequence[str]]] = None) -> ParticleView:
    """Render a :class:`pplalign.Particles` run.

    Args:
      particles: the result of a sampler (``samples``, ``log_weights``, ``ancestors`` are read).
      decode: tokens of one particle → its text (e.g. ``lambda x: tok.decode(x, stop_at_eos=True)``);
        default: the sample's values printed.
      tokens: [N, T] per-step values to show instead of ``particles.samples`` (e.g. a wrapper's output).
      max_particles: show only the heaviest ones (the lineage graph keeps every line).
      step_decode: tokens → the text after each step (``HFTokenizer.decode_incremental``); shown as a tooltip
        of the step path.
    """
    samples = np.asarray(particles.samples if tokens is None else tokens)
    weights = _normalized(particles.log_weights)
    anc = np.asarray(particles.ancestors)
    n = weights.shape[0]
    if samples.shape[0] != n or anc.ndim != 2 or anc.shape[1] != n:
        raise ValueError(f"samples {samples.shape}, log_weights {weights.shape} and ancestors {anc.shape} disagree "
                         "on the number of particles")
    decode = decode or (lambda x: " ".join(map(str, np.asarray(x).ravel().tolist())))
    lines = lineage(anc)
    resampled = np.any(anc != np.arange(n)[None, :], axis=1)
    order = np.argsort(-weights, kind="stable")[: max_particles or n]
    log_z = float(np.asarray(particles.log_Z)) if hasattr(particles, "log_Z") else float("nan")
    rows = []
    for i in order:
        path = " ".join(str(int(a)) for a in lines[i])
        shown = " → ".join(f'<span class="rs">{int(a)}</span>' if resampled[t] else str(int(a))
                           for t, a in enumerate(lines[i]))
        tip = ""
        if step_decode is not None:
            tip = f' title="{html.escape(" | ".join(step_decode(samples[i])))}"'
        rows.append(
            f'<tr class="particle" data-index="{int(i)}" data-weight="{weights[i]:.9g}" data-lineage="{path}">'
            f'<td>{int(i)}</td><td>{weights[i]:.4f} <span class="bar" style="width:{100 * weights[i]:.1f}px"></span></td>'
            f'<td class="text">{html.escape(decode(samples[i]))}</td><td class="lineage"{tip}>{shown}</td></tr>')
    summary = (f'<p class="summary" data-num-particles="{n}" data-num-steps="{anc.shape[0]}" '
               f'data-log-z="{log_z:.9g}" data-resampled-steps="{" ".join(str(t) for t in np.flatnonzero(resampled))}">'
               f'N = {n}, T = {anc.shape[0]}, log Ẑ = {log_z:.4f}, resampled after steps '
               f'{", ".join(str(t) for t in np.flatnonzero(resampled)) or "none"}; '
               f'{len(set(lines[:, 0].tolist())) if anc.shape[0] else n} step-0 ancestors survive.</p>')
    fragment = (f'<div class="pv"><style>{_CSS}</style><h3>{html.escape(title)}</h3>{summary}'
                f'{_svg(lines, weights, resampled)}'
                '<table><thead><tr><th>#</th><th>weight</th><th>text</th><th>ancestor slot per step '
                '(red: after a resampling)</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></div>")
    return ParticleView(fragment, title)


def write_html(path: str | Path, particles: Any, decode: Optional[Callable[[Any], str]] = None, **kwargs) -> Path:
    """:func:`view` saved as a standalone page at ``path``."""
    return view(particles, decode, **kwargs).save(path)
