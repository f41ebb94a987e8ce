"""The build-up rules as a pure policy (PAPER.md §3): it proposes a placement, is told how the comparison with the
incumbent ended, and proposes the next. It knows nothing of training or seeds, which makes it testable on given
accuracies (the paper's own trajectory); ``alternas.search.race`` decides each comparison over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alternas.placement import Placement
from alternas.search.decision import Comparison, SeedVariance


@dataclass
class Step:
    """One row of the trajectory."""

    step: int
    placement: str
    parent: str | None
    stage: int | None  # 1-based stage the MSA was added to (None for the start)
    num_msa: int
    score: float | None  # mean validation accuracy over the seeds used (None if every seed failed)
    score_sd: float | None
    gain: float | None  # vs the incumbent (the best accepted so far): paired over seeds and examples, pp
    decision: str  # start | accept | reject
    best_after: str
    incumbent: str | None = None  # what the step was compared with
    gain_ci: list[float] | None = None  # the decision's interval (Comparison.bounds): accept iff its lower end is at
    # or above min_gain, reject iff its upper end is at or below it (a screened step: against 0, at the screen)
    p_gain: float | None = None  # P(true gain > min_gain); a screened step: P(gain > 0) at the screen
    seeds_used: list[int] = field(default_factory=list)
    decided_by: str | None = None  # confidence | seed budget | screen | failure | threshold (given scores only)
    # the study's seed component the decision borrowed: [variance in pp², degrees of freedom] (None: decided alone)
    borrowed_seed_variance: list[float] | None = None


@dataclass(frozen=True)
class Verdict:
    """How the comparison of a proposal with the incumbent ended."""

    accepted: bool
    decided_by: str
    gain: float | None = None
    gain_ci: tuple[float, float] | None = None
    p_gain: float | None = None
    borrowed: SeedVariance | None = None

    @classmethod
    def from_comparison(cls, c: Comparison | None, accepted: bool, decided_by: str) -> Verdict:
        return cls(accepted, decided_by) if c is None else cls(accepted, decided_by, c.gain, c.bounds, c.p_gain,
                                                               c.borrowed)


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

    def observe(self, score: float | None, score_sd: float | None = None, verdict: Verdict | None = None,
                seeds_used: list[int] | tuple[int, ...] = ()) -> Step:
        """Record the outcome of ``propose()``: its score (mean val accuracy; ``None`` = failed) and, for a child,
        the ``verdict`` of its paired comparison with the incumbent. Without a verdict (given single-run scores,
        such as the paper's) a child is accepted when its score beats the best by more than ``min_gain``."""
        if self._pending is None:
            raise RuntimeError("observe() without a pending proposal")
        placement, parent, stage = self._pending
        self._pending = None
        incumbent = str(self.best) if self.best is not None else None
        if parent is None:  # the start placement
            self.best, self.best_score = placement, score
            decision, gain = "start", None
        else:
            if verdict is None:
                gain = None if score is None or self.best_score is None else score - self.best_score
                verdict = Verdict(gain is not None and gain > self.min_gain, "threshold", gain)
            gain = verdict.gain
            if verdict.accepted:
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
                    str(self.best), incumbent if parent is not None else None,
                    list(verdict.gain_ci) if verdict and verdict.gain_ci else None,
                    verdict.p_gain if verdict else None, list(seeds_used), verdict.decided_by if verdict else None,
                    [verdict.borrowed.variance, verdict.borrowed.df] if verdict and verdict.borrowed else None)
        self.steps.append(step)
        return step

