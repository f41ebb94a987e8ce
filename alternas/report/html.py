"""``report.html`` of a study folder: the build-up trajectory, the chosen architecture, its diagnostics next to the
base's, Optuna's own figures when the study has Optuna trials, and the results table. One self-contained file."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from alternas.diagnostics.run import diagnostic_figures
from alternas.errors import ConfigError
from alternas.placement import Placement

_TABLE_COLUMNS = ["placement", "num_msa", "seed", "status", "val_acc", "test_acc", "val_nll", "val_ece", "lambda_max",
                  "nep", "ape", "delta_high_c1", "delta_high_c2", "delta_high_c3", "delta_high_c4", "params", "flops",
                  "images_per_s", "epochs", "epochs_trained", "wall_time", "key"]


def trajectory_figure(steps: list[dict]) -> go.Figure:
    """Accuracy vs #MSA like the paper's build-up plot: the accepted path solid, rejected candidates dashed
    branches from the placement they grew from."""
    fig = go.Figure()
    score = {s["placement"]: s["score"] for s in steps}
    msa = {s["placement"]: s["num_msa"] for s in steps}
    path = [s for s in steps if s["decision"] in ("start", "accept") and s["score"] is not None]
    fig.add_trace(go.Scatter(
        x=[s["num_msa"] for s in path], y=[s["score"] for s in path], mode="lines+markers+text", name="accepted",
        line={"color": "#1f4e9a", "width": 3}, marker={"size": 10},
        error_y={"type": "data", "array": [s["score_sd"] or 0 for s in path], "visible": True},
        text=[Placement.parse(s["placement"]).describe() for s in path], textposition="top left",
        hovertext=[f"step {s['step']}: {s['placement']}" for s in path], hoverinfo="text+y",
    ))
    for s in steps:
        if s["decision"] != "reject" or s["score"] is None or s["parent"] not in score:
            continue
        fig.add_trace(go.Scatter(
            x=[msa[s["parent"]], s["num_msa"]], y=[score[s["parent"]], s["score"]], mode="lines+markers",
            line={"dash": "dash", "color": "#c0504d"}, marker={"symbol": "x", "size": 9}, showlegend=False,
            hovertext=["", f"step {s['step']}: {s['placement']} (rejected)"], hoverinfo="text+y",
        ))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"dash": "dash", "color": "#c0504d"},
                             name="rejected"))
    fig.update_layout(title="Build-up trajectory", xaxis_title="number of MSA blocks",
                      yaxis_title="validation accuracy (%)", height=460, xaxis={"dtick": 1})
    return fig


def placement_figure(placement: str, title: str) -> go.Figure:
    """Stages x blocks grid, Conv and MSA coloured."""
    p = Placement.parse(placement)
    width = max(p.depths)
    z = [[(1 if ch == "M" else 0) for ch in stage] + [None] * (width - len(stage)) for stage in p.stages]
    text = [[("MSA" if ch == "M" else "Conv") for ch in stage] + [""] * (width - len(stage)) for stage in p.stages]
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", x=[f"block {i + 1}" for i in range(width)],
        y=[f"c{s + 1}" for s in range(p.num_stages)], colorscale=[[0, "#dfe7f3"], [1, "#7f7f7f"]], showscale=False,
        xgap=3, ygap=3, zmin=0, zmax=1,
    ))
    fig.update_layout(title=f"{title}: {placement}", height=120 + 45 * p.num_stages, yaxis={"autorange": "reversed"})
    return fig


def _diagnostics_of(study_dir: Path, keys: list[str]) -> dict | None:
    for key in keys:
        path = study_dir / "candidates" / key / "diagnostics" / "diagnostics.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _results_table(study_dir: Path) -> tuple[str, pd.DataFrame | None]:
    path = study_dir / "results.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return "<p>No candidates evaluated yet.</p>", None
    frame = pd.read_csv(path)
    columns = [c for c in _TABLE_COLUMNS if c in frame.columns]
    frame = frame[columns].sort_values("val_acc", ascending=False, na_position="last")
    return "<h2>Results</h2>" + frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0), frame


def build_report(study_dir: str | Path, extra_figures: list[go.Figure] | None = None) -> Path:
    """Write ``study_dir/report.html`` from what the folder holds now (a running study works too)."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ConfigError(f"study folder {study_dir} does not exist")
    figures: list[go.Figure] = []
    intro: list[str] = []
    trajectory = _read(study_dir / "trajectory.json")
    if trajectory and trajectory["steps"]:
        steps = trajectory["steps"]
        figures.append(trajectory_figure(steps))
        best = trajectory["best"]
        figures.append(placement_figure(best, "Chosen architecture"))
        start = steps[0]
        best_step = next((s for s in steps if s["placement"] == best), start)
        intro.append(f"<p>Build-up: {len(steps)} placements evaluated; start <code>{html.escape(start['placement'])}"
                     f"</code> ({_fmt(start['score'])}%), best <code>{html.escape(best)}</code> "
                     f"({_fmt(best_step['score'])}%).</p>")
        compared = {}
        for label, step in (("start " + start["placement"], start), ("best " + best, best_step)):
            diag = _diagnostics_of(study_dir, step.get("keys", []))
            if diag:
                compared[label] = diag
        if compared:
            figures += diagnostic_figures(compared)
    figures += extra_figures or []
    table, _ = _results_table(study_dir)
    if not figures and table.startswith("<p>No"):
        intro.append("<p>Nothing to report yet: no candidate has finished.</p>")
    from alternas.diagnostics.figures import write_html

    return write_html(study_dir / "report.html", f"alternas study: {study_dir.name}", figures,
                      intro_html="".join(intro), tables_html=table)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
