"""Plotly figures of the diagnostics, and a writer for one self-contained HTML page of figures."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

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


def fourier_figure(profiles: dict[str, list[dict]]) -> go.Figure:
    """Δ log amplitude at the highest frequency vs normalised depth, one line per model; plus the full curves of
    the first model coloured by depth."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Δ log amplitude at 1.0π vs depth",
                                                        "Δ log amplitude vs frequency"))
    for name, units in profiles.items():
        fig.add_trace(go.Scatter(x=[u["depth"] for u in units], y=[u["delta_high"] for u in units],
                                 mode="lines+markers", name=name, text=[u["name"] for u in units]), row=1, col=1)
    first = next(iter(profiles.values()), [])
    _shade_units(fig, first, row=1, col=1)
    colours = sample_colorscale("Plasma", [u["depth"] * 0.9 for u in first]) if first else []
    for u, colour in zip(first, colours):
        fig.add_trace(go.Scatter(x=u["frequencies"], y=u["delta_log_amplitude"], mode="lines", line={"color": colour},
                                 name=u["name"], showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="normalised depth", row=1, col=1)
    fig.update_xaxes(title_text="frequency (×π)", row=1, col=2)
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


def hessian_figure(spectra: dict[str, list[float]]) -> go.Figure:
    """Histograms of the batch-wise top eigenvalues, negative and positive parts in separate panels."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("negative eigenvalues", "positive eigenvalues"),
                        column_widths=[0.35, 0.65])
    for name, values in spectra.items():
        fig.add_trace(go.Histogram(x=[v for v in values if v < 0], name=f"{name} (λ<0)", opacity=0.6), row=1, col=1)
        fig.add_trace(go.Histogram(x=[v for v in values if v >= 0], name=name, opacity=0.6), row=1, col=2)
    fig.update_layout(title="Hessian max-eigenvalue spectrum", barmode="overlay", height=380)
    fig.update_xaxes(title_text="eigenvalue")
    return fig


def noise_figure(results: dict[str, dict]) -> go.Figure:
    fig = go.Figure()
    for name, r in results.items():
        fig.add_trace(go.Scatter(x=r["frequencies"], y=r["delta_acc"], mode="lines+markers", name=name))
    fig.update_layout(title="Robustness to band-limited noise", xaxis_title="noise frequency (×π)",
                      yaxis_title="Δ accuracy (pp)", height=380)
    return fig


def lesion_figure(rows: list[dict]) -> go.Figure:
    colours = ["grey" if r["kind"] == "msa" else "steelblue" for r in rows]
    fig = go.Figure(go.Bar(x=[r["name"] for r in rows], y=[r["delta_acc"] for r in rows], marker_color=colours))
    fig.update_layout(title="Lesion study: accuracy change when a block is removed (grey: MSA)",
                      yaxis_title="Δ accuracy (pp)", height=380)
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
