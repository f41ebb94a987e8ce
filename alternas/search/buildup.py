"""The automated build-up rule (PAPER.md §3): a pure policy, its replay over finished evaluations, and the worker
loop that any number of processes run against one Optuna storage.

``BuildupPolicy`` knows nothing of training: it proposes a placement, is told its score, and decides. That makes it
testable on given accuracies (the paper's own trajectory).

**Many workers, one search, no leader.** Every decision is a function of finished evaluations (a placement trained
with a seed, to the end or to the screening epoch). ``replay_buildup`` replays the whole search from what is known
and stops at the first look that lacks evidence, naming every evaluation that look needs (all of its seeds at once:
parallel seeds). ``plan_buildup`` also replays what-if branches of that look (accepted, rejected, or undecided and
asking for more seeds, weighted by its ``p_gain``) to rank speculative evaluations by how likely each is to be
needed. ``run_buildup`` is one worker: it plans from the shared storage, claims the most needed evaluation no one
runs (``alternas.search.evaluations``), trains it through the shared evaluator, records it, and plans again. A
single worker is the same loop. Any number of workers makes the same decisions, since the same results replay to
the same decisions.
"""

from __future__ import annotations

import heapq
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from filelock import FileLock

from alternas.errors import AlternasError
from alternas.fileio import DAMAGED_RECORD_ERRORS
from alternas.models.bases import get_base
from alternas.placement import Placement
from alternas.search.decision import Comparison, SeedVariance, compare_paired, sequential_compare
from alternas.search.evaluator import (
    SELECTS_ON_TEST,
    CandidateResult,
    EvaluationCancelled,
    Evaluator,
    candidate_key,
    warm_recipe,
)
from alternas.search.study import StudyConfig, StudyFolder
from alternas.train.evidence import Evidence, load_evidence

POLL_S = 1.0  # how often an idle worker looks for work while others train what the search needs
ONE_SEED = ("one seed per comparison: seed noise is not counted, so its accept/reject rates are not calibrated "
            "(a null simulation accepted 15-28 % instead of <= 10 %); give seeds: [0, 1, 2] for calibrated decisions")
CRASH_ATTEMPTS = 3  # a run that crashes this often in one worker stops it: a crash is never evidence


class EvaluationCrashed(AlternasError):
    """A run kept crashing (out of memory, a bug): no decision may rest on it, so the search stops for the user to
    fix the cause; every finished evaluation is kept and the run resumes from its checkpoint."""


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


def _mean_sd(results: list[CandidateResult]) -> tuple[float | None, float | None]:
    scores = [r.val_acc for r in results if r.status == "completed" and r.val_acc is not None]
    if not scores:
        return None, None
    return statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0


def _run_evidence(result: CandidateResult) -> Evidence:
    evidence = load_evidence(result.run_dir)
    if evidence is None or evidence.last_epoch is None:
        raise AlternasError(f"candidate {result.key} ({result.placement}, seed {result.seed}) has no readable "
                            f"evidence.npz in {result.run_dir}; delete that folder to train it again")
    return evidence


def evaluation_id(key: str, stop_after: int | None = None) -> str:
    """Names an evaluation: a candidate trained to the end, or paused at epoch ``stop_after``."""
    return f"{key}@{stop_after or 'end'}"


@dataclass(frozen=True)
class EvaluationRequest:
    """A training run the build-up needs: ``placement`` with ``seed``, from scratch or warm-started from the run
    ``parent_key``, to the end or (screening) paused at epoch ``stop_after``."""

    placement: str
    seed: int
    key: str
    parent_key: str | None = None
    stop_after: int | None = None

    @property
    def id(self) -> str:
        return evaluation_id(self.key, self.stop_after)


@dataclass
class Evaluated:
    """A finished evaluation as every worker sees it: the result, and the per-example validation correctness at the
    epochs decisions read (the last one, and the screening epoch)."""

    result: CandidateResult
    correct: dict[int, np.ndarray] = field(default_factory=dict)
    last_epoch: int | None = None
    digest: str | None = None  # of the validation split the correctness is about (None: not recorded)

    def at(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.last_epoch if epoch is None else epoch
        if epoch not in self.correct:
            r = self.result
            raise AlternasError(f"candidate {r.key} ({r.placement}, seed {r.seed}) has no evidence for epoch {epoch}; "
                                f"delete {r.run_dir} to train it again")
        return self.correct[epoch]

    @classmethod
    def from_run(cls, result: CandidateResult, epochs: Iterable[int | None] = ()) -> Evaluated:
        """Read a run's evidence from its folder: its last epoch and those of ``epochs`` it reached."""
        if result.status not in ("completed", "paused"):
            return cls(result)
        evidence = _run_evidence(result)
        wanted = {evidence.last_epoch} | {e for e in epochs if e is not None and e in evidence.epochs}
        return cls(result, {e: evidence.at(e)[0] for e in sorted(wanted)}, evidence.last_epoch, evidence.digest)


def same_split(evaluated: Iterable[Evaluated]) -> None:
    """Refuse to pair evidence about different validation splits (other data files on another machine: the cache
    key leaves out where the data lives), naming two runs that differ."""
    recorded = [e for e in evaluated if e.digest is not None]
    for other in recorded[1:]:
        if other.digest != recorded[0].digest:
            a, b = recorded[0].result, other.result
            raise AlternasError(
                f"runs {a.key} ({a.placement}, seed {a.seed}) and {b.key} ({b.placement}, seed {b.seed}) were "
                f"validated on different splits ({recorded[0].digest} vs {other.digest}): the data differs between "
                "the machines that trained them; give every machine the same data files, then delete the other "
                "machine's runs to train them again")


def split_here(digest: str, evaluated: Iterable[Evaluated]) -> None:
    """Refuse, before anything trains here, to join a search whose runs were validated on another split than this
    machine's data gives (the first paired look would refuse too, but only after this worker trained a child)."""
    other = next((e for e in evaluated if e.digest is not None and e.digest != digest), None)
    if other is not None:
        r = other.result
        raise AlternasError(f"this machine's validation split ({digest}) differs from the one run {r.key} "
                            f"({r.placement}, seed {r.seed}) of this search was validated on ({other.digest}): give "
                            "every machine the same data files, or start another study (another `name`)")


@dataclass
class Blocked:
    """Where a replay stopped for want of evidence: the evaluations the look needs (each runnable now), and the
    look's possible outcomes with how likely each is (what speculation ranks by)."""

    requests: list[EvaluationRequest]
    options: list[tuple[str, float]]
    step: int


Lookup = Callable[[str], Evaluated | None]
Say = Callable[[tuple, str], None]


class _Missing(Exception):
    """Evidence is not known yet: the evaluations that would provide it, and the pairs already known."""

    def __init__(self, requests: list[EvaluationRequest], known: list[tuple[Evaluated, Evaluated]] = ()) -> None:
        super().__init__(f"{len(requests)} evaluations missing")
        self.requests, self.known = list(dict.fromkeys(requests)), list(known)


class _Stop(Exception):
    def __init__(self, blocked: Blocked) -> None:
        super().__init__("blocked")
        self.blocked = blocked


class _ChildFailed(Exception):
    """A child's run diverged (or the incumbent has no finished run to pair with): no gain. A crash is not a
    failure of the child: it is run again."""

    def __init__(self, result: CandidateResult, runs: list[CandidateResult] = ()) -> None:
        super().__init__(result.error)
        self.result, self.runs = result, list(runs)


class _Screened(Exception):
    """The child was confidently worse at the screening epoch (``comparison`` None: assumed by a what-if)."""

    def __init__(self, comparison: Comparison | None, runs: list[CandidateResult]) -> None:
        super().__init__("screened")
        self.comparison, self.runs = comparison, runs


class _Assumed(Exception):
    """A what-if replay's assumed outcome of a look it lacks evidence for."""

    def __init__(self, accepted: bool) -> None:
        super().__init__("assumed")
        self.accepted = accepted


def screen_epoch(config: StudyConfig) -> int | None:
    """The epoch a screening look happens at, or ``None`` without screening."""
    b = config.buildup
    if b.screen_at is None:
        return None
    total = (warm_recipe(config) if b.warm_start else config.recipe).total_epochs
    epoch = max(1, round(b.screen_at * total))
    return epoch if epoch < total else None


class _Racer:
    """Replays the comparisons from known evaluations and races seeds until each is decided.

    Each placement is represented per seed by one run: from scratch, or with warm start by a run inheriting the
    weights of its incumbent's representative run with the same seed. A warm-started child is compared with a
    *control* that continues the incumbent's run for the same epochs, so both have trained equally long. Where
    evidence is missing, the racer either stops (``_Stop``, naming what to run) or, in a what-if replay, takes the
    next of its ``assume``d outcomes.
    """

    def __init__(self, config: StudyConfig, lookup: Lookup, assume: Iterable[str], say: Say,
                 keys: dict[tuple, str]) -> None:
        self.config, self.lookup, self.say, self.keys = config, lookup, say, keys
        self.assume = list(assume)
        self.b = config.buildup
        self.min_seeds, self.max_seeds = config.seed_budget
        self.origin: dict[str, str] = {}  # warm start: placement -> the incumbent it inherits from
        self.runs: dict[str, dict[int, CandidateResult]] = {}  # placement -> seed -> representative run
        self.fetched: dict[str, Evaluated] = {}  # every evaluation this replay read, by id
        self.step = 0
        self.screen_at = screen_epoch(config)
        self.measured: list[SeedVariance | None] = []  # the seed components its decided comparisons measured

    @property
    def borrow(self) -> SeedVariance | None:
        """The seed component a comparison borrows from the study's earlier ones (``pool_seed_variance``)."""
        return SeedVariance.pooled(self.measured) if self.b.pool_seed_variance else None

    @property
    def spent(self) -> float:
        """Wall time of the evaluations read so far (what ``budget_hours`` counts)."""
        return sum(e.result.wall_time for e in self.fetched.values())

    # -- runs ---------------------------------------------------------------------------------------------------
    def _key(self, placement: str, seed: int, parent_key: str | None) -> str:
        memo = (placement, seed, parent_key)
        if memo not in self.keys:
            recipe = warm_recipe(self.config) if parent_key else self.config.recipe
            self.keys[memo] = candidate_key(Placement.parse(placement), self.config, recipe, seed, parent_key)
        return self.keys[memo]

    def _get(self, placement: str, seed: int, parent: Evaluated | None = None,
             stop_after: int | None = None) -> Evaluated:
        parent_key = parent.result.key if parent else None
        key = self._key(placement, seed, parent_key)
        eid = evaluation_id(key)
        found = self.lookup(eid)  # a finished run answers a screening look too
        if found is None and stop_after is not None:
            eid = evaluation_id(key, stop_after)
            found = self.lookup(eid)
        if found is None or found.result.status == "failed":  # a crash is never evidence: run it again
            raise _Missing([EvaluationRequest(placement, seed, key, parent_key, stop_after)])
        self.fetched[eid] = found
        return found

    def representative(self, placement: str, seed: int, stop_after: int | None = None) -> Evaluated:
        origin = self.origin.get(placement) if self.b.warm_start else None
        parent = None
        if origin is not None:
            parent = self.representative(origin, seed)
            if parent.result.status != "completed":
                return parent
        got = self._get(placement, seed, parent, stop_after)
        if got.result.status == "completed":
            self.runs.setdefault(placement, {})[seed] = got.result
        return got

    def control(self, incumbent: str, seed: int) -> Evaluated:
        """What a child is compared with: the incumbent's run, continued for the warm-start epochs if warm."""
        run = self.representative(incumbent, seed)
        if not self.b.warm_start or run.result.status != "completed":
            return run
        return self._get(incumbent, seed, parent=run)

    def _assume(self, missing: _Missing, options: list[tuple[str, float]]) -> str:
        if self.assume:
            return self.assume.pop(0)
        raise _Stop(Blocked(missing.requests, options, self.step))

    # -- decisions ----------------------------------------------------------------------------------------------
    def start(self, placement: str) -> list[CandidateResult]:
        runs, missing = [], []
        for seed in self.config.seeds[: self.min_seeds]:
            try:
                runs.append(self.representative(placement, seed).result)
            except _Missing as m:
                missing += m.requests
        if missing:
            self._assume(_Missing(missing), [("done", 1.0)])
        return runs

    def _pair(self, child: str, incumbent: str, seed: int,
              stop_after: int | None = None) -> tuple[Evaluated, Evaluated] | None:
        """(child's run, what it is compared with) for ``seed``, or ``None`` when the incumbent did not finish with
        that seed (the comparison pairs on the next one). A failed child run raises ``_ChildFailed``."""
        missing: list[EvaluationRequest] = []
        theirs = ours = None
        try:
            theirs = self.control(incumbent, seed)
        except _Missing as m:
            missing += m.requests
        if theirs is not None and theirs.result.status != "completed":
            if stop_after is None:
                self.say(("skip", self.step, seed), f"    {incumbent} with seed {seed} ended {theirs.result.status}; "
                                                    "using the next seed")
            return None
        try:
            ours = self.representative(child, seed, stop_after)
        except _Missing as m:
            missing += m.requests
        if missing:
            raise _Missing(missing)
        if ours.result.status not in ("completed", "paused"):
            raise _ChildFailed(ours.result)
        return ours, theirs

    def _draw(self, child: str, incumbent: str, k: int,
              stop_after: int | None = None) -> list[tuple[Evaluated, Evaluated]]:
        """The first ``k`` usable pairs of the seed pool, in pool order, or ``_Missing`` naming every evaluation the
        first ``k`` seeds still need (trained in parallel). An outcome after a missing seed waits for it, so the
        decision does not depend on which run finished first."""
        pairs: list[tuple[Evaluated, Evaluated]] = []
        missing: list[EvaluationRequest] = []
        counted = 0
        for seed in self.config.seeds:
            if counted == k:
                break
            try:
                pair = self._pair(child, incumbent, seed, stop_after)
            except _Missing as m:
                missing += m.requests
                counted += 1
                continue
            except _ChildFailed as failed:
                if missing:
                    counted += 1
                    continue
                failed.runs = [c.result for c, _ in pairs]
                raise
            if pair is not None:
                pairs.append(pair)
                counted += 1
        same_split(e for pair in pairs for e in pair)
        if missing:
            raise _Missing(missing, pairs)
        return pairs

    def _options(self, known: list[tuple[Evaluated, Evaluated]], k: int) -> list[tuple[str, float]]:
        """How a look at ``k`` seeds may end: accept with the probability ``p_gain`` of the pairs known so far
        (0.5 with none), reject otherwise, unless it stays undecided and asks for more seeds — likelier the nearer
        ``p_gain`` is to 0.5, and impossible at the seed budget."""
        p = 0.5
        if known:
            p = compare_paired(np.stack([c.at() for c, _ in known]), np.stack([q.at() for _, q in known]),
                               self.b.min_gain, self.b.confidence, borrow=self.borrow).p_gain
        more = 0.0 if k >= min(self.max_seeds, len(self.config.seeds)) else (1 - abs(2 * p - 1)) / 2
        options = (("accept", (1 - more) * p), ("reject", (1 - more) * (1 - p)), ("more", more))
        return [(name, weight) for name, weight in options if weight > 0]

    def compare(self, child: str, incumbent: str) -> tuple[Verdict, list[CandidateResult]]:
        """Race ``child`` against ``incumbent`` over the seed pool: (verdict, the child's runs it used)."""
        if self.b.warm_start:
            self.origin[child] = incumbent
        pool = list(self.config.seeds)

        def evidence(k: int) -> tuple[np.ndarray, np.ndarray] | None:
            try:
                pairs = self._draw(child, incumbent, k)
            except _Missing as m:
                outcome = self._assume(m, self._options(m.known, k))
                if outcome == "more":
                    return None
                raise _Assumed(outcome == "accept") from None
            if not pairs:  # the incumbent ended unfinished with every seed
                raise _ChildFailed(self.control(incumbent, pool[0]).result)
            drawn[:] = [c.result.seed for c, _ in pairs]
            return np.stack([c.at() for c, _ in pairs]), np.stack([p.at() for _, p in pairs])

        drawn: list[int] = []

        def report(look: Comparison, seeds: int, more: bool) -> None:
            after = pool[pool.index(drawn[-1]) + 1:] if drawn else []
            then = f"undecided -> adding seed {after[0]}" if more and after else (
                look.decision if look.decision != "undecided" else "undecided at the seed budget -> reject")
            self.say(("look", self.step, child, seeds), f"    {look.describe().rsplit('  ', 1)[0]}  {then}")

        try:
            self._screen(child, incumbent)
            outcome = sequential_compare(evidence, min_seeds=self.min_seeds, max_seeds=self.max_seeds,
                                         min_gain=self.b.min_gain, confidence=self.b.confidence, on_look=report,
                                         borrow=self.borrow)
        except _ChildFailed as failed:  # a child run (or every run of the incumbent) failed: no gain
            return Verdict(False, "failure"), failed.runs + ([failed.result] if failed.result.placement == child
                                                              else [])
        except _Screened as screened:
            return Verdict.from_comparison(screened.comparison, False, "screen"), screened.runs
        except _Assumed as assumed:
            return Verdict(assumed.accepted, "assumed"), []
        used = self._draw(child, incumbent, outcome.seeds_used)
        self.measured.append(outcome.final.seed_component)
        return (Verdict.from_comparison(outcome.final, outcome.decision == "accept", outcome.decided_by),
                [c.result for c, _ in used])

    def _screen(self, child: str, incumbent: str) -> None:
        """Early look at ``screen_at`` of the epochs on the first ``min_seeds`` seeds: a child confidently worse
        than its incumbent there (P(gain > 0) <= 1 - confidence) stops; its checkpoint stays, so it resumes if it
        is ever needed again. Not confidently better by ``min_gain`` is no reason to stop: MSA nets often lag early."""
        epoch = self.screen_at
        if epoch is None:
            return
        try:
            pairs = self._draw(child, incumbent, self.min_seeds, stop_after=epoch)
        except _Missing as m:
            if self._assume(m, [("train on", 0.5), ("screened", 0.5)]) == "screened":
                raise _Screened(None, []) from None
            return
        if not pairs:
            return
        look = compare_paired(np.stack([c.at(epoch) for c, _ in pairs]), np.stack([p.at(epoch) for _, p in pairs]),
                              0.0, self.b.confidence)
        verdict = "confidently worse -> stopped" if look.decision == "reject" else "-> training on"
        self.say(("screen", self.step, child),
                 f"    screen at epoch {epoch}: gain {look.gain:+.2f} pp, upper bound {look.bounds[1]:+.2f}  "
                 f"P(gain > 0) = {look.p_gain:.2f} (stop <= {1 - look.confidence:.2g})  {verdict}")
        if look.decision == "reject":
            raise _Screened(look, [c.result for c, _ in pairs])


@dataclass
class Replay:
    """The build-up as far as the known evaluations take it."""

    policy: BuildupPolicy
    used_runs: dict[str, list[CandidateResult]]  # placement -> the runs its decision used
    representative: dict[str, dict[int, CandidateResult]]  # placement -> seed -> the run standing for it
    fetched: dict[str, Evaluated]  # every evaluation the decisions read, by id
    blocked: Blocked | None = None  # where it waits for evidence
    stopped_by: str | None = None  # finished | max_candidates | budget; None while blocked

    @property
    def best(self) -> str:
        return str(self.policy.best)


def replay_buildup(config: StudyConfig, lookup: Lookup, assume: Iterable[str] = (),
                   say: Say = lambda key, line: None, keys: dict[tuple, str] | None = None) -> Replay:
    """Replay the build-up of ``config`` over the evaluations ``lookup`` knows (by ``evaluation_id``): every
    decision they allow, then ``blocked`` at the first look missing evidence — or, a what-if, the next
    ``assume``d outcome there. ``say(key, line)`` receives the terminal lines (the same key for the same line on
    every replay); ``keys`` memoises cache keys across replays."""
    b = config.buildup
    racer = _Racer(config, lookup, assume, say, {} if keys is None else keys)
    start = Placement.parse(b.start) if b.start else Placement.all_conv(get_base(config.base).depths)
    policy = BuildupPolicy(start, min_gain=b.min_gain, patience=b.patience)
    replay = Replay(policy, {}, racer.runs, racer.fetched)
    while (placement := policy.propose()) is not None:
        if len(policy.steps) >= b.max_candidates:
            replay.stopped_by = "max_candidates"
            return replay
        if b.budget_hours is not None and racer.spent / 3600 >= b.budget_hours:
            replay.stopped_by = "budget"
            return replay
        racer.step = len(policy.steps)
        name = str(placement)
        say(("candidate", racer.step, name), f"{step_label(config, racer.step)} {name}  ({placement.describe()})"
            + (f"  vs {policy.best}" if policy.best is not None else "  start"))
        try:
            if policy.best is None:
                runs, verdict = racer.start(name), None
            else:
                verdict, runs = racer.compare(name, str(policy.best))
        except _Stop as stop:
            replay.blocked = stop.blocked
            return replay
        replay.used_runs[name] = runs
        score, sd = _mean_sd(runs)
        step = policy.observe(score, sd, verdict, [r.seed for r in runs])
        score_text = "n/a" if score is None else f"{score:.2f} ± {sd:.2f}"
        how = f" ({step.decided_by})" if step.decided_by else ""
        say(("step", step.step, name), f"    val acc {score_text} over seeds {step.seeds_used}  -> "
            f"{step.decision}{how}; best {step.best_after}")
    replay.stopped_by = "finished"
    return replay


def step_label(config: StudyConfig, step: int) -> str:
    return f"[candidate {step + 1}/<={config.buildup.max_candidates}]"


@dataclass
class Plan:
    """What to evaluate next: the replay of what is known, and the evaluations to run, most needed first (weight
    1: the pending look needs it; less: a what-if branch does, weighted by how likely that branch is)."""

    replay: Replay
    requests: list[tuple[EvaluationRequest, float]]


WHAT_IFS = 16  # what-if branches a worker plans ahead: real workers and `alternas bench buildup-workers` alike


def plan_buildup(config: StudyConfig, lookup: Lookup, what_ifs: int = WHAT_IFS, say: Say = lambda key, line: None,
                 keys: dict[tuple, str] | None = None) -> Plan:
    """Replay the search, then up to ``what_ifs`` what-if branches of its pending looks, likeliest first: the
    evaluations each branch would need next are the speculative work, weighted by the branch's probability."""
    keys = {} if keys is None else keys
    replay = replay_buildup(config, lookup, say=say, keys=keys)
    if replay.blocked is None:
        return Plan(replay, [])
    weight = dict.fromkeys(replay.blocked.requests, 1.0)
    frontier = [(-w, i, (option,)) for i, (option, w) in enumerate(replay.blocked.options)]
    heapq.heapify(frontier)
    tie = len(frontier)
    for _ in range(what_ifs):
        if not frontier:
            break
        neg, _, path = heapq.heappop(frontier)
        branch = replay_buildup(config, lookup, assume=path, keys=keys).blocked
        if branch is None:
            continue
        for request in branch.requests:
            weight.setdefault(request, -neg)  # best-first: the first branch to need it is the likeliest
        for option, w in branch.options:
            heapq.heappush(frontier, (neg * w, tie, (*path, option)))
            tie += 1
    return Plan(replay, sorted(weight.items(), key=lambda item: -item[1]))


@dataclass
class BuildupOutcome:
    best: str
    steps: list[Step]
    candidates_evaluated: int
    candidate_epochs: int  # epochs this worker trained
    stopped_by: str  # finished | max_candidates | budget


def run_buildup(
    config: StudyConfig,
    *,
    quiet: bool = False,
    retry_failed: bool = False,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> BuildupOutcome:
    """Run one worker of the build-up search of ``config`` (start it as often as you have GPUs or machines, with one
    ``storage``); it returns when the search is decided, writing the study folder as it goes.

    Every child is raced against the incumbent (the best so far) over the seed pool: ``min_seeds`` first, one
    more while the paired comparison is undecided, up to ``max_seeds`` (then rejected by the seed budget).
    Resuming replays every decision from finished evaluations; an interrupted run resumes from its checkpoint.
    ``retry_failed`` trains diverged candidates again (crashed ones are retried anyway).
    """
    from alternas.search.evaluations import SharedEvaluations

    folder = StudyFolder(config.output_dir)
    evaluator = Evaluator(config, folder, quiet=quiet, retry_failed=retry_failed)
    selection_split = evaluator.data.selects_on  # missing data stops here, before the search's storage is touched
    board = SharedEvaluations(config, storage, retry_failed=retry_failed, log=log)  # refuses a differing worker
    folder.save_config(config)  # only once the settings are the search's own
    if selection_split == "test":
        log(SELECTS_ON_TEST)
    if config.seed_budget[1] == 1:
        log(ONE_SEED)
    done = board.snapshot().done.values()
    split_here(evaluator.data.val.digest(), done)
    restored = evaluator.restore_results(e.result for e in done)
    if restored:
        log(f"restored {restored} lost result.json file(s) from the study's storage (nothing retrained)")
    refreshed = evaluator.refresh_diagnostics((e.result for e in done), log)
    if refreshed:
        log(f"measured the diagnostics of {refreshed} finished run(s) again with the study's settings (from their "
            "saved weights, nothing retrained)")
    worker = _Worker(config, evaluator, board, log)
    began = time.perf_counter()
    replay = worker.run(folder, selection_split)
    evaluator.write_table()  # whole even if a killed run left it one row behind its result files
    outcome = BuildupOutcome(replay.best, replay.policy.steps, len(replay.policy.steps), worker.epochs_trained,
                             replay.stopped_by or "finished")
    folder.write_json("buildup.json", {**asdict(outcome), "wall_time": time.perf_counter() - began,
                                       "selection_split": selection_split, "config": config.to_dict()})
    return outcome


class _Worker:
    """One build-up worker: plan from the shared evaluations, claim, train, record, until the search is decided."""

    def __init__(self, config: StudyConfig, evaluator: Evaluator, board, log: Callable[[str], None]) -> None:
        self.config, self.evaluator, self.board, self.log = config, evaluator, board, log
        self.printed: set[tuple] = set()
        self.keys: dict[tuple, str] = {}
        self.epochs_trained = 0
        self.crashes: dict[str, int] = {}  # evaluation id -> crashes of it in this worker

    def say(self, key: tuple, line: str) -> None:
        if key not in self.printed:
            self.printed.add(key)
            self.log(line)

    def plan(self, say: bool = False) -> tuple[Plan, set[str], dict[str, Evaluated]]:
        known = self.board.snapshot()
        plan = plan_buildup(self.config, known.done.get, say=self.say if say else (lambda key, line: None),
                            keys=self.keys)
        return plan, known.running, known.done

    def run(self, folder: StudyFolder, selection_split: str) -> Replay:
        self.board.fail_dead_workers()
        waiting_for: frozenset[str] | None = None
        written: dict | None = None
        while True:
            plan, running, done = self.plan(say=True)
            trajectory = _trajectory(plan.replay, self.config, selection_split, done)
            if trajectory != written:  # an idle worker polls every second: write only what changed
                _publish_trajectory(folder, trajectory)
                written = trajectory
            if plan.replay.stopped_by is not None:
                return plan.replay
            for request, weight in plan.requests:
                if request.id in running or (weight < 1.0 and self.crashes.get(request.id, 0) >= CRASH_ATTEMPTS):
                    continue  # another worker's, or speculative and crashing: left until a decision needs it
                trial = self.board.claim(request)
                if trial is not None:
                    self._evaluate(request, weight, trial, plan.replay.blocked.step, done)
                    waiting_for = None
                    break
            else:
                busy = frozenset(r.id for r, w in plan.requests if w == 1.0 and r.id in running)
                if busy and busy != waiting_for:
                    self.log(f"    waiting for {len(busy)} evaluation(s) other workers are running")
                waiting_for = busy
                time.sleep(POLL_S)
                self.board.fail_dead_workers()

    def _evaluate(self, request: EvaluationRequest, weight: float, trial: int, step: int,
                  done: dict[str, Evaluated]) -> None:
        parent = done[evaluation_id(request.parent_key)].result if request.parent_key else None
        fresh = request.id in self.crashes or not self.evaluator.has_result(request.placement, request.seed, parent)
        if fresh:
            what = "  control (continued)" if parent is not None and parent.placement == request.placement else \
                "  warm start" if parent is not None else ""
            upto = f", up to epoch {request.stop_after}" if request.stop_after else ""
            why = "" if weight == 1.0 else f"  (speculative, p={weight:.2f})"
            self.log(f"{step_label(self.config, step)} training {request.placement}  seed {request.seed}{what}"
                     f"{upto}{why}")

        def still_needed(epoch: int, row: dict) -> None:
            if request not in dict(self.plan()[0].requests):
                raise EvaluationCancelled(f"{request.placement} seed {request.seed} is no longer needed")

        try:
            with self.board.heartbeat(trial):
                result = self.evaluator.evaluate(request.placement, request.seed, parent=parent,
                                                 stop_after=request.stop_after, epoch_callback=still_needed,
                                                 retry_crash=True)
        except EvaluationCancelled:
            self.board.release(trial, "cancelled")
            self.log(f"    {request.placement} seed {request.seed}: no longer needed, stopped (its checkpoint stays)")
            return
        except BaseException:
            self.board.release(trial, "interrupted")
            raise
        self.board.record(trial, Evaluated.from_run(result, [screen_epoch(self.config)]))
        if fresh:
            self.epochs_trained += result.epochs_trained
            if result.status not in ("completed", "paused", "failed"):
                self.log(f"    {result.status}: {result.error}")
        if result.status == "failed":
            self._crashed(request, result, weight)

    def _crashed(self, request: EvaluationRequest, result: CandidateResult, weight: float) -> None:
        """A crash is asked for again, never decided on; a run a decision needs crashing ``CRASH_ATTEMPTS`` times
        stops the search (a speculative one is left alone until a decision needs it)."""
        attempts = self.crashes[request.id] = self.crashes.get(request.id, 0) + 1
        if attempts >= CRASH_ATTEMPTS and weight == 1.0:
            raise EvaluationCrashed(
                f"{request.placement} seed {request.seed} crashed {attempts} times ({result.error}); see "
                f"{result.run_dir}/error.log, fix the cause and run the command again (every finished evaluation "
                "is kept, and this run resumes from its last checkpoint)")
        self.log(f"    crashed ({result.error}); not evidence: trying again ({attempts}/{CRASH_ATTEMPTS - 1} retries)")


def _trajectory(replay: Replay, config: StudyConfig, selection_split: str, done: dict[str, Evaluated]) -> dict:
    """``trajectory.json``: every step with its decision evidence, plus the runs that stand for each placement
    (``keys``: every finished seed, which grows as later comparisons add seeds to an incumbent), and the finished
    evaluations no decision used (speculative, unused)."""
    rows = []
    for step in replay.policy.steps:
        runs = replay.used_runs.get(step.placement, [])
        known = {r.seed: r for r in runs if r.status == "completed"}
        known.update(replay.representative.get(step.placement, {}))
        row = asdict(step)
        row["keys"] = [r.key for _, r in sorted(known.items())]
        row["statuses"] = [r.status for r in runs]
        for metric in ("lambda_max", "nep", "ape", "test_acc", "wall_time"):
            values = [getattr(r, metric) for r in runs if getattr(r, metric) is not None]
            row[metric] = statistics.fmean(values) if values else None
        rows.append(row)
    used = {e.result.key for e in replay.fetched.values()}
    unused = sorted({e.result.key for e in done.values()} - used)
    return {"best": replay.best, "confidence": config.buildup.confidence, "min_gain": config.buildup.min_gain,
            "selection_split": selection_split, "seed_pool": list(config.seeds),
            "seed_budget": list(config.seed_budget), "finished": replay.stopped_by is not None,
            "speculative_unused": unused, "steps": rows}


def _publish_trajectory(folder: StudyFolder, trajectory: dict) -> None:
    """Several workers write ``trajectory.json``: under a lock, and never with fewer steps than it has (a worker
    whose view lags must not take decisions back)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.root / ".trajectory.lock"):
        try:
            current = folder.read_json("trajectory.json")
        except DAMAGED_RECORD_ERRORS:
            current = None
        if current is None or len(current.get("steps", [])) <= len(trajectory["steps"]):
            folder.write_json("trajectory.json", trajectory)
