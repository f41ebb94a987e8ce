"""Choosing the candidate a study recommends, for export and reports."""

from __future__ import annotations

import json
from pathlib import Path

from alternas.errors import ConfigError
from alternas.search.evaluator import CandidateResult


def load_results(study_dir: str | Path) -> dict[str, CandidateResult]:
    """Every candidate result of a study folder, by key."""
    root = Path(study_dir) / "candidates"
    return {p.parent.name: CandidateResult.from_dict(json.loads(p.read_text())) for p in root.glob("*/result.json")}


def best_buildup_run(study_dir: str | Path) -> CandidateResult:
    """The build-up's chosen placement, and of its runs (one per seed) the one with the best validation accuracy."""
    study_dir = Path(study_dir)
    path = study_dir / "trajectory.json"
    if not path.is_file():
        raise ConfigError(f"{study_dir} has no build-up trajectory; run `alternas buildup` for it first")
    trajectory = json.loads(path.read_text())
    results = load_results(study_dir)
    best = trajectory["best"]
    keys = next((s["keys"] for s in trajectory["steps"] if s["placement"] == best), [])
    runs = [results[k] for k in keys if k in results and results[k].status == "completed"]
    if not runs:
        raise ConfigError(f"{study_dir}: the best placement {best} has no finished run to export")
    return max(runs, key=lambda r: r.val_acc or 0.0)
