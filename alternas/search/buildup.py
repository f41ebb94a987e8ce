"""The automated build-up rule (PAPER.md §3): a pure policy and the loop that drives it.

``BuildupPolicy`` knows nothing of training: it proposes a placement, is told its score, and decides. That makes it
testable on given accuracies (the paper's own trajectory) and makes the loop resumable: replaying the policy over
cached results reproduces every decision, then continues where the run stopped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from alternas.errors import AlternasError
from alternas.placement import Placement
from alternas.search.decision import Comparison, compare_paired, sequential_compare
from alternas.search.evaluator import SELECTS_ON_TEST, CandidateResult, Evaluator
from alternas.search.study import StudyConfig, StudyFolder
from alternas.train.evidence import load_evidence


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
    gain_ci: list[float] | None = None  # interval of the gain at the study's confidence
    p_gain: float | None = None  # P(true gain > min_gain)
    seeds_used: list[int] = field(default_factory=list)
    decided_by: str | None = None  # confidence | seed budget | screen | failure | threshold (given scores only)


@dataclass(frozen=True)
class Verdict:
    """How the comparison of a proposal with the incumbent ended."""

    accepted: bool
    decided_by: str
    gain: float | None = None
    gain_ci: tuple[float, float] | None = None
    p_gain: float | None = None

    @classmethod
    def from_comparison(cls, c: Comparison, accepted: bool, decided_by: str) -> Verdict:
        return cls(accepted, decided_by, c.gain, c.ci, c.p_gain)


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
                    verdict.p_gain if verdict else None, list(seeds_used), verdict.decided_by if verdict else None)
        self.steps.append(step)
        return step


def _mean_sd(results: list[CandidateResult]) -> tuple[float | None, float | None]:
    scores = [r.val_acc for r in results if r.status == "completed" and r.val_acc is not None]
    if not scores:
        return None, None
    return statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0


def correctness(result: CandidateResult, epoch: int | None = None) -> np.ndarray:
    """A finished (or paused) run's per-example validation correctness after ``epoch`` (default: its last)."""
    evidence = load_evidence(result.run_dir)
    if evidence is None:
        raise AlternasError(f"candidate {result.key} ({result.placement}, seed {result.seed}) has no readable "
                            f"evidence.npz in {result.run_dir}; delete that folder to train it again")
    return evidence.at(epoch)[0]


class _ChildFailed(Exception):
    """A child's run diverged or crashed (or the incumbent has no finished run to pair with): no gain."""

    def __init__(self, result: CandidateResult) -> None:
        super().__init__(result.error)
        self.result = result


class _Screened(Exception):
    """The child was confidently worse at the screening epoch."""

    def __init__(self, comparison: Comparison, runs: list[CandidateResult]) -> None:
        super().__init__(comparison.describe())
        self.comparison, self.runs = comparison, runs


class _Racer:
    """Trains what the comparisons need, through the shared evaluator, and races seeds until each is decided.

    Each placement is represented per seed by one run: from scratch, or with warm start by a run inheriting the
    weights of its incumbent's representative run with the same seed. A warm-started child is compared with a
    *control* that continues the incumbent's run for the same epochs, so both have trained equally long.
    """

    def __init__(self, config: StudyConfig, evaluator: Evaluator, log: Callable[[str], None]) -> None:
        self.config, self.evaluator, self.log = config, evaluator, log
        self.b = config.buildup
        self.min_seeds, self.max_seeds = config.seed_budget
        self.origin: dict[str, str] = {}  # warm start: placement -> the incumbent it inherits from
        self.runs: dict[str, dict[int, CandidateResult]] = {}  # placement -> seed -> representative run
        self.spent, self.epochs_trained = 0.0, 0
        self.label = ""

    # -- runs ---------------------------------------------------------------------------------------------------
    def _get(self, placement: str, seed: int, parent: CandidateResult | None = None,
             stop_after: int | None = None) -> CandidateResult:
        fresh = not self.evaluator.has_result(placement, seed, parent)
        if fresh:
            what = "control (continued)" if parent is not None and parent.placement == placement else \
                "warm start" if parent is not None else ""
            upto = f", up to epoch {stop_after}" if stop_after else ""
            self.log(f"{self.label} training {placement}  seed {seed}{'  ' + what if what else ''}{upto}")
        result = self.evaluator.evaluate(placement, seed, parent=parent, stop_after=stop_after)
        if fresh:
            self.spent += result.wall_time
            self.epochs_trained += result.epochs_trained
            if result.status not in ("completed", "paused"):
                self.log(f"    {result.status}: {result.error}")
        return result

    def representative(self, placement: str, seed: int, stop_after: int | None = None) -> CandidateResult:
        origin = self.origin.get(placement) if self.b.warm_start else None
        parent = None
        if origin is not None:
            parent = self.representative(origin, seed)
            if parent.status != "completed":
                return parent
        result = self._get(placement, seed, parent, stop_after)
        if result.status == "completed":
            self.runs.setdefault(placement, {})[seed] = result
        return result

    def control(self, incumbent: str, seed: int) -> CandidateResult:
        """What a child is compared with: the incumbent's run, continued for the warm-start epochs if warm."""
        run = self.representative(incumbent, seed)
        if not self.b.warm_start or run.status != "completed":
            return run
        return self._get(incumbent, seed, parent=run)

    # -- decisions ----------------------------------------------------------------------------------------------
    def start(self, placement: str) -> list[CandidateResult]:
        return [self.representative(placement, seed) for seed in self.config.seeds[: self.min_seeds]]

    def screen_epoch(self) -> int | None:
        if self.b.screen_at is None:
            return None
        total = (self.evaluator.warm_recipe() if self.b.warm_start else self.config.recipe).total_epochs
        epoch = max(1, round(self.b.screen_at * total))
        return epoch if epoch < total else None

    def compare(self, child: str, incumbent: str) -> tuple[Verdict, list[CandidateResult]]:
        """Race ``child`` against ``incumbent`` over the seed pool: (verdict, the child's runs it used)."""
        if self.b.warm_start:
            self.origin[child] = incumbent
        pool = list(self.config.seeds)
        pairs: list[tuple[CandidateResult, CandidateResult]] = []
        rows: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # each pair's evidence, read from disk once

        def evidence(k: int) -> tuple[np.ndarray, np.ndarray]:
            while len(pairs) < k and pool:
                pair = self._pair(child, incumbent, pool.pop(0))
                if pair is not None:
                    pairs.append(pair)
                    rows[0].append(correctness(pair[0]))
                    rows[1].append(correctness(pair[1]))
            if not pairs:
                raise _ChildFailed(self.control(incumbent, self.config.seeds[0]))  # the incumbent never finished
            return np.stack(rows[0]), np.stack(rows[1])

        def report(look: Comparison, seeds: int, more: bool) -> None:
            then = f"undecided -> adding seed {pool[0]}" if more and pool else (
                look.decision if look.decision != "undecided" else "undecided at the seed budget -> reject")
            self.log(f"    {look.describe().rsplit('  ', 1)[0]}  {then}")

        try:
            self._screen(child, incumbent)
            outcome = sequential_compare(evidence, min_seeds=self.min_seeds, max_seeds=self.max_seeds,
                                         min_gain=self.b.min_gain, confidence=self.b.confidence, on_look=report)
        except _ChildFailed as failed:  # a child run (or every run of the incumbent) failed: no gain
            runs = [c for c, _ in pairs] + ([failed.result] if failed.result.placement == child else [])
            return Verdict(False, "failure"), runs
        except _Screened as screened:
            return Verdict.from_comparison(screened.comparison, False, "screen"), screened.runs
        used = pairs[: outcome.seeds_used]
        return (Verdict.from_comparison(outcome.final, outcome.decision == "accept", outcome.decided_by),
                [c for c, _ in used])

    def _pair(self, child: str, incumbent: str, seed: int,
              stop_after: int | None = None) -> tuple[CandidateResult, CandidateResult] | None:
        """(child's run, what it is compared with) for ``seed``, or ``None`` when the incumbent did not finish with
        that seed (the comparison pairs on the next one). A failed child run raises ``_ChildFailed``."""
        theirs = self.control(incumbent, seed)
        if theirs.status != "completed":
            if stop_after is None:
                self.log(f"    {incumbent} with seed {seed} ended {theirs.status}; using the next seed")
            return None
        ours = self.representative(child, seed, stop_after)
        if ours.status not in ("completed", "paused"):
            raise _ChildFailed(ours)
        return ours, theirs

    def _screen(self, child: str, incumbent: str) -> None:
        """Early look at ``screen_at`` of the epochs on the first ``min_seeds`` seeds: a child confidently worse
        there stops (its checkpoint stays, so it resumes if it is ever needed again)."""
        epoch = self.screen_epoch()
        if epoch is None:
            return
        ours, theirs = [], []
        for seed in self.config.seeds:
            if len(ours) == self.min_seeds:
                break
            pair = self._pair(child, incumbent, seed, stop_after=epoch)
            if pair is not None:
                ours.append(pair[0])
                theirs.append(pair[1])
        look = compare_paired(np.stack([correctness(r, epoch) for r in ours]),
                              np.stack([correctness(r, epoch) for r in theirs]), self.b.min_gain, self.b.confidence)
        verdict = "confidently worse -> stopped" if look.decision == "reject" else "-> training on"
        self.log(f"    screen at epoch {epoch}: {look.describe().rsplit('  ', 1)[0]}  {verdict}")
        if look.decision == "reject":
            raise _Screened(look, ours)


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
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> BuildupOutcome:
    """Run (or resume) the build-up search of ``config``; writes the study folder as it goes.

    Every child is raced against the incumbent (the best so far) over the seed pool: ``min_seeds`` first, one
    more while the paired comparison is undecided, up to ``max_seeds`` (then rejected by the seed budget).
    Resuming replays every decision from cached runs and continues mid-comparison where it stopped;
    ``retry_failed`` trains diverged candidates again (crashed ones are retried anyway).
    """
    folder = StudyFolder(config.output_dir)
    folder.lock()
    try:
        folder.save_config(config)
        evaluator = Evaluator(config, folder, quiet=quiet, retry_failed=retry_failed)
        selection_split = evaluator.data.selects_on
        if selection_split == "test":
            log(SELECTS_ON_TEST)
        racer = _Racer(config, evaluator, log)
        b = config.buildup
        from alternas.models.bases import get_base

        start = Placement.parse(b.start) if b.start else Placement.all_conv(get_base(config.base).depths)
        policy = BuildupPolicy(start, min_gain=b.min_gain, patience=b.patience)
        used_runs: dict[str, list[CandidateResult]] = {}
        stopped_by = "finished"
        began = time.perf_counter()
        while (placement := policy.propose()) is not None:
            if len(policy.steps) >= b.max_candidates:
                stopped_by = "max_candidates"
                break
            if b.budget_hours is not None and racer.spent / 3600 >= b.budget_hours:
                stopped_by = "budget"
                break
            racer.label = f"[candidate {len(policy.steps) + 1}/<={b.max_candidates}]"
            name = str(placement)
            log(f"{racer.label} {name}  ({placement.describe()})"
                + (f"  vs {policy.best}" if policy.best is not None else "  start"))
            if policy.best is None:
                runs = racer.start(name)
                verdict = None
            else:
                verdict, runs = racer.compare(name, str(policy.best))
            used_runs[name] = runs
            score, sd = _mean_sd(runs)
            step = policy.observe(score, sd, verdict, [r.seed for r in runs])
            score_text = "n/a" if score is None else f"{score:.2f} ± {sd:.2f}"
            how = f" ({step.decided_by})" if step.decided_by else ""
            log(f"    val acc {score_text} over seeds {step.seeds_used}  -> {step.decision}{how}; "
                f"best {step.best_after}")
            _write_trajectory(folder, policy, used_runs, racer.runs, config, selection_split)
        evaluator.write_table()  # whole even if a killed run left it one row behind its result files
        outcome = BuildupOutcome(str(policy.best), policy.steps, len(policy.steps), racer.epochs_trained, stopped_by)
        folder.write_json("buildup.json", {**asdict(outcome), "wall_time": time.perf_counter() - began,
                                           "selection_split": selection_split, "config": config.to_dict()})
        return outcome
    finally:
        folder.unlock()


def _write_trajectory(folder: StudyFolder, policy: BuildupPolicy, used: dict[str, list[CandidateResult]],
                      representative: dict[str, dict[int, CandidateResult]], config: StudyConfig,
                      selection_split: str) -> None:
    """``trajectory.json``: every step with its decision evidence, plus the runs that stand for each placement
    (``keys``: every finished seed, which grows as later comparisons add seeds to an incumbent)."""
    rows = []
    for step in policy.steps:
        runs = used.get(step.placement, [])
        known = {r.seed: r for r in runs if r.status == "completed"}
        known.update(representative.get(step.placement, {}))
        row = asdict(step)
        row["keys"] = [r.key for _, r in sorted(known.items())]
        row["statuses"] = [r.status for r in runs]
        for metric in ("lambda_max", "nep", "ape", "test_acc", "wall_time"):
            values = [getattr(r, metric) for r in runs if getattr(r, metric) is not None]
            row[metric] = statistics.fmean(values) if values else None
        rows.append(row)
    folder.write_json("trajectory.json", {"best": str(policy.best), "confidence": config.buildup.confidence,
                                          "min_gain": config.buildup.min_gain, "selection_split": selection_split,
                                          "seed_pool": list(config.seeds),
                                          "seed_budget": list(config.seed_budget), "steps": rows})
