"""Searches replayed against a tabular benchmark (``alternas.search.table``): are their answers right, and at what
cost?

A replay draws a pool of ``pool_size`` seeds from the table's, runs a search as if those were its only seeds,
answering every evaluation it asks for from the table, and scores what it decided against the truth of the seeds
it did **not** use: a placement's true accuracy is its mean over the held-out seeds. So a search is never graded
by the noise it decided with.

Strategies: ``buildup`` (the real ``BuildupSearch``, answered by the table, with the study's settings:
every decision rule, screening and seed racing as a worker runs them) and Optuna's samplers ``tpe``, ``random``
and ``qmc`` over the same placements, each given the build-up's candidate-epochs of the same pool (paired budgets;
a placement is trained with every pool seed once, and a repeat costs nothing, as the evaluator's cache makes it).
Per strategy, over the pools:

* ``p_best``: how often the final placement is the true best;
* ``regret_pp``: true accuracy of the true best minus that of the final placement (the held-out best's mean minus
  the final's: biased up, since the best is picked on the seeds that measure it; it also carries ``cross_fit``, the
  same regret with the best picked and measured on different held-out seeds, biased down: ``cross_fit_regret``);
* ``false_accept``: accepted decisions whose true gain is not above ``min_gain``, over all such decisions;
* ``false_reject``: rejected decisions whose true gain is above ``min_gain``, over all such decisions (a decision
  whose true gain the held-out seeds cannot place on one side of ``min_gain`` is not graded: ``Truth``);
* ``candidate_epochs``: the training the search bought.

``decision-rule`` measures the paired sequential comparison alone: every ordered pair of placements of the table
is a comparison (both directions), decided on the pool and graded on the held-out seeds, so false accepts and the
power to accept a true gain are measured on real training noise even where no MSA helps.
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from alternas.errors import ConfigError
from alternas.models.bases import get_base
from alternas.placement import Placement
from alternas.search.decision import SeedVariance, SequentialOutcome, sequential_compare
from alternas.search.evaluated import Evaluated
from alternas.search.evaluator import CandidateResult, candidate_key
from alternas.search.planner import BuildupSearch
from alternas.search.policy import Step
from alternas.search.race import screen_epoch
from alternas.search.spaces import InvalidCandidate, SearchSpace, StageSpace, space_from_dict
from alternas.search.study import StudyConfig
from alternas.search.table import Table, start_placement

STRATEGIES = ("buildup", "tpe", "random", "qmc", "decision-rule")
BORROWED_COMPARISONS = 3  # the decision rule alone: pooled seed variances of this many other comparisons
FIELDS = ("p_best", "regret_pp", "false_accept", "false_reject", "candidate_epochs")


@dataclass
class Outcome:
    """One strategy's replay on one pool."""

    final: str | None
    p_best: float | None = None
    regret_pp: float | None = None
    regret_cross_fit_pp: float | None = None
    accepts_null: int = 0  # accepted decisions whose true gain <= min_gain
    decisions_null: int = 0
    rejects_true: int = 0  # rejected decisions whose true gain > min_gain
    decisions_true: int = 0
    ungraded: int = 0  # decisions whose true gain the held-out seeds cannot place on one side of min_gain
    candidate_epochs: float = 0.0


class Truth:
    """True accuracies of a pool: each placement's mean over the table's seeds outside the pool.

    The held-out mean is itself an estimate, so a decision is graded only where the held-out seeds settle it:
    ``gain_is`` says ``"above"`` (the paired held-out gain's 90 % interval lies above ``min_gain``), ``"not above"``
    (it lies at or below), or ``None`` (the truth is too close to call, and the decision is not graded)."""

    def __init__(self, table: Table, pool: list[int], level: float = 0.9) -> None:
        self.seeds = held_out = [s for s in table.seeds if s not in pool]  # the seeds that judge
        if len(held_out) < 2:
            raise ConfigError(f"the table has seeds {table.seeds}; a pool of {len(pool)} leaves fewer than 2 to judge "
                              "by (one seed cannot say how sure the truth is)")
        self.by_seed = {p: np.array([table.accuracy(p, [s]) for s in held_out]) for p in table.placements}
        self.acc = {p: float(v.mean()) for p, v in self.by_seed.items()}
        self._cross_fit: dict[str, float] = {}  # by final: every strategy of a pool asks for the same few
        self.best = max(self.acc, key=self.acc.get)
        # every placement tied with it (accuracies come in steps of one validation image): a final among them is
        # the true best, whatever the row order
        self.tied_best = {p for p, a in self.acc.items() if math.isclose(a, self.acc[self.best], abs_tol=1e-9)}
        from scipy import stats

        self._t = float(stats.t.ppf(0.5 + level / 2, len(held_out) - 1))

    def gain(self, child: str, parent: str) -> tuple[float, float, float]:
        """The held-out paired gain of ``child`` over ``parent`` in pp, with its interval (low, high) at the truth's
        ``level``."""
        self._require(child, parent)
        diff = self.by_seed[child] - self.by_seed[parent]
        half = self._t * float(diff.std(ddof=1)) / math.sqrt(len(diff))
        return float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half)

    def _require(self, *placements: str) -> None:
        missing = next((p for p in placements if p not in self.by_seed), None)
        if missing is not None:
            raise ConfigError(f"the table has no placement {missing}; compute a table of the study's space with "
                              "`alternas table`")

    def gain_is(self, child: str, parent: str, min_gain: float) -> str | None:
        _, low, high = self.gain(child, parent)
        if low > min_gain:
            return "above"
        if high <= min_gain:
            return "not above"
        return None

    def grade(self, outcome: Outcome, child: str, parent: str, min_gain: float, accepted: bool) -> None:
        """Count a decision against the truth (or not at all where the truth is too close to call)."""
        truth = self.gain_is(child, parent, min_gain)
        if truth == "above":
            outcome.decisions_true += 1
            outcome.rejects_true += not accepted
        elif truth == "not above":
            outcome.decisions_null += 1
            outcome.accepts_null += accepted
        else:
            outcome.ungraded += 1

    def grade_steps(self, outcome: Outcome, steps: Iterable[Step], min_gain: float) -> None:
        """Grade every decision of a build-up's trajectory (the start decides nothing)."""
        for step in steps:
            if step.decision != "start" and step.incumbent is not None:
                self.grade(outcome, step.placement, step.incumbent, min_gain, step.decision == "accept")

    def score(self, outcome: Outcome) -> Outcome:
        outcome.p_best = float(outcome.final in self.tied_best)
        outcome.regret_pp = self.acc[self.best] - self.acc[outcome.final]
        outcome.regret_cross_fit_pp = self.cross_fit_regret(outcome.final)
        return outcome

    def cross_fit_regret(self, final: str) -> float:
        """The final's regret with the best picked and measured on different held-out seeds
        (``cross_fit_regret``)."""
        self._require(final)
        if final not in self._cross_fit:
            placements = list(self.by_seed)
            self._cross_fit[final] = cross_fit_regret(np.stack(list(self.by_seed.values())), placements.index(final))
        return self._cross_fit[final]


def cross_fit_regret(acc: np.ndarray, final: int, max_splits: int = 256) -> float:
    """Regret (pp) of row ``final`` of ``acc`` (placements x seeds) to the best row, with the best picked on half of
    the seeds and the gap measured on the other half, averaged over such splits: every one where there are at most
    ``max_splits``, else ``max_splits`` drawn at random (seeded). Rows tied at the pick (accuracies come in steps of
    one validation image) share it: their measured means are averaged, so no row order decides.

    Picking the best and measuring it on the same seeds credits the pick with the luck that made it the pick (the
    winner's curse): among placements that truly tie, every one shows a regret above 0 on average, about 1.4 of a
    mean's standard error for 8 of them. Measured on seeds that did not pick it, the regret has no such bias; it
    errs the other way, since a pick on half the seeds can miss the true best. The true regret lies between the two
    on average."""
    n = acc.shape[1]
    if n < 2:
        raise ValueError("a cross-fit regret needs at least 2 seeds: one to pick the best, one to measure it")
    sizes = sorted({n // 2, (n + 1) // 2})
    if sum(math.comb(n, k) for k in sizes) <= max_splits:
        picks = [list(pick) for k in sizes for pick in itertools.combinations(range(n), k)]
    else:
        rng = np.random.default_rng(n)
        picks = [list(rng.permutation(n)[:sizes[i % len(sizes)]]) for i in range(max_splits)]
    regrets = []
    for pick in picks:
        measure = np.setdiff1d(np.arange(n), pick)
        picked = acc[:, pick].mean(axis=1)
        tied = np.flatnonzero(np.isclose(picked, picked.max(), rtol=0, atol=1e-9))
        regrets.append(float(acc[np.ix_(tied, measure)].mean() - acc[final, measure].mean()))
    return statistics.fmean(regrets)


def table_lookup(table: Table, config: StudyConfig) -> Callable[[str], Evaluated | None]:
    """Evaluation id -> the table's run of any of its seeds, as the build-up's ``lookup`` asks (a run the table
    lacks: ``None``). Cache keys do not depend on the study's seed pool, so one lookup serves every pool."""
    if config.recipe.total_epochs != table.total_epochs:
        raise ConfigError(f"the study trains {config.recipe.total_epochs} epochs, the table's runs "
                          f"{table.total_epochs}: only buildup.* settings can be replayed from a table")
    runs: dict[str, Evaluated] = {}
    last = table.rows.drop_duplicates(["placement", "seed"], keep="last").set_index(["placement", "seed"])
    for (placement, seed), row in last.iterrows():
        key = candidate_key(Placement.parse(placement), config, config.recipe, int(seed))
        if key != row.key:
            raise ConfigError(f"the table's {placement} seed {seed} was trained with other settings than the study "
                              "asks for: only buildup.* settings can be replayed from a table")
        correct = table.correct.get((placement, int(seed)))
        epochs = {e + 1: correct[e] for e in range(len(correct))} if correct is not None else {}
        result = CandidateResult(key, placement, placement.count("M"), int(seed), config.base, table.total_epochs,
                                 config.data.subset, row.status, val_acc=table.accuracy(placement, [int(seed)]),
                                 wall_time=float(row.wall_time), epochs_trained=int(row.epochs), run_dir="(table)")
        runs[f"{key}@end"] = Evaluated(result, epochs, len(correct) if correct is not None else None)
    return runs.get


def replay_buildup_on(table: Table, config: StudyConfig, truth: Truth,
                      lookup: Callable[[str], Evaluated | None] | None = None,
                      keys: dict[tuple, str] | None = None) -> Outcome:
    """The build-up of ``config`` (its seeds are the pool) answered by ``table`` (``lookup``: ``table_lookup``'s,
    ``keys``: cache keys memoised across replays)."""
    search = BuildupSearch(config, keys=keys, lookup=lookup or table_lookup(table, config))
    if missing := search.ask():  # the table answers all it holds: what is still asked for, it lacks (or ran crashed)
        request = missing[0]
        raise ConfigError(f"the table has no run of {request.placement} with seed {request.seed}, which the "
                          "build-up asks for; complete it with `alternas table` (or check the study's start)")
    replay = search.replay
    cost = {(r.placement, r.seed): float(r.epochs_trained) for r in (e.result for e in replay.fetched.values())}
    screen = screen_epoch(config)
    outcome = Outcome(replay.best)
    for step in replay.policy.steps:
        if step.decided_by == "screen" and screen is not None:
            for run in replay.used_runs.get(step.placement, []):
                cost[(run.placement, run.seed)] = float(screen)
    truth.grade_steps(outcome, replay.policy.steps, config.buildup.min_gain)
    outcome.candidate_epochs = sum(cost.values())
    return truth.score(outcome)


def table_space(table: Table, config: StudyConfig) -> SearchSpace:
    """The Optuna space over the table's placements: the space it was computed from, else per stage how many MSAs
    alternate from its end (the build-up's move), up to the most the table holds in that stage."""
    if table.space is not None:
        return space_from_dict(table.space, "the table's space")
    base = get_base(config.base)
    most = [max(Placement.parse(p).stages[s].count("M") for p in table.placements) for s in range(base.num_stages)]
    return SearchSpace(base.name, tuple(StageSpace((d,), "count", k) for d, k in zip(base.depths, most)),
                       source="table")


def replay_sampler(table: Table, config: StudyConfig, truth: Truth, sampler: str, budget: float, seed: int,
                   max_trials: int = 500) -> Outcome:
    """An Optuna search with ``sampler`` over the table's placements until it has bought ``budget`` epochs: each new
    placement costs every pool seed's run, a repeat is free; the final placement is the best pool mean. TPE and
    random search are the samplers ``alternas optuna`` runs (``make_sampler``); QMC is Optuna's Sobol sampler."""
    import optuna

    from alternas.search.optuna_search import make_sampler

    space = table_space(table, config)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():  # QMCSampler is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        chosen = (optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False) if sampler == "qmc"
                  else make_sampler(sampler, seed, space))
        study = optuna.create_study(direction="maximize", sampler=chosen)
    known = set(table.placements)
    pool = list(config.seeds)
    seen: dict[str, float] = {}
    spent = 0.0
    per_placement = float(len(pool) * table.total_epochs)
    for _ in range(max_trials):
        if spent + per_placement > budget + 1e-9 or len(seen) == len(known):
            break
        trial = study.ask()
        try:
            placement = str(space.sample(trial)[0])
        except InvalidCandidate:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        if placement not in known:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        if placement not in seen:
            seen[placement] = table.accuracy(placement, pool)
            spent += per_placement
        study.tell(trial, seen[placement])
    final = max(seen, key=seen.get) if seen else str(start_placement(config))  # bought nothing: kept the start
    return truth.score(Outcome(final, candidate_epochs=spent))


def replay_pairs(table: Table, config: StudyConfig, truth: Truth, seed: int = 0) -> Outcome:
    """Every ordered pair of placements decided by the sequential paired comparison on the pool, graded by the
    held-out seeds (a diverged run in either is left out: the comparison is about noise, not failures). With
    ``pool_seed_variance`` each pair borrows the seed variances that ``BORROWED_COMPARISONS`` other pairs of the
    pool, disjoint from it and drawn at random, measured: what a study's comparison after that many others has."""
    b = config.buildup
    low, high = config.seed_budget
    pool = list(config.seeds)
    outcome = Outcome(None)
    usable = {p: np.stack([table.correct_at(p, s) for s in pool]) for p in table.placements
              if all((p, s) in table.correct for s in pool)}

    def decide(child: str, parent: str, borrow: SeedVariance | None = None) -> SequentialOutcome:
        c, q = usable[child], usable[parent]
        return sequential_compare(lambda k: (c[:k], q[:k]), min_seeds=low, max_seeds=high,
                                  spending=b.accept_spending, min_gain=b.min_gain, confidence=b.confidence,
                                  borrow=borrow)

    pairs = [(child, parent) for child in usable for parent in usable if child != parent]
    measured = {}
    if b.pool_seed_variance:
        measured = {(a, c): decide(a, c).final.seed_component for a, c in itertools.combinations(usable, 2)}
    rng = np.random.default_rng(seed)
    seeds_used = []
    for child, parent in pairs:
        borrow = None
        if b.pool_seed_variance:  # up to BORROWED_COMPARISONS pairs sharing no placement with it or each other
            picked: list[tuple[str, str]] = []
            others = [pair for pair in measured if not {child, parent} & set(pair)]
            for i in rng.permutation(len(others)):
                if len(picked) < BORROWED_COMPARISONS and not any(set(others[i]) & set(p) for p in picked):
                    picked.append(others[i])
            borrow = SeedVariance.pooled(measured[pair] for pair in picked)
        result = decide(child, parent, borrow)
        seeds_used.append(result.seeds_used)
        truth.grade(outcome, child, parent, b.min_gain, result.decision == "accept")
    outcome.candidate_epochs = 2 * float(np.mean(seeds_used)) * table.total_epochs if seeds_used else 0.0
    return outcome


def replay_search(table: Table, config: StudyConfig, strategies: tuple[str, ...] = STRATEGIES, pools: int = 200,
                  pool_size: int = 3, seed: int = 0, log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Replay each strategy on ``pools`` random pools of ``pool_size`` of the table's seeds (the study's seeds are
    replaced by each pool) and summarise it: one row per strategy with ``FIELDS``, each a mean with a 90 %
    interval over the pools (rates pooled over decisions)."""
    strategies = tuple(dict.fromkeys(strategies))
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise ConfigError(f"unknown strategy {(unknown or [''])[0]!r}; choose from {', '.join(STRATEGIES)}")
    require_complete(table)
    if config.buildup.warm_start:
        raise ConfigError("a table holds runs from scratch; a warm-started build-up cannot be replayed from it")
    size = pool_size
    if size > len(table.seeds) - 2:
        raise ConfigError(f"a pool of {size} seeds from the table's {len(table.seeds)} leaves fewer than 2 to judge "
                          "by; use a smaller pool or a table with more seeds")
    b = config.buildup
    if (b.min_seeds or 0) > size or (b.max_seeds or 0) > size:
        raise ConfigError(f"buildup.min_seeds/max_seeds ({b.min_seeds}/{b.max_seeds}) exceed the pool of {size} "
                          "seeds; lower them or raise the pool size")
    per: dict[str, list[Outcome]] = {s: [] for s in strategies}
    lookup, keys = table_lookup(table, config), {}
    drawn = seed_pools(table.seeds, size, pools, seed)
    for i, pool in enumerate(drawn):
        pool_config = replace(config, seeds=tuple(pool))
        truth = Truth(table, pool)
        buildup = replay_buildup_on(table, pool_config, truth, lookup, keys)
        if "buildup" in per:
            per["buildup"].append(buildup)
        for name in strategies:
            if name in ("tpe", "random", "qmc"):
                per[name].append(replay_sampler(table, pool_config, truth, name, buildup.candidate_epochs, seed + i))
            elif name == "decision-rule":
                per[name].append(replay_pairs(table, pool_config, truth, seed + i))
        if (i + 1) % max(1, len(drawn) // 10) == 0:
            log(f"  {i + 1}/{len(drawn)} pools replayed")
    return [summarise(name, outcomes) for name, outcomes in per.items()]


def require_complete(table: Table) -> None:
    """Refuse a table with runs missing: a missing run would count as 0 % in every truth drawn from it."""
    if not table.complete:
        missing = [(p, s) for p in table.placements for s in table.seeds if (p, s) not in table.runs]
        raise ConfigError(f"the table lacks {len(missing)} of its runs (e.g. {missing[0][0]} seed {missing[0][1]}); "
                          "complete it with `alternas table` before grading searches by it")


def seed_pools(seeds: list[int], size: int, pools: int, seed: int = 0) -> list[list[int]]:
    """``pools`` distinct ordered pools of ``size`` seeds (order matters: a race starts with the first ones), or
    every such pool when there are fewer. The pools share the table's seeds, so their spread is that of this
    table's seeds, not of new tables."""
    rng = np.random.default_rng(seed)
    count = math.perm(len(seeds), size)
    if count <= max(pools, 100_000):
        every = list(itertools.permutations(seeds, size))
        picks = range(count) if pools >= count else rng.choice(count, pools, replace=False)
        return [list(map(int, every[i])) for i in picks]
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < pools:
        chosen.setdefault(tuple(int(s) for s in rng.choice(seeds, size, replace=False)))
    return [list(p) for p in chosen]


def summarise(strategy: str, outcomes: list[Outcome]) -> dict:
    """Means over the pools with 90 % intervals (t for means, bootstrap over pools for pooled rates)."""
    row: dict = {"strategy": strategy}
    for name in ("p_best", "regret_pp", "candidate_epochs"):
        row[name] = _mean_interval([getattr(o, name) for o in outcomes if getattr(o, name) is not None])
    if row["regret_pp"] is not None:
        row["regret_pp"]["cross_fit"] = _mean_interval([o.regret_cross_fit_pp for o in outcomes
                                                        if o.regret_cross_fit_pp is not None])
    ungraded = sum(o.ungraded for o in outcomes)
    for name, counts in (("false_accept", [(o.accepts_null, o.decisions_null) for o in outcomes]),
                         ("false_reject", [(o.rejects_true, o.decisions_true) for o in outcomes])):
        row[name] = _pooled_rate(counts)
        if row[name] is not None:
            row[name]["ungraded"] = ungraded  # decisions too close to min_gain for the held-out seeds to grade
    return row


def _mean_interval(values: list[float], level: float = 0.9) -> dict | None:
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci": [mean, mean], "n": len(values)}
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci": [mean - half, mean + half], "n": len(values)}


def _pooled_rate(counts: list[tuple[int, int]], level: float = 0.9, resamples: int = 2000) -> dict | None:
    """Events over decisions, pooled over pools, with a bootstrap interval over pools (decisions of one pool share
    its seeds); ``None`` when no decision of that kind happened."""
    hits = np.array([h for h, _ in counts], dtype=float)
    totals = np.array([n for _, n in counts], dtype=float)
    if totals.sum() == 0:
        return None
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(counts), (resamples, len(counts)))
    boot = hits[picks].sum(1) / np.maximum(totals[picks].sum(1), 1)
    boot = boot[totals[picks].sum(1) > 0]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(hits.sum() / totals.sum()), "ci": [float(lo), float(hi)], "n": int(totals.sum())}


def describe(rows: list[dict]) -> str:
    """The rows as a table for the terminal."""
    def fmt(v: dict | None, pct: bool = False) -> str:
        if v is None:
            return "n/a"
        scale = 100 if pct else 1
        return f"{v['mean'] * scale:.2f} [{v['ci'][0] * scale:.2f}, {v['ci'][1] * scale:.2f}]"

    head = f"{'strategy':<15} {'P(best) %':<22} {'regret pp':<22} {'regret, cross-fitted':<22} " \
           f"{'false accept %':<22} {'false reject %':<22} candidate-epochs"
    lines = [head]
    for r in rows:
        cross_fit = r["regret_pp"].get("cross_fit") if r["regret_pp"] else None  # rows saved before it had none
        lines.append(f"{r['strategy']:<15} {fmt(r['p_best'], True):<22} {fmt(r['regret_pp']):<22} {fmt(cross_fit):<22} "
                     f"{fmt(r['false_accept'], True):<22} {fmt(r['false_reject'], True):<22} "
                     f"{fmt(r['candidate_epochs'])}")
    return "\n".join(lines)
