"""``report.html`` of a study folder: the build-up trajectory, the chosen architecture, its diagnostics next to the
base's, Optuna's own figures when the study has Optuna trials, and the results table. One self-contained file.

Why one module over the ~400-line guide: one page, each of its sections and figures a short function of its own.
"""

from __future__ import annotations

import contextlib
import html
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from alternas.claims import claims_figure, claims_html, seed_interval, study_claims
from alternas.diagnostics.run import diagnostic_figures
from alternas.errors import AlternasError, ConfigError
from alternas.placement import Placement
from alternas.search.study import StudyFolder

_TABLE_COLUMNS = ["placement", "num_msa", "seed", "status", "val_acc", "test_acc", "val_nll", "val_ece", "robustness",
                  "lambda_max", "nep", "ape", "delta_high_c1", "delta_high_c2", "delta_high_c3", "delta_high_c4",
                  "params", "flops", "images_per_s", "epochs", "epochs_trained", "wall_time", "key"]


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


def _mean_interval(values: pd.Series, confidence: float) -> tuple[float, float]:
    """Mean over seeds and the half-width of its Student-t interval (``seed_interval``; 0 with one seed)."""
    estimate = seed_interval(dict(enumerate(values)), confidence)
    lo, hi = estimate.ci
    return estimate.mean, (hi - lo) / 2 if np.isfinite(lo) else 0.0


def robustness_figure(results: pd.DataFrame, steps: list[dict], best: str, confidence: float) -> go.Figure | None:
    """The paper's §4.1 figure: validation accuracy against robustness (mean accuracy on corrupted images), one point
    per placement (mean over its seeds, t-intervals at ``confidence``), the build-up's accepted path through it, the
    start and the final marked. None when no run was scored on corrupted images."""
    if "robustness" not in results.columns:
        return None
    placement_of = dict(zip(results["key"], results["placement"]))
    control = results["parent"].map(placement_of) == results["placement"]  # a warm start's continued incumbent
    done = results[(results["status"] == "completed") & results["robustness"].notna() & ~control]
    if done.empty:
        return None
    source = done["robustness_source"].mode().iloc[0]  # scores of two sources are never drawn together
    left_out = int((done["robustness_source"] != source).sum())
    done = done[done["robustness_source"] == source]
    points = {}
    for placement, runs in done.groupby("placement", sort=False):
        (acc, acc_half), (rob, rob_half) = (_mean_interval(runs[c], confidence) for c in ("val_acc", "robustness"))
        points[placement] = (acc, acc_half, rob, rob_half, len(runs))
    fig = go.Figure(go.Scatter(
        x=[p[0] for p in points.values()], y=[p[2] for p in points.values()], mode="markers+text", name="placements",
        text=[Placement.parse(k).describe() for k in points], textposition="bottom right", textfont={"size": 10},
        error_x={"type": "data", "array": [p[1] for p in points.values()]},
        error_y={"type": "data", "array": [p[3] for p in points.values()]}, marker={"size": 9, "color": "#7f7f7f"},
        hovertext=[f"{k} ({v[4]} seeds)" for k, v in points.items()], hoverinfo="text+x+y"))
    path = [s["placement"] for s in steps if s["decision"] in ("start", "accept") and s["placement"] in points]
    if path:
        fig.add_trace(go.Scatter(x=[points[p][0] for p in path], y=[points[p][2] for p in path], mode="lines",
                                 name="build-up path", line={"color": "#1f4e9a", "width": 2}))
    start = steps[0]["placement"]
    marked = [("start = final", start, "star")] if start == best else [("start", start, "star"),
                                                                        ("final", best, "diamond")]
    for label, placement, symbol in marked:
        if placement in points:
            fig.add_trace(go.Scatter(x=[points[placement][0]], y=[points[placement][2]], mode="markers+text",
                                     name=f"{label} {placement}", text=[label], textposition="top center",
                                     marker={"symbol": symbol, "size": 16, "color": "#1f4e9a"}))
    other = f"; {left_out} run(s) scored on other corrupted images left out" if left_out else ""
    fig.update_layout(title=f"Accuracy vs robustness ({source}; {round(confidence * 100)}% intervals over seeds"
                            f"{other})",
                      xaxis_title="validation accuracy (%)", yaxis_title="mean accuracy on corrupted images (%)",
                      height=480)
    return fig


_DECIDED_BY_MARKERS = {"confidence": "circle", "seed budget": "diamond-open", "screen": "triangle-down",
                       "failure": "x", "threshold": "square"}


def gain_figure(steps: list[dict], min_gain: float) -> go.Figure:
    """Each decision's paired gain over its incumbent with its interval: what the accept/reject rests on. Steps
    rejected because the seed budget ran out (undecided) are drawn open."""
    fig = go.Figure()
    decided = [s for s in steps if s["decision"] != "start" and s.get("gain") is not None]
    for decision, colour in (("accept", "#1f4e9a"), ("reject", "#c0504d")):
        chosen = [s for s in decided if s["decision"] == decision]
        if not chosen:
            continue
        ci = [s.get("gain_ci") or [s["gain"], s["gain"]] for s in chosen]
        fig.add_trace(go.Scatter(
            x=[f"{s['step']}: {s['placement']}" for s in chosen], y=[s["gain"] for s in chosen], mode="markers",
            name=decision, marker={"color": colour, "size": 11,
                                   "symbol": [_DECIDED_BY_MARKERS.get(s.get("decided_by"), "circle") for s in chosen]},
            error_y={"type": "data", "symmetric": False, "array": [hi - s["gain"] for s, (_, hi) in zip(chosen, ci)],
                     "arrayminus": [s["gain"] - lo for s, (lo, _) in zip(chosen, ci)], "visible": True},
            hovertext=[f"vs {s.get('incumbent')}<br>seeds {s.get('seeds_used')}<br>P(gain > {min_gain:g}) = "
                       f"{_fmt(s.get('p_gain'))}<br>decided by {s.get('decided_by')}" for s in chosen],
            hoverinfo="text+y",
        ))
    fig.add_hline(y=min_gain, line={"dash": "dot", "color": "#555"}, annotation_text=f"min_gain {min_gain:g} pp")
    fig.update_layout(title="Paired gain over the incumbent, the decision's interval: accept above, reject below "
                            "min_gain (open: undecided at the seed budget; triangle: stopped at screening)",
                      xaxis_title="step: placement",
                      yaxis_title="validation accuracy gain (pp)", height=460)
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


def _results_frame(study_dir: Path) -> pd.DataFrame | None:
    """``results.csv`` as a table (None before any candidate finished)."""
    path = study_dir / "results.csv"
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else None


def _results_table(study_dir: Path) -> tuple[str, pd.DataFrame | None]:
    frame = _results_frame(study_dir)
    if frame is None:
        return "<p>No candidates evaluated yet.</p>", None
    trajectory = _read(study_dir / "trajectory.json") or {}
    unused = set(trajectory.get("speculative_unused", []))
    if unused:  # trained ahead by an idle build-up worker, and no decision needed it
        frame["status"] = [f"{s} (speculative, unused)" if k in unused else s
                           for k, s in zip(frame["key"], frame["status"])]
    columns = [c for c in _TABLE_COLUMNS if c in frame.columns]
    frame = frame[columns].sort_values("val_acc", ascending=False, na_position="last")
    return "<h2>Results</h2>" + frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0), frame


def _paired_cells(theirs: list[Any], best: list[Any], seeds: list[int], confidence: float) -> str:
    """Gain, interval and seeds of one row of the paired table, or why the row has none."""
    from alternas.errors import AlternasError
    from alternas.search.decision import compare_paired
    from alternas.search.evaluated import same_split

    if not seeds:
        return "<td colspan=3>no shared seed with the best trial</td>"
    try:
        same_split([*theirs, *best])
    except AlternasError as err:
        return f"<td colspan=3>not comparable: {html.escape(str(err))}</td>"
    c = compare_paired(np.stack([e.at() for e in theirs]), np.stack([e.at() for e in best]), 0.0, confidence)
    return f"<td>{c.gain:+.2f}</td><td>[{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]</td><td>{', '.join(map(str, seeds))}</td>"


def placement_heatmap(placements: list[str], title: str) -> go.Figure:
    """How often each block is an MSA among ``placements`` (stages x blocks)."""
    parsed = [Placement.parse(p) for p in placements]
    stages = max(p.num_stages for p in parsed)
    width = max(max(p.depths) for p in parsed)
    share = [[0.0] * width for _ in range(stages)]
    present = [[0] * width for _ in range(stages)]
    for p in parsed:
        for s, i, kind in p.blocks():
            present[s][i] += 1
            share[s][i] += kind == "msa"
    z = [[share[s][i] / present[s][i] if present[s][i] else None for i in range(width)] for s in range(stages)]
    fig = go.Figure(go.Heatmap(z=z, x=[f"block {i + 1}" for i in range(width)], y=[f"c{s + 1}" for s in range(stages)],
                               colorscale="Greys", zmin=0, zmax=1, texttemplate="%{z:.2f}",
                               colorbar={"title": "MSA share"}, xgap=3, ygap=3))
    fig.update_layout(title=title, height=140 + 45 * stages, yaxis={"autorange": "reversed"})
    return fig


def _optuna_section(study_dir: Path, storage: str | None) -> tuple[list[go.Figure], str]:
    """Optuna's own plotly figures (not redrawn), the placement heat map and the best trials' diagnostics."""
    import optuna
    from optuna.trial import TrialState

    from alternas.search.optuna_search import OBJECTIVES, load_optuna_study
    from alternas.search.storage import redact

    config = StudyFolder(study_dir).load_config()
    study = load_optuna_study(config, storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    states = [t.state.name for t in study.trials]
    names = study.metric_names or list(config.optuna.objectives)
    where = redact(storage or config.optuna.storage or "journal file in the study folder")
    intro = (f"<p>Optuna study <code>{html.escape(study.study_name)}</code> ({html.escape(where)}): "
             f"{len(states)} trials, {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
             f"{states.count('FAIL')} failed; objectives {', '.join(names)}.</p>")
    if not complete:
        return [], intro
    vis = optuna.visualization
    figs: list[go.Figure] = []
    multi = len(names) > 1
    if multi:
        figs.append(vis.plot_pareto_front(study, target_names=names))
        ranked = study.best_trials
    else:
        figs.append(vis.plot_optimization_history(study, target_name=names[0]))
        reverse = OBJECTIVES.get(names[0], ("", "maximize"))[1] == "maximize"
        ranked = sorted(complete, key=lambda t: t.value, reverse=reverse)
    for i, name in enumerate(names):
        figs.append(vis.plot_parallel_coordinate(study, target=(lambda t, i=i: t.values[i]) if multi else None,
                                                 target_name=name))
        if len(complete) >= 2:
            figs.extend(_importances(study, i if multi else None, name))
    top = ranked[: max(3, len(ranked) // 4)]
    figs.append(placement_heatmap([t.user_attrs["placement"] for t in top],
                                  f"MSA placement among the top {len(top)} trials"))
    diag = {}
    for t in ranked[:2]:
        d = _diagnostics_of(study_dir, t.user_attrs.get("keys", []))
        if d:
            diag[f"trial {t.number} {t.user_attrs['placement']}"] = d
    if diag:
        figs += diagnostic_figures(diag)
    _attach_to_dashboard(study, figs)
    return figs, intro + _paired_table(study_dir, ranked[: max(5, len(top))], config.buildup.confidence)


def _paired_table(study_dir: Path, ranked: list[Any], confidence: float) -> str:
    """The top trials' paired gains against the best trial (on the seeds both trained), and the build-up's choice
    against the same best when the folder has one: differences among the top trials are often inside the noise."""
    from alternas.search.evaluated import Evaluated
    from alternas.search.selection import load_results

    results = load_results(study_dir)

    def correct_by_seed(keys: list[str]) -> dict[int, Evaluated]:
        runs = [results[k] for k in keys if k in results and results[k].status == "completed"]
        return {r.seed: Evaluated.from_run(r) for r in runs if (Path(r.run_dir) / "evidence.npz").is_file()}

    best = correct_by_seed(ranked[0].user_attrs.get("keys", []))
    rows = [(f"trial {t.number}", t.user_attrs.get("placement", "?"), correct_by_seed(t.user_attrs.get("keys", [])))
            for t in ranked[1:]]
    trajectory = _read(study_dir / "trajectory.json")
    if trajectory:
        step = next((s for s in trajectory["steps"] if s["placement"] == trajectory["best"]), None)
        if step:
            rows.append(("build-up choice", trajectory["best"], correct_by_seed(step.get("keys", []))))
    body = []
    for label, placement, theirs in rows:
        seeds = sorted(set(theirs) & set(best))
        body.append(f"<tr><td>{html.escape(label)}</td><td><code>{html.escape(placement)}</code></td>"
                    f"{_paired_cells([theirs[s] for s in seeds], [best[s] for s in seeds], seeds, confidence)}</tr>")
    if not body:
        return ""
    head = (f"<h3>Paired gain against the best trial #{ranked[0].number} "
            f"<code>{html.escape(ranked[0].user_attrs.get('placement', '?'))}</code></h3>"
            f"<table class='paired'><tr><th></th><th>placement</th><th>gain (pp)</th>"
            f"<th>{confidence:.0%} interval</th><th>shared seeds</th></tr>")
    return head + "".join(body) + "</table>"


def _importances(study: Any, objective: int | None, name: str) -> list[go.Figure]:
    """Optuna's parameter-importance figure for one objective. Its default evaluator (PED-ANOVA) ranks parameters by
    how they reach *low* values of a custom target, so a maximised objective of a multi-objective study is passed
    negated; the warning that says so is then answered and silenced."""
    import optuna

    target = None
    if objective is not None:
        sign = -1.0 if study.directions[objective] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = lambda t: sign * t.values[objective]  # noqa: E731
    with warnings.catch_warnings(), contextlib.suppress(RuntimeError, ValueError):  # too few distinct trials yet
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low")
        return [optuna.visualization.plot_param_importances(study, target=target, target_name=name)]
    return []


def _attach_to_dashboard(study: Any, figs: list[go.Figure]) -> None:
    """Make the figures visible in optuna-dashboard too, when it is installed. Fixed ids: a report built again
    (each worker builds one at its end) replaces the study's figures instead of adding copies."""
    try:
        from optuna_dashboard import save_plotly_graph_object
    except ImportError:
        return
    for i, fig in enumerate(figs):
        save_plotly_graph_object(study, fig, graph_object_id=f"alternas-report-{i}")


def build_report(study_dir: str | Path, extra_figures: list[go.Figure] | None = None,
                 storage: str | None = None) -> Path:
    """Write ``study_dir/report.html`` from what the folder holds now (a running study works too)."""
    from alternas.search.optuna_search import has_optuna

    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ConfigError(f"study folder {study_dir} does not exist")
    figures: list[go.Figure] = []
    intro: list[str] = []
    claims_section = ""
    trajectory = _read(study_dir / "trajectory.json")
    if trajectory and trajectory["steps"]:
        steps = trajectory["steps"]
        figures.append(trajectory_figure(steps))
        if any(s.get("gain_ci") for s in steps):
            figures.append(gain_figure(steps, trajectory.get("min_gain", 0.0)))
        best = trajectory["best"]
        results = _results_frame(study_dir)
        robust = None if results is None else robustness_figure(results, steps, best,
                                                                trajectory.get("confidence", 0.9))
        if robust is not None:
            figures.append(robust)
        figures.append(placement_figure(best, "Chosen architecture"))
        start = steps[0]
        best_step = next((s for s in steps if s["placement"] == best), start)
        intro.append(f"<p>Build-up: {len(steps)} placements evaluated; start <code>{html.escape(start['placement'])}"
                     f"</code> ({_fmt(start['score'])}%), best <code>{html.escape(best)}</code> "
                     f"({_fmt(best_step['score'])}%).{_decision_summary(trajectory)}</p>")
        compared = {}
        for label, step in (("start " + start["placement"], start), ("best " + best, best_step)):
            diag = _diagnostics_of(study_dir, step.get("keys", []))
            if diag:
                compared[label] = diag
        if compared:
            figures += diagnostic_figures(compared)
        try:
            claims = study_claims(study_dir)
            figures.append(claims_figure(claims))
            claims_section = claims_html(claims)
        except AlternasError as err:  # a damaged study.yaml, runs of two splits: said, never failing the search
            claims_section = f"<p>The paper's claims could not be checked: {html.escape(str(err))}</p>"
    if storage or has_optuna(study_dir) or _configured_storage(study_dir):
        try:
            optuna_figs, optuna_intro = _optuna_section(study_dir, storage)
            figures += optuna_figs
            intro.append(optuna_intro)
        except ConfigError:  # the storage holds only the build-up's evaluations
            if storage:
                raise
    figures += extra_figures or []
    table, _ = _results_table(study_dir)
    if not figures and table.startswith("<p>No"):
        intro.append("<p>Nothing to report yet: no candidate has finished.</p>")
    from alternas.diagnostics.figures import write_html

    return write_html(study_dir / "report.html", f"alternas study: {study_dir.name}", figures,
                      intro_html="".join(intro), tables_html=claims_section + table)


def _decision_summary(trajectory: dict) -> str:
    """How the decisions were reached: seeds per decision and how many the seed budget decided."""
    decided = [s for s in trajectory["steps"] if s["decision"] != "start" and s.get("decided_by")]
    if not decided:
        return ""
    counts = {k: sum(s["decided_by"] == k for s in decided) for k in dict.fromkeys(s["decided_by"] for s in decided)}
    seeds = sum(len(s.get("seeds_used") or []) for s in decided) / len(decided)
    how = ", ".join(f"{n} by {k}" for k, n in counts.items())
    return (f" Each child was compared with the incumbent paired by seed and validation example, at confidence "
            f"{trajectory.get('confidence', 0.9):g} for a gain above {trajectory.get('min_gain', 0):g} pp: "
            f"{len(decided)} decisions ({html.escape(how)}), {seeds:.1f} seeds per decision on average.")


def _configured_storage(study_dir: Path) -> str | None:
    if not (study_dir / "study.yaml").is_file():
        return None
    return StudyFolder(study_dir).load_config().optuna.storage  # a damaged file: one line naming it


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is damaged ({err}); run the search again to rewrite it") from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
