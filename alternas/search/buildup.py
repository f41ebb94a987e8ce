"""The automated build-up rule (PAPER.md §3): a pure policy and the loop that drives it.

``BuildupPolicy`` knows nothing of training: it proposes a placement, is told its score, and decides. That makes it
testable on given accuracies (the paper's own trajectory) and makes the loop resumable: replaying the policy over
cached results reproduces every decision, then continues where the run stopped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from alternas.placement import Placement
from alternas.search.evaluator import CandidateResult, Evaluator
from alternas.search.study import StudyConfig, StudyFolder


@dataclass
class Step:
    """One row of the trajectory."""

    step: int
    placement: str
    parent: str | None
    stage: int | None  # 1-based stage the MSA was added to (None for the start)
    num_msa: int
    score: float | None  # mean validation accuracy over seeds (None if every seed failed)
    score_sd: float | None
    gain: float | None  # vs the best accepted so far
    decision: str  # start | accept | reject
    best_after: str


class BuildupPolicy:
    """State machine of the build-up rules.

    Rule 1: add one MSA alternately from the end of the current stage, starting at the last stage. Rule 2: when the
    gain is not above ``min_gain``, move to the previous stage and add its MSA to the best placement so far —
    unless ``patience`` allows more tries in this stage, stacked on the rejected candidate. A stage with no valid
    position left is skipped. Rule 3 (more heads later) lives in the base.
    """

    def __init__(self, start: Placement, min_gain: float = 0.0, patience: int = 0) -> None:
        self.min_gain, self.patience = min_gain, patience
        self.best: Placement | None = None
        self.best_score: float | None = None
        self.stage = start.num_stages - 1
        self._tip = start
        self._patience_left = patience
        self._pending: tuple[Placement, Placement | None, int | None] | None = (start, None, None)
        self.steps: list[Step] = []

    @property
    def proposal_parent(self) -> Placement | None:
        """The placement the current proposal was derived from (``None`` for the start)."""
        self.propose()
        return self._pending[1] if self._pending is not None else None

    def propose(self) -> Placement | None:
        """The next placement to evaluate, or ``None`` when the search is over."""
        if self._pending is not None:
            return self._pending[0]
        while self.stage >= 0:
            child = self._tip.add_msa(self.stage)
            if child is not None:
                self._pending = (child, self._tip, self.stage)
                return child
            self._leave_stage()
        return None

    def _leave_stage(self) -> None:
        self.stage -= 1
        self._tip = self.best if self.best is not None else self._tip
        self._patience_left = self.patience

    def observe(self, score: float | None, score_sd: float | None = None) -> Step:
        """Record the score (mean val accuracy; ``None`` = failed, which counts as no gain) of ``propose()``."""
        if self._pending is None:
            raise RuntimeError("observe() without a pending proposal")
        placement, parent, stage = self._pending
        self._pending = None
        if parent is None:  # the start placement
            self.best, self.best_score = placement, score
            decision, gain = "start", None
        else:
            gain = None if score is None or self.best_score is None else score - self.best_score
            if gain is not None and gain > self.min_gain:
                decision = "accept"
                self.best, self.best_score, self._tip = placement, score, placement
                self._patience_left = self.patience
            elif self._patience_left > 0:
                decision = "reject"
                self._patience_left -= 1
                self._tip = placement
            else:
                decision = "reject"
                self._leave_stage()
        step = Step(len(self.steps), str(placement), str(parent) if parent else None,
                    None if stage is None else stage + 1, placement.num_msa, score, score_sd, gain, decision,
                    str(self.best))
        self.steps.append(step)
        return step


def _mean_sd(results: list[CandidateResult]) -> tuple[float | None, float | None]:
    scores = [r.val_acc for r in results if r.status == "completed" and r.val_acc is not None]
    if not scores:
        return None, None
    return statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0


@dataclass
class BuildupOutcome:
    best: str
    steps: list[Step]
    candidates_evaluated: int
    candidate_epochs: int
    stopped_by: str  # finished | max_candidates | budget


def run_buildup(
    config: StudyConfig,
    *,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> BuildupOutcome:
    """Run (or resume) the build-up search of ``config``; writes the study folder as it goes."""
    folder = StudyFolder(config.output_dir)
    folder.lock()
    try:
        folder.save_config(config)
        evaluator = Evaluator(config, folder, quiet=quiet)
        b = config.buildup
        from alternas.models.bases import get_base

        start = Placement.parse(b.start) if b.start else Placement.all_conv(get_base(config.base).depths)
        policy = BuildupPolicy(start, min_gain=b.min_gain, patience=b.patience)
        results_by_placement: dict[str, list[CandidateResult]] = {}
        spent, epochs, stopped_by = 0.0, 0, "finished"
        began = time.perf_counter()
        while (placement := policy.propose()) is not None:
            if len(policy.steps) >= b.max_candidates:
                stopped_by = "max_candidates"
                break
            if b.budget_hours is not None and spent / 3600 >= b.budget_hours:
                stopped_by = "budget"
                break
            parent = policy.proposal_parent if b.warm_start else None
            runs = []
            for seed in config.seeds:
                parent_result = _best_run(results_by_placement.get(str(parent), []), seed) if parent else None
                log(f"[candidate {len(policy.steps) + 1}/<={b.max_candidates}] {placement}  "
                    f"({placement.describe()})  seed {seed}" + ("  warm start" if parent_result else ""))
                result = evaluator.evaluate(placement, seed, parent=parent_result)
                runs.append(result)
                spent += result.wall_time
                epochs += result.epochs_trained
                if result.status != "completed":
                    log(f"    {result.status}: {result.error}")
            results_by_placement[str(placement)] = runs
            score, sd = _mean_sd(runs)
            step = policy.observe(score, sd)
            gain = "" if step.gain is None else f"  gain {step.gain:+.2f}"
            score_text = "n/a" if score is None else f"{score:.2f} ± {sd:.2f}"
            log(f"    val acc {score_text}{gain}  -> {step.decision}; best {step.best_after}")
            _write_trajectory(folder, policy, results_by_placement)
        outcome = BuildupOutcome(str(policy.best), policy.steps, len(policy.steps), epochs, stopped_by)
        folder.write_json("buildup.json", {**asdict(outcome), "wall_time": time.perf_counter() - began,
                                           "config": config.to_dict()})
        return outcome
    finally:
        folder.unlock()


def _best_run(runs: list[CandidateResult], seed: int) -> CandidateResult | None:
    """The parent's run with the same seed (warm start inherits from it), if it finished."""
    for r in runs:
        if r.seed == seed and r.status == "completed":
            return r
    return None


def _write_trajectory(folder: StudyFolder, policy: BuildupPolicy, results: dict[str, list[CandidateResult]]) -> None:
    rows = []
    for step in policy.steps:
        runs = results.get(step.placement, [])
        row = asdict(step)
        row["keys"] = [r.key for r in runs]
        for metric in ("lambda_max", "nep", "ape", "test_acc", "wall_time"):
            values = [getattr(r, metric) for r in runs if getattr(r, metric) is not None]
            row[metric] = statistics.fmean(values) if values else None
        rows.append(row)
    folder.write_json("trajectory.json", {"best": str(policy.best), "steps": rows})
