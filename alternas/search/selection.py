"""Choosing the candidate a study recommends, for export and reports."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from alternas.errors import ConfigError
from alternas.search.evaluator import CandidateResult, read_results

_SAID_DAMAGED: set[Path] = set()  # said once per process: claims build a report that reads the same files


def load_results(study_dir: str | Path, say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)
                 ) -> dict[str, CandidateResult]:
    """Every readable candidate result of a study folder, by key. A damaged ``result.json`` is left out, and
    ``say`` tells how many were, so a report or claim never rests on fewer runs silently."""
    damaged: list[Path] = []
    results = read_results(Path(study_dir) / "candidates", damaged)
    unsaid = [p for p in damaged if p.resolve() not in _SAID_DAMAGED]
    _SAID_DAMAGED.update(p.resolve() for p in unsaid)
    if unsaid:
        shown = ", ".join(str(p.relative_to(study_dir)) for p in unsaid[:3]) + (", ..." if len(unsaid) > 3 else "")
        say(f"{study_dir}: {len(unsaid)} damaged result file(s) left out ({shown}); run the study's search command "
            "again to restore them from its storage, or to evaluate them again")
    return results


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
        raise ConfigError(f"{study_dir}: the best placement {best} has no finished run to export (a lost "
                          "result.json is restored by running the same `alternas buildup` command again)")
    return max(runs, key=lambda r: r.val_acc or 0.0)


def optuna_run(study_dir: str | Path, trial: int | None = None, prefer: str | None = None,
               storage: str | None = None) -> CandidateResult:
    """A trial's best-seed run: trial ``trial``, else the best trial (multi-objective studies need ``prefer``,
    the objective that picks among the Pareto trials)."""
    from optuna.trial import TrialState

    from alternas.search.optuna_search import OBJECTIVES, load_optuna_study
    from alternas.search.study import StudyFolder

    config = StudyFolder(study_dir).load_config()
    study = load_optuna_study(config, storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if trial is not None:
        chosen = next((t for t in complete if t.number == trial), None)
        if chosen is None:
            raise ConfigError(f"trial {trial} is not a complete trial of {study.study_name}")
    elif len(study.directions) == 1:
        if not complete:
            raise ConfigError(f"{study.study_name} has no complete trial yet")
        chosen = study.best_trial
    else:
        names = study.metric_names or list(config.optuna.objectives)
        pareto = ", ".join(f"#{t.number} {t.user_attrs.get('placement')}" for t in study.best_trials)
        if prefer not in names:
            raise ConfigError(f"multi-objective study: choose with --prefer {'|'.join(names)} or --trial N; "
                              f"Pareto trials: {pareto}")
        i = names.index(prefer)
        sign = 1 if OBJECTIVES[prefer][1] == "maximize" else -1
        chosen = max(study.best_trials, key=lambda t: sign * t.values[i])
    results = load_results(study_dir)
    runs = [results[k] for k in chosen.user_attrs.get("keys", []) if k in results and results[k].status == "completed"]
    if not runs:
        raise ConfigError(f"trial {chosen.number} has no finished run to export")
    return max(runs, key=lambda r: r.val_acc or 0.0)


def chosen_run(study_dir: str | Path, trial: int | None = None, prefer: str | None = None) -> CandidateResult:
    """What ``alternas export --study`` exports: Optuna ``trial`` if given, else the build-up's final placement
    (or, for an Optuna-only study, its best trial, ``prefer`` deciding among several objectives)."""
    if trial is None and (Path(study_dir) / "trajectory.json").is_file():
        return best_buildup_run(study_dir)
    return optuna_run(study_dir, trial, prefer)
