"""How far a study's answer depends on its seeds (``alternas bench decisions``): its build-up run on disjoint seed
pools, minutes per pool."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alternas.search.policy import Step
    from alternas.search.study import StudyConfig
    from alternas.search.table import Table


def _epochs_trained(study_dir) -> int:
    """Every epoch the study's runs trained, finished or not (a screened child stops early, with no result)."""
    import json

    return sum(len(json.loads(p.read_text()).get("history", [])) for p in study_dir.glob("candidates/*/metrics.json"))


def graded_by_table(table: Table, seeds: Sequence[int], steps: list[Step], final: str, min_gain: float) -> dict:
    """One pool's answers against a table, judged by the table's seeds outside the pool only: the final's regret
    to the held-out best (pp, with its 90 % interval; biased up, since the best is picked on the seeds that measure
    it), the same regret cross-fitted (biased down: ``replay.cross_fit_regret``), and its decisions graded as
    ``alternas bench search`` grades a replay's (a decision whose gain the held-out seeds cannot place on one side
    of ``min_gain`` is ungraded)."""
    from alternas.search.replay import Outcome, Truth

    truth = Truth(table, list(seeds))
    outcome = Outcome(final)
    truth.grade_steps(outcome, steps, min_gain)
    regret, low, high = truth.gain(truth.best, final)
    cross_fit = truth.cross_fit_regret(final)
    return {"judged_by": truth.seeds, "held_out_best": truth.best,
            "regret_pp": regret, "regret_ci": [low, high], "regret_cross_fit_pp": cross_fit,
            "within_min_gain": regret <= min_gain,  # the final is within min_gain of the held-out best's mean
            "cross_fit_within_min_gain": cross_fit <= min_gain,  # ... of the best picked on other held-out seeds
            "not_confidently_worse": low <= min_gain,  # ... or the held-out seeds cannot say it is further
            "accepted_helping": outcome.decisions_true - outcome.rejects_true, "helping": outcome.decisions_true,
            "false_accepts": outcome.accepts_null, "null_decisions": outcome.decisions_null,
            "ungraded": outcome.ungraded}


def _gradable(table: Table, config: StudyConfig, pools: list[tuple[int, ...]]) -> None:
    """Refuse, before anything trains, a table that cannot grade these pools: other settings, runs missing, a
    placement the build-up can reach missing, or a pool that leaves fewer than 2 of its seeds to judge by."""
    from alternas.errors import ConfigError
    from alternas.search.replay import require_complete, table_lookup
    from alternas.search.table import reachable_placements, start_placement

    table_lookup(table, config)
    require_complete(table)
    lacking = [str(p) for p in reachable_placements(start_placement(config)) if str(p) not in table.placements]
    if lacking:
        raise ConfigError(f"the table lacks {len(lacking)} of the placements the build-up can reach (e.g. "
                          f"{lacking[0]}); compute it with `alternas table --study` on this study")
    for k, seeds in enumerate(pools):
        if len(set(table.seeds) - set(seeds)) < 2:
            raise ConfigError(f"pool {k} (seeds {seeds[0]}-{seeds[-1]}) leaves fewer than 2 of the table's seeds "
                              f"{table.seeds} to judge it by; use fewer pools or a table with more seeds")


_GRADE_TOTALS = ("accepted_helping", "helping", "false_accepts", "null_decisions", "ungraded")


def decision_agreement(study: str = "studies/quickstart.yaml", pools: int = 5, out: str | None = None,
                       overrides: dict | None = None, log: Callable[[str], None] = print,
                       table: str | None = None) -> dict:
    """Run the build-up of ``study`` on ``pools`` disjoint seed pools (each as large as the study's) and measure
    how far its answer depends on the seeds: agreement of the final placements, seeds and candidate-epochs per
    decision, the start placement's spread over seeds, and wall time. Each pool has its own study folder under
    ``out`` (default ``studies/<name>-decisions``), so an interrupted benchmark resumes. With ``table`` (a folder
    of ``alternas table`` trained with the study's data and recipe) each pool's answers are also graded against
    its truth (``graded_by_table``)."""
    from collections import Counter
    from pathlib import Path

    from alternas.search import load_study, run_buildup, with_overrides
    from alternas.search.selection import load_results
    from alternas.search.table import Table

    config = load_study(study)
    if overrides:
        config = with_overrides(config, overrides)
    size = len(config.seeds)
    disjoint = [tuple(range(k * size, (k + 1) * size)) for k in range(pools)]
    truth_table = Table.load(table) if table else None
    if truth_table is not None:
        _gradable(truth_table, config, disjoint)
    root = Path(out) if out else Path("studies") / f"{config.name}-decisions"
    runs = []
    for k, seeds in enumerate(disjoint):
        # each pool is its own search: its own study in a shared storage too (one policy, one seed pool per study)
        pool_config = replace(config, seeds=seeds, output=str(root / f"pool-{k}"),
                              optuna=replace(config.optuna, study_name=f"{config.optuna.study_name or config.name}"
                                                                       f"-pool-{k}"))
        began = time.perf_counter()
        outcome = run_buildup(pool_config, quiet=True, log=lambda _: None)
        wall = time.perf_counter() - began
        decided = [s for s in outcome.steps if s.decision != "start"]
        results = load_results(root / f"pool-{k}")
        start_accs = [r.val_acc for r in results.values()
                      if r.placement == outcome.steps[0].placement and r.status == "completed" and r.parent is None]
        runs.append({
            "seeds": list(seeds), "best": outcome.best, "wall_s": wall, "decisions": len(decided),
            "steps": [[s.placement, s.decision, s.decided_by] for s in decided],
            "seeds_per_decision": statistics.fmean(len(s.seeds_used) for s in decided) if decided else 0.0,
            "candidate_epochs": _epochs_trained(root / f"pool-{k}"),
            "budget_decided": sum(s.decided_by == "seed budget" for s in decided),
            "screened": sum(s.decided_by == "screen" for s in decided),
            "start_acc_sd": statistics.stdev(start_accs) if len(start_accs) > 1 else 0.0,
            "start_acc_mean": statistics.fmean(start_accs) if start_accs else None,
        })
        r = runs[-1]
        log(f"pool {k} seeds {seeds[0]}-{seeds[-1]}: best {r['best']}  {r['decisions']} decisions, "
            f"{r['seeds_per_decision']:.2f} seeds/decision ({r['budget_decided']} by seed budget, {r['screened']} "
            f"screened), {r['candidate_epochs']} candidate-epochs, start {r['start_acc_mean']:.2f} ± "
            f"{r['start_acc_sd']:.2f} over {len(start_accs)} seeds, {wall:.0f} s")
        if truth_table is not None:
            g = r["graded"] = graded_by_table(truth_table, seeds, outcome.steps, outcome.best,
                                              config.buildup.min_gain)
            log(f"    judged by the table's seeds {','.join(map(str, g['judged_by']))}: regret {g['regret_pp']:.2f} pp "
                f"[{g['regret_ci'][0]:+.2f}, {g['regret_ci'][1]:+.2f}] to {g['held_out_best']} (cross-fitted "
                f"{g['regret_cross_fit_pp']:.2f} pp); helping MSAs "
                f"accepted {g['accepted_helping']}/{g['helping']}, false accepts "
                f"{g['false_accepts']}/{g['null_decisions']}, {g['ungraded']} decisions too close to call")
    best, count = Counter(r["best"] for r in runs).most_common(1)[0]
    decisions = sum(r["decisions"] for r in runs)
    graded = [r["graded"] for r in runs if "graded" in r]
    totals = {"table_dir": table, "pools_within_min_gain": sum(g["within_min_gain"] for g in graded),
              "pools_cross_fit_within_min_gain": sum(g["cross_fit_within_min_gain"] for g in graded),
              "pools_not_confidently_worse": sum(g["not_confidently_worse"] for g in graded),
              **{key: sum(g[key] for g in graded) for key in _GRADE_TOTALS}}
    return {
        **({"graded": totals} if graded else {}),
        "study": study, "pools": pools, "pool_size": size, "runs": runs, "modal_best": best,
        "agreement": count / pools,
        "seeds_per_decision": sum(r["seeds_per_decision"] * r["decisions"] for r in runs) / max(decisions, 1),
        "candidate_epochs_per_decision": sum(r["candidate_epochs"] for r in runs) / max(decisions, 1),
        "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
        "wall_s_max": max(r["wall_s"] for r in runs),
    }


def describe_agreement(r: dict) -> str:
    """One line of ``decision_agreement``'s result."""
    return (f"decisions: {r['study']} on {r['pools']} disjoint pools of {r['pool_size']} seeds: final "
            f"placement {r['modal_best']} in {r['agreement']:.0%} of pools; "
            f"{r['seeds_per_decision']:.2f} seeds and {r['candidate_epochs_per_decision']:.1f} "
            f"candidate-epochs per decision; wall time {r['wall_s_mean']:.0f} s per pool "
            f"(max {r['wall_s_max']:.0f} s)"
            + _describe_graded(r.get("graded")))


def _describe_graded(g: dict | None) -> str:
    if g is None:
        return ""
    return (f"; judged by {g['table_dir']}: final within min_gain of the held-out best in "
            f"{g['pools_within_min_gain']} pools ({g['pools_cross_fit_within_min_gain']} cross-fitted), not "
            f"confidently further in {g['pools_not_confidently_worse']}; "
            f"helping MSAs accepted {g['accepted_helping']}/{g['helping']}, false accepts "
            f"{g['false_accepts']}/{g['null_decisions']} ({g['ungraded']} decisions too close to call)")
