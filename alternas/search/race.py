"""The race of a child against its incumbent over seeds, replayed from finished evaluations.

A comparison's evidence is a pair of runs per seed: the child's, and what it is compared with (the incumbent's run,
or with warm start a *control* that continues it for the same epochs, so both trained equally long). The race
reads the pairs its next look needs from ``lookup``; where some are missing it does not wait or raise: it answers
``Blocked``, naming every evaluation that look needs (all of its seeds at once: trained in parallel) and how the
look may end. A what-if replay instead takes the next of its ``assume``d outcomes there and goes on, which is how
``alternas.search.planner`` ranks speculative work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from alternas.placement import Placement
from alternas.search.decision import Comparison, SeedRace, SeedVariance, compare_paired
from alternas.search.evaluated import Evaluated, EvaluationRequest, evaluation_id, same_split
from alternas.search.evaluator import CandidateResult, candidate_key, warm_recipe
from alternas.search.policy import Verdict
from alternas.search.study import StudyConfig

Lookup = Callable[[str], Evaluated | None]
Say = Callable[[tuple, str], None]
Pair = tuple[Evaluated, Evaluated]  # (the child's run, what it is compared with), one seed


@dataclass
class Blocked:
    """Where a replay stopped for want of evidence: the evaluations the look needs (each runnable now), and the
    look's possible outcomes with how likely each is (what speculation ranks by)."""

    requests: list[EvaluationRequest]
    options: list[tuple[str, float]]
    step: int


@dataclass
class Missing:
    """Evaluations not known yet (each runnable now)."""

    requests: list[EvaluationRequest]


@dataclass
class Draw:
    """The pairs of a look's seeds, in pool order: those known, the evaluations still ``missing`` for the rest, or
    the child's run that ``failed`` (diverged), which ends the comparison."""

    pairs: list[Pair] = field(default_factory=list)
    missing: list[EvaluationRequest] = field(default_factory=list)
    failed: CandidateResult | None = None


Decided = tuple[Verdict, list[CandidateResult]]  # how a comparison ended, and the child's runs it used


def screen_epoch(config: StudyConfig) -> int | None:
    """The epoch a screening look happens at, or ``None`` without screening."""
    b = config.buildup
    if b.screen_at is None:
        return None
    total = (warm_recipe(config) if b.warm_start else config.recipe).total_epochs
    epoch = max(1, round(b.screen_at * total))
    return epoch if epoch < total else None


class Race:
    """Replays the build-up's comparisons from known evaluations, racing seeds until each is decided.

    Each placement is represented per seed by one run: from scratch, or with warm start by a run inheriting the
    weights of its incumbent's representative run with the same seed. ``assume`` lists the outcomes a what-if
    replay takes where evidence is missing, in order; without (more) of them the race answers ``Blocked``.
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
             stop_after: int | None = None) -> Evaluated | Missing:
        parent_key = parent.result.key if parent else None
        key = self._key(placement, seed, parent_key)
        eid = evaluation_id(key)
        found = self.lookup(eid)  # a finished run answers a screening look too
        if found is None and stop_after is not None:
            eid = evaluation_id(key, stop_after)
            found = self.lookup(eid)
        if found is None or found.result.status == "failed":  # a crash is never evidence: run it again
            return Missing([EvaluationRequest(placement, seed, key, parent_key, stop_after)])
        self.fetched[eid] = found
        return found

    def representative(self, placement: str, seed: int, stop_after: int | None = None) -> Evaluated | Missing:
        origin = self.origin.get(placement) if self.b.warm_start else None
        parent = None
        if origin is not None:
            parent = self.representative(origin, seed)
            if isinstance(parent, Missing) or parent.result.status != "completed":
                return parent
        got = self._get(placement, seed, parent, stop_after)
        if isinstance(got, Evaluated) and got.result.status == "completed":
            self.runs.setdefault(placement, {})[seed] = got.result
        return got

    def control(self, incumbent: str, seed: int) -> Evaluated | Missing:
        """What a child is compared with: the incumbent's run, continued for the warm-start epochs if warm."""
        run = self.representative(incumbent, seed)
        if isinstance(run, Missing) or not self.b.warm_start or run.result.status != "completed":
            return run
        return self._get(incumbent, seed, parent=run)

    def _blocked(self, requests: list[EvaluationRequest],
                 options: Callable[[], list[tuple[str, float]]]) -> str | Blocked:
        """Evidence is missing: the next assumed outcome (a what-if replay), else ``Blocked`` on ``requests``."""
        if self.assume:
            return self.assume.pop(0)
        return Blocked(list(dict.fromkeys(requests)), options(), self.step)

    # -- decisions ----------------------------------------------------------------------------------------------
    def start(self, placement: str) -> list[CandidateResult] | Blocked:
        """The start's runs on the first ``min_seeds`` seeds (a what-if replay goes on with those known)."""
        runs, missing = [], []
        for seed in self.config.seeds[: self.min_seeds]:
            got = self.representative(placement, seed)
            if isinstance(got, Missing):
                missing += got.requests
            else:
                runs.append(got.result)
        if missing:
            waiting = self._blocked(missing, lambda: [("done", 1.0)])
            if isinstance(waiting, Blocked):
                return waiting
        return runs

    def _pair(self, child: str, incumbent: str, seed: int, stop_after: int | None = None
              ) -> Pair | Missing | CandidateResult | None:
        """(child's run, what it is compared with) for ``seed``; ``Missing`` what is not known; the child's run if it
        failed; ``None`` when the incumbent did not finish with that seed (the comparison pairs on the next one)."""
        missing: list[EvaluationRequest] = []
        theirs = self.control(incumbent, seed)
        if isinstance(theirs, Missing):
            missing += theirs.requests
        elif theirs.result.status != "completed":
            if stop_after is None:
                self.say(("skip", self.step, seed), f"    {incumbent} with seed {seed} ended {theirs.result.status}; "
                                                    "using the next seed")
            return None
        ours = self.representative(child, seed, stop_after)
        if isinstance(ours, Missing):
            missing += ours.requests
        if missing:
            return Missing(missing)
        if ours.result.status not in ("completed", "paused"):
            return ours.result
        return ours, theirs

    def _draw(self, child: str, incumbent: str, k: int, stop_after: int | None = None) -> Draw:
        """The first ``k`` usable pairs of the seed pool, in pool order, or every evaluation the first ``k`` seeds
        still need (trained in parallel). An outcome after a missing seed waits for it, so the decision does not
        depend on which run finished first."""
        draw = Draw()
        counted = 0
        for seed in self.config.seeds:
            if counted == k:
                break
            pair = self._pair(child, incumbent, seed, stop_after)
            if isinstance(pair, Missing):
                draw.missing += pair.requests
                counted += 1
            elif isinstance(pair, CandidateResult):
                if not draw.missing:
                    return Draw(draw.pairs, failed=pair)
                counted += 1
            elif pair is not None:
                draw.pairs.append(pair)
                counted += 1
        same_split(e for pair in draw.pairs for e in pair)
        return draw

    def _options(self, known: list[Pair], k: int) -> list[tuple[str, float]]:
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

    def compare(self, child: str, incumbent: str) -> Decided | Blocked:
        """Race ``child`` against ``incumbent`` over the seed pool: (verdict, the child's runs it used), or where it
        waits for evidence."""
        if self.b.warm_start:
            self.origin[child] = incumbent
        screened = self._screen(child, incumbent)
        if screened is not None:
            return screened
        race = SeedRace(min_seeds=self.min_seeds, max_seeds=self.max_seeds, spending=self.b.accept_spending,
                        min_gain=self.b.min_gain, confidence=self.b.confidence, borrow=self.borrow)
        pairs: list[Pair] = []
        while (k := race.wanted) is not None:
            draw = self._draw(child, incumbent, k)
            if draw.failed is not None:
                return _failure(draw, child)
            if draw.missing:
                waiting = self._blocked(draw.missing, lambda d=draw, k=k: self._options(d.pairs, k))
                if isinstance(waiting, Blocked):
                    return waiting
                if waiting == "more":
                    race.skip()
                    continue
                return Verdict(waiting == "accept", "assumed"), []
            if not draw.pairs:  # the incumbent ended unfinished with every seed: no gain
                return _failure(Draw(failed=self._unfinished(incumbent)), child)
            pairs = draw.pairs
            look, more = race.tell(np.stack([c.at() for c, _ in pairs]), np.stack([p.at() for _, p in pairs]))
            self._report(child, look, pairs, more)
        outcome = race.outcome
        self.measured.append(outcome.final.seed_component)
        return (Verdict.from_comparison(outcome.final, outcome.decision == "accept", outcome.decided_by),
                [c.result for c, _ in pairs[: outcome.seeds_used]])

    def _unfinished(self, incumbent: str) -> CandidateResult:
        theirs = self.control(incumbent, self.config.seeds[0])
        assert isinstance(theirs, Evaluated)  # every seed's control was found, unfinished
        return theirs.result

    def _report(self, child: str, look: Comparison, pairs: list[Pair], more: bool) -> None:
        pool = list(self.config.seeds)
        last = pairs[-1][0].result.seed
        after = pool[pool.index(last) + 1:]
        then = f"undecided -> adding seed {after[0]}" if more and after else (
            look.decision if look.decision != "undecided" else "undecided at the seed budget -> reject")
        self.say(("look", self.step, child, look.n_seeds), f"    {look.describe().rsplit('  ', 1)[0]}  {then}")

    def _screen(self, child: str, incumbent: str) -> Decided | Blocked | None:
        """Early look at ``screen_at`` of the epochs on the first ``min_seeds`` seeds: a child confidently worse
        than its incumbent there (P(gain > 0) <= 1 - confidence) stops; its checkpoint stays, so it resumes if it
        is ever needed again. Not confidently better by ``min_gain`` is no reason to stop: MSA nets often lag early.
        ``None``: train on."""
        epoch = self.screen_at
        if epoch is None:
            return None
        draw = self._draw(child, incumbent, self.min_seeds, stop_after=epoch)
        if draw.failed is not None:
            return _failure(draw, child)
        if draw.missing:
            waiting = self._blocked(draw.missing, lambda: [("train on", 0.5), ("screened", 0.5)])
            if isinstance(waiting, Blocked):
                return waiting
            return (Verdict(False, "screen"), []) if waiting == "screened" else None
        if not draw.pairs:
            return None
        pairs = draw.pairs
        look = compare_paired(np.stack([c.at(epoch) for c, _ in pairs]), np.stack([p.at(epoch) for _, p in pairs]),
                              0.0, self.b.confidence)
        verdict = "confidently worse -> stopped" if look.decision == "reject" else "-> training on"
        self.say(("screen", self.step, child),
                 f"    screen at epoch {epoch}: gain {look.gain:+.2f} pp, upper bound {look.bounds[1]:+.2f}  "
                 f"P(gain > 0) = {look.p_gain:.2f} (stop <= {1 - look.confidence:.2g})  {verdict}")
        if look.decision == "reject":
            return Verdict.from_comparison(look, False, "screen"), [c.result for c, _ in pairs]
        return None


def _failure(draw: Draw, child: str) -> Decided:
    """A child's run diverged (or the incumbent has no finished run to pair with): rejected with no gain, on the
    child's runs that finished before it. A crash is not a failure of the child: it is asked for again."""
    failed = draw.failed
    runs = [c.result for c, _ in draw.pairs] + ([failed] if failed is not None and failed.placement == child else [])
    return Verdict(False, "failure"), runs
