"""The build-up replayed from finished evaluations, in ask-and-tell form, and the planner of speculative work.

**Many workers, one search, no leader.** Every decision is a function of finished evaluations, so the search is
replayed from what is known rather than stepped: ``replay_buildup`` drives the policy (``alternas.search.policy``)
with the race (``alternas.search.race``) and stops at the first look that lacks evidence, naming every evaluation
that look needs. ``BuildupSearch`` wraps it as Optuna's ask-and-tell does a study: ``tell`` it finished
evaluations, ``ask`` it which it needs next. The worker loop, the what-if planner and the table replay (which gives it
the table as a bulk ``lookup``) all drive it, and any number of workers make the same decisions, since the same
evaluations replay to the same ones.

``plan_buildup`` also replays what-if branches of the pending look (accepted, rejected, or undecided and asking
for more seeds, weighted by its ``p_gain``) to rank speculative evaluations by how likely each is to be needed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from alternas.models.bases import get_base
from alternas.placement import Placement
from alternas.search.evaluated import Evaluated, EvaluationRequest
from alternas.search.evaluator import CandidateResult, score_over
from alternas.search.policy import BuildupPolicy
from alternas.search.race import Blocked, Lookup, Race, Say
from alternas.search.study import StudyConfig

WHAT_IFS = 16  # what-if branches a worker plans ahead: real workers and `alternas bench buildup-workers` alike


def _silent(key: tuple, line: str) -> None:
    """A ``Say`` that prints nothing (what-if branches and background planning)."""


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


def step_label(config: StudyConfig, step: int) -> str:
    return f"[candidate {step + 1}/<={config.buildup.max_candidates}]"


def replay_buildup(config: StudyConfig, lookup: Lookup, assume: Iterable[str] = (), say: Say = _silent,
                   keys: dict[tuple, str] | None = None) -> Replay:
    """Replay the build-up of ``config`` over the evaluations ``lookup`` knows (by ``evaluation_id``): every
    decision they allow, then ``blocked`` at the first look missing evidence — or, a what-if, the next
    ``assume``d outcome there. ``say(key, line)`` receives the terminal lines (the same key for the same line on
    every replay); ``keys`` memoises cache keys across replays."""
    b = config.buildup
    race = Race(config, lookup, assume, say, {} if keys is None else keys)
    start = Placement.parse(b.start) if b.start else Placement.all_conv(get_base(config.base).depths)
    policy = BuildupPolicy(start, min_gain=b.min_gain, patience=b.patience)
    replay = Replay(policy, {}, race.runs, race.fetched)
    while (placement := policy.propose()) is not None:
        if len(policy.steps) >= b.max_candidates:
            replay.stopped_by = "max_candidates"
            return replay
        if b.budget_hours is not None and race.spent / 3600 >= b.budget_hours:
            replay.stopped_by = "budget"
            return replay
        race.step = len(policy.steps)
        name = str(placement)
        say(("candidate", race.step, name), f"{step_label(config, race.step)} {name}  ({placement.describe()})"
            + (f"  vs {policy.best}" if policy.best is not None else "  start"))
        ended = race.start(name) if policy.best is None else race.compare(name, str(policy.best))
        if isinstance(ended, Blocked):
            replay.blocked = ended
            return replay
        verdict, runs = (None, ended) if isinstance(ended, list) else ended
        replay.used_runs[name] = runs
        score, sd = score_over(runs)
        step = policy.observe(score, sd, verdict, [r.seed for r in runs])
        score_text = "n/a" if score is None else f"{score:.2f} ± {sd:.2f}"
        how = f" ({step.decided_by})" if step.decided_by else ""
        say(("step", step.step, name), f"    val acc {score_text} over seeds {step.seeds_used}  -> "
            f"{step.decision}{how}; best {step.best_after}")
    replay.stopped_by = "finished"
    return replay


class BuildupSearch:
    """The build-up of ``config`` in ask-and-tell form: ``tell`` it each finished evaluation, ``ask`` it which
    evaluations its pending look needs (none once it is decided), read where it stands from ``replay``.

    It never trains, waits or raises to say that it needs more: whoever drives it (a worker on a shared storage, a
    table's replay, the many-worker simulation) runs what ``ask`` names and tells the results. ``say`` receives
    the terminal lines of the decisions, each once per key. ``lookup`` answers, by evaluation id, what was never
    told: evaluations known in bulk (a table), so that they are not told one ask at a time, each ask a replay.
    """

    def __init__(self, config: StudyConfig, say: Say = _silent, keys: dict[tuple, str] | None = None,
                 lookup: Lookup | None = None) -> None:
        self.config, self.say, self.lookup = config, say, lookup
        self.keys: dict[tuple, str] = {} if keys is None else keys  # cache keys, memoised across replays
        self.known: dict[str, Evaluated] = {}
        self._replay: Replay | None = None

    def _find(self, evaluation_id: str) -> Evaluated | None:
        """What was told, else what ``lookup`` (evaluations known in bulk: a table) holds."""
        found = self.known.get(evaluation_id)
        return found if found is not None or self.lookup is None else self.lookup(evaluation_id)

    def tell(self, evaluation_id: str, evaluated: Evaluated) -> None:
        """A finished evaluation, by its id (``evaluation_id``). A crashed one is never decided on: it is asked for
        again."""
        if self.known.get(evaluation_id) is not evaluated:
            self.known[evaluation_id] = evaluated
            self._replay = None

    def ask(self) -> list[EvaluationRequest]:
        """The evaluations the pending look needs, each runnable now; empty once the search is decided."""
        blocked = self.replay.blocked
        return [] if blocked is None else blocked.requests

    @property
    def replay(self) -> Replay:
        """Every decision the known evaluations allow, and where the search waits (``blocked``) or why it stopped."""
        if self._replay is None:
            self._replay = replay_buildup(self.config, self._find, say=self.say, keys=self.keys)
        return self._replay

    def what_if(self, assume: Iterable[str]) -> Blocked | None:
        """Where the search would wait next if its pending looks ended as ``assume`` says, in order (``None``: it
        would end)."""
        return replay_buildup(self.config, self._find, assume=assume, keys=self.keys).blocked


@dataclass
class Plan:
    """What to evaluate next: the replay of what is known, and the evaluations to run, most needed first (weight
    1: the pending look needs it; less: a what-if branch does, weighted by how likely that branch is)."""

    replay: Replay
    requests: list[tuple[EvaluationRequest, float]]


def plan_buildup(search: BuildupSearch, what_ifs: int = WHAT_IFS) -> Plan:
    """``search``'s pending look, then up to ``what_ifs`` what-if branches of its looks, likeliest first: the
    evaluations each branch would need next are the speculative work, weighted by the branch's probability."""
    replay = search.replay
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
        branch = search.what_if(path)
        if branch is None:
            continue
        for request in branch.requests:
            weight.setdefault(request, -neg)  # best-first: the first branch to need it is the likeliest
        for option, w in branch.options:
            heapq.heappush(frontier, (neg * w, tie, (*path, option)))
            tie += 1
    return Plan(replay, sorted(weight.items(), key=lambda item: -item[1]))
