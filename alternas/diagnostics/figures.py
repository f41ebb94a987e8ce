"""Plotly figures of the diagnostics, and a writer for one self-contained HTML page of figures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from alternas.fileio import atomic_write_text

MSA_SHADE, SUBSAMPLE_SHADE = "rgba(128,128,128,0.25)", "rgba(70,130,220,0.22)"


def _shade_units(fig: go.Figure, units: Sequence[dict], row: int | None = None, col: int | None = None) -> None:
    """Grey bands over MSA units and blue over subsampling units, each over [i-1, i]/(L-1) as in the paper."""
    last = max(len(units) - 1, 1)
    for i, u in enumerate(units):
        colour = MSA_SHADE if u["kind"] == "msa" else SUBSAMPLE_SHADE if u["subsamples"] and i else None
        if colour:
            kwargs = {"row": row, "col": col} if row else {}
            fig.add_vrect(x0=(i - 1) / last, x1=i / last, fillcolor=colour, line_width=0, layer="below", **kwargs)


def high_frequency_label(units: Sequence[dict]) -> str:
    """Where the units' ``delta_high`` was read: one common frequency, or each unit's own last point (paper)."""
    at = {round(u["high_frequency"], 4) for u in units if u.get("high_frequency") is not None}
    if len(at) == 1:
        return f"{at.pop():.2f}π"
    return "each map's highest frequency (paper's '1.0π')"


def fourier_figure(profiles: dict[str, list[dict]]) -> go.Figure:
    """Δ log amplitude at the high frequency vs normalised depth, one line per model; plus the full curves of
    the first model, at the frequencies measured on each map, coloured by depth."""
    first = next(iter(profiles.values()), [])
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"Δ log amplitude at {high_frequency_label(first)} vs depth",
                                                        "Δ log amplitude vs measured frequency"))
    for name, units in profiles.items():
        fig.add_trace(go.Scatter(x=[u["depth"] for u in units], y=[u["delta_high"] for u in units],
                                 mode="lines+markers", name=name, text=[u["name"] for u in units]), row=1, col=1)
    _shade_units(fig, first, row=1, col=1)
    colours = sample_colorscale("Plasma", [u["depth"] * 0.9 for u in first]) if first else []
    for u, colour in zip(first, colours):
        fig.add_trace(go.Scatter(x=u["frequencies"], y=u["delta_log_amplitude"], mode="lines", line={"color": colour},
                                 name=u["name"], showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="normalised depth", row=1, col=1)
    fig.update_xaxes(title_text="frequency (×π, per axis, on each map's own grid)", row=1, col=2)
    fig.update_yaxes(title_text="Δ log amplitude", row=1, col=1)
    fig.update_layout(title="Fourier analysis of feature maps (grey: MSA, blue: subsampling)", height=420)
    return fig


def variance_figure(profiles: dict[str, list[dict]]) -> go.Figure:
    fig = go.Figure()
    for name, units in profiles.items():
        fig.add_trace(go.Scatter(x=[u["depth"] for u in units], y=[u["variance"] for u in units],
                                 mode="lines+markers", name=name, text=[u["name"] for u in units]))
    _shade_units(fig, next(iter(profiles.values()), []))
    fig.update_layout(title="Feature-map variance vs depth", xaxis_title="normalised depth",
                      yaxis_title="variance", yaxis_type="log", height=380)
    return fig


MIN_DENSITY_VALUES = 20  # fewer values than this are drawn as points: a density of a handful is invented


def _spectrum_trace(values: list[float], name: str, colour: str) -> go.Scatter:
    """A Gaussian-kernel density of ``values`` (Scott's bandwidth), or the values themselves as points."""
    label = f"{name} (n={len(values)})"
    if len(values) >= MIN_DENSITY_VALUES and np.ptp(values) > 0:
        from scipy.stats import gaussian_kde

        pad = 0.1 * np.ptp(values)
        grid = np.linspace(min(values) - pad, max(values) + pad, 200)
        return go.Scatter(x=grid, y=gaussian_kde(values)(grid), mode="lines", name=label, line={"color": colour},
                          legendgroup=name)
    return go.Scatter(x=values, y=[0.0] * len(values), mode="markers", name=f"{label}, points",
                      marker={"color": colour, "symbol": "line-ns-open", "size": 16}, legendgroup=name)


def hessian_figure(spectra: dict[str, list[float]]) -> go.Figure:
    """The batch-wise top eigenvalues, negative and positive parts in separate panels (as the paper draws them):
    a density where there are at least ``MIN_DENSITY_VALUES`` values, else the values as points."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("negative eigenvalues", "positive eigenvalues"),
                        column_widths=[0.35, 0.65])
    colours = sample_colorscale("Turbo", [i / max(len(spectra) - 1, 1) for i in range(len(spectra))])
    for (name, values), colour in zip(spectra.items(), colours):
        negative, positive = [v for v in values if v < 0], [v for v in values if v >= 0]
        if negative:
            fig.add_trace(_spectrum_trace(negative, f"{name} λ<0", colour), row=1, col=1)
        if positive:
            fig.add_trace(_spectrum_trace(positive, name, colour), row=1, col=2)
    fig.update_layout(title=f"Hessian max-eigenvalue spectrum (densities from ≥{MIN_DENSITY_VALUES} values, "
                      "else points)", height=380)
    fig.update_xaxes(title_text="eigenvalue")
    fig.update_yaxes(title_text="density", row=1, col=1)
    return fig


def noise_figure(results: dict[str, dict]) -> go.Figure:
    """Δaccuracy per noise band; the bars (right axis) are each band's FFT bin count, which sets its energy unless
    the energy is equalised (said in the title)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for name, r in results.items():
        fig.add_trace(go.Scatter(x=r["frequencies"], y=r["delta_acc"], mode="lines+markers", name=name),
                      secondary_y=False)
    first = next(iter(results.values()), {})
    if first.get("bins"):
        fig.add_trace(go.Bar(x=first["frequencies"], y=first["bins"], name="FFT bins in band", opacity=0.25,
                             marker_color="grey", width=0.05), secondary_y=True)
    energy = ("equal energy per band" if first.get("energy") == "equal" else
              "energy ∝ bins in band (paper)" if first.get("energy") else "")
    fig.update_layout(title=f"Robustness to band-limited noise ({energy})" if energy else
                      "Robustness to band-limited noise", xaxis_title="noise frequency (×π)", height=380)
    fig.update_yaxes(title_text="Δ accuracy (pp)", secondary_y=False)
    fig.update_yaxes(title_text="FFT bins in band", secondary_y=True, showgrid=False)
    return fig


def lesion_figure(rows: list[dict]) -> go.Figure:
    colours = ["grey" if r["kind"] == "msa" else "steelblue" for r in rows]
    fig = go.Figure(go.Bar(x=[r["name"] for r in rows], y=[r["delta_acc"] for r in rows], marker_color=colours))
    fig.update_layout(title="Lesion study: accuracy change when a block is removed (grey: MSA)",
                      yaxis_title="Δ accuracy (pp)", height=380)
    return fig


def cka_figure(cka: dict, name: str) -> go.Figure:
    """The unit × unit linear-CKA heatmap; MSA units are marked in the tick labels, stage ends by lines."""
    labels = [f"{n} (MSA)" if k == "msa" else n for n, k in zip(cka["names"], cka["kinds"])]
    fig = go.Figure(go.Heatmap(z=cka["matrix"], x=labels, y=labels, colorscale="Viridis", zmin=0, zmax=1,
                               colorbar={"title": "CKA"}))
    stages = cka["stages"]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for kind in ("v", "h"):
                line = {"line_width": 1, "line_color": "white", "line_dash": "dot"}
                (fig.add_vline if kind == "v" else fig.add_hline)(i - 0.5, **line)
    fig.update_layout(title=f"Representation similarity (mini-batch linear CKA, {cka['examples']} images): {name}",
                      height=520, width=600, yaxis_autorange="reversed")
    return fig


def landscape_figure(land: dict) -> go.Figure:
    fig = go.Figure(go.Contour(x=land["x"], y=land["y"], z=land["loss"], colorscale="Plasma"))
    fig.update_layout(title="Loss landscape (NLL + L2, filter-normalised directions)", height=420, width=520)
    return fig


def write_html(path: str | Path, title: str, figures: Sequence[go.Figure], intro_html: str = "",
               tables_html: str = "") -> Path:
    """One self-contained page: plotly.js inlined once, then every figure."""
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"figure-{i}"))
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        ".figure{margin:18px 0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{intro_html}"
        + "".join(f"<div class='figure'>{p}</div>" for p in parts)
        + tables_html
        + "</body></html>"
    )
    return atomic_write_text(path, page)
