"""Did the added MSA improve accuracy? Paired, calibrated answers, and when to buy more seeds.

The build-up's single question is answered from per-example evidence (``alternas.train.evidence``): ``child`` and
``parent`` are (seeds, examples) 0/1 correctness arrays, row ``s`` of both trained with the same seed and scored
on the same validation set. Pairing by seed removes what a seed does to every placement alike; pairing by
example removes which examples are easy.

**Noise model.** The per-example differences ``D[s, i] = child[s, i] - parent[s, i]`` follow a two-way crossed
random-effects model, ``D = mu + a_s + b_i + e_si``: ``a_s`` is what training seed ``s`` does to the gain, ``b_i``
how example ``i`` reacts to the change (the validation set is a finite sample of such examples), ``e_si`` the
rest. The variance of the mean gain is ``var(a)/S + var(b)/N + var(e)/(S N)``, estimated from the ANOVA mean
squares as ``(max(MS_seeds - MS_resid, 0) + MS_examples) / (S N)`` with Satterthwaite's degrees of freedom, so
the interval is a Student t. With two or three seeds the seed term has one or two degrees of freedom, and the
interval is wide: that is the honest answer, and what sequential seeds are for. With one seed the seed term
cannot be estimated and only example-level noise is counted (a paired, McNemar-like interval).

**Seed noise borrowed from the study (empirical Bayes; ``buildup.pool_seed_variance``, off by default).** Two or
three seeds give the seed term one or two degrees of freedom. As limma's moderated t does for genes, a comparison may
borrow the seed component ``var(a)`` its study's earlier comparisons measured (``SeedVariance``, pooled by degrees of
freedom, floored at zero, its df capped at ``BORROWED_DF_CAP``: comparisons sharing an incumbent and its seeds are
not independent). The seed mean square, whose expectation is ``n var(a) + var(e)``, becomes the df-weighted average
of its own and ``n var(a)_borrowed + MS_resid``, with the summed degrees of freedom. One seed then counts seed noise
too, at the borrowed level. That is a bet that the comparisons share their seed noise, and two or three seeds
cannot check it. On the brightest table it loses: a start that converges badly (per-seed SD 4-8 pp) hands the later
comparisons within the converged c4 family a seed variance several times their own, and replayed build-ups find
that table's best placement in 5.5 % of pools with it against 27 % without; on the other two tables it moves no
build-up's regret and saves 3 % of the cost (docs/concepts/ground-truth.md).

``p_gain`` is the t-distribution's probability that the true gain exceeds ``min_gain`` (the confidence
distribution of the gain). ``accept`` when ``p_gain >= accept_at`` (``confidence`` for a single look), ``reject``
when ``p_gain <= 1 - confidence``, else ``undecided``. A sequential comparison looks several times at growing
evidence; to keep its false-accept rate at ``1 - confidence`` over all its looks, each look may spend only a share of
that rate, and the shares sum to it (a union bound: valid whatever the looks' correlation). ``accept_level`` gives
each look its share: ``"power"`` (the default) spends by the share of seeds seen, ``alpha (k / max_seeds)^3`` by
the look at ``k`` seeds (the Kim-DeMets power family with rho = 3, close to O'Brien-Fleming's boundary), so looks at
few seeds, whose t has one or two degrees of freedom and rarely accepts anyway, keep little (from 2 to 3 seeds:
accept at 0.970, then 0.930; from 2 to 5: 0.994, 0.985, 0.970, 0.951; a first look that already has most of the
seeds keeps its share of them: from 4 to 5, 0.949 then 0.951); ``"equal"`` splits it evenly (Bonferroni: 0.95 at each
of two looks). Rejecting needs no such correction: an undecided comparison is rejected at the end anyway.
``tests/test_decision.py`` checks the rates by simulation.

What a reader sees is the same rule as an interval, ``bounds``: its lower end is the one-sided bound at the accept
level, its upper end the one-sided bound at ``confidence``. The comparison accepts exactly when the lower end is at
or above ``min_gain``, rejects exactly when the upper end is at or below it, and is undecided while the interval
holds it strictly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of a child with its parent (or incumbent). Gains are in percentage points."""

    gain: float
    ci: tuple[float, float]
    p_gain: float
    decision: str
    min_gain: float
    confidence: float
    accept_at: float  # p_gain needed to accept (confidence; a sequential comparison's look: its accept_level)
    bounds: tuple[float, float]  # the decision's interval: accept iff bounds[0] >= min_gain, reject iff bounds[1] <=
    se: float
    df: float
    n_seeds: int
    n_examples: int
    seed_gains: tuple[float, ...]  # the gain seed by seed, pp
    borrowed: SeedVariance | None = None  # the study's pooled seed component this comparison's seed term borrowed
    seed_component: SeedVariance | None = None  # what this comparison measured of it (None on one seed)

    def describe(self) -> str:
        """One line for the terminal: gain, the decision's interval, probability against the thresholds, decision."""
        borrowed = (f"  seed noise pooled with {self.borrowed.df:g} df of earlier comparisons"
                    if self.borrowed is not None else "")
        return (f"gain {self.gain:+.2f} pp [{self.bounds[0]:+.2f}, {self.bounds[1]:+.2f}]  "
                f"P(gain > {self.min_gain:g}) = {self.p_gain:.2f} (accept >= {self.accept_at:.3g}, reject <= "
                f"{1 - self.confidence:.2g}){borrowed}  {self.decision}")



BORROWED_DF_CAP = 6.0  # the comparisons of one build-up share its incumbents and seeds: their pooled seed component
# is worth about as much as a few independent ones however many there are (a 3-seed pool: at most ~8 df), so it
# never counts for more than three 3-seed comparisons


@dataclass(frozen=True)
class SeedVariance:
    """The seed component of a gain's variance, var(a) in pp^2 (what a training seed does to the gain beyond the
    example-level noise; an estimate, so possibly below zero), and its degrees of freedom."""

    variance: float
    df: float

    @classmethod
    def pooled(cls, measured: Iterable[SeedVariance | None], max_df: float = BORROWED_DF_CAP) -> SeedVariance | None:
        """The df-weighted pool of several comparisons' seed components (floored at zero, its df capped at
        ``max_df``), or ``None`` when none measured one."""
        known = [m for m in measured if m is not None and m.df > 0]
        df = sum(m.df for m in known)
        if not df:
            return None
        return cls(max(sum(m.variance * m.df for m in known) / df, 0.0), min(df, max_df))


@dataclass(frozen=True)
class _MeanSquares:
    """The ANOVA mean squares of a (seeds, examples) array of paired differences, with their degrees of freedom:
    computed once per comparison, read by its variance and by the seed component it hands to later comparisons."""

    n_seeds: int
    n_examples: int
    seeds: float
    resid: float
    examples: float
    df_seeds: float
    df_resid: float
    df_examples: float

    @classmethod
    def of(cls, diff: np.ndarray) -> _MeanSquares:
        s, n = diff.shape
        example_means = diff.mean(axis=0)
        ms_examples = s * example_means.var(ddof=1) if n > 1 else 0.0
        seed_means = diff.mean(axis=1)
        ms_seeds = n * seed_means.var(ddof=1) if s > 1 else 0.0
        resid = diff - seed_means[:, None] - example_means[None, :] + diff.mean()
        df_resid = (s - 1) * (n - 1)
        ms_resid = float((resid**2).sum() / df_resid) if df_resid else 0.0
        return cls(s, n, float(ms_seeds), ms_resid, float(ms_examples), float(s - 1), float(df_resid),
                   float(max(n - 1, 1)))

    def seed_component(self) -> SeedVariance | None:
        if self.n_seeds < 2:
            return None
        return SeedVariance((self.seeds - self.resid) / self.n_examples, self.df_seeds)

    def gain_variance(self, borrow: SeedVariance | None) -> tuple[float, float]:
        s, n = self.n_seeds, self.n_examples
        if s == 1 and borrow is None:
            return self.examples / n, self.df_examples
        ms_seeds, df_seeds = self.seeds, self.df_seeds
        if borrow is not None:  # E[MS_seeds] = n var(a) + var(e): the borrowed var(a) plus this comparison's var(e)
            expected = n * borrow.variance + self.resid
            ms_seeds = (df_seeds * ms_seeds + borrow.df * expected) / (df_seeds + borrow.df)
            df_seeds += borrow.df
        # the seed component is floored at zero, but its uncertainty always counts: two seeds that happen to agree
        # say little about the next one (dropping that term made single looks at two seeds over-confident). With
        # one seed the residual is inside the example term (df_resid 0, nothing subtracted).
        total = max(ms_seeds - self.resid, 0.0) + self.examples
        denom = ms_seeds**2 / df_seeds + self.resid**2 / max(self.df_resid, 1) + self.examples**2 / self.df_examples
        df = total**2 / denom if denom > 0 else self.df_examples
        return total / (s * n), float(max(df, 1.0))


def seed_component(diff: np.ndarray) -> SeedVariance | None:
    """What one comparison measured of var(a), the seed component of its gain's variance (``None`` on one seed)."""
    return _MeanSquares.of(diff).seed_component()


def gain_variance(diff: np.ndarray, borrow: SeedVariance | None = None) -> tuple[float, float]:
    """(variance of the mean, Satterthwaite degrees of freedom) of a (seeds, examples) array of paired differences
    under the crossed seed x example random-effects model, its seed term moderated by ``borrow`` if given."""
    return _MeanSquares.of(diff).gain_variance(borrow)


def compare_paired(
    child: np.ndarray,
    parent: np.ndarray,
    min_gain: float = 0.0,
    confidence: float = 0.9,
    *,
    accept_at: float | None = None,
    borrow: SeedVariance | None = None,
) -> Comparison:
    """Compare ``child`` with ``parent``: (n_seeds, n_examples) arrays of 0/1 correctness, paired by row (seed)
    and column (validation example), the seed term moderated by the study's pooled ``borrow`` if given; a look of
    a sequential comparison accepts at its ``accept_level`` (default: ``confidence``). See the module docstring for
    the noise model."""
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    accept_at = confidence if accept_at is None else accept_at
    if not confidence <= accept_at < 1:
        raise ValueError(f"accept_at must be in [confidence, 1), got {accept_at}")
    child = np.atleast_2d(np.asarray(child, dtype=np.float64))
    parent = np.atleast_2d(np.asarray(parent, dtype=np.float64))
    if child.shape != parent.shape or child.size == 0:
        raise ValueError(f"child and parent must be non-empty arrays of one shape, got {child.shape} and "
                         f"{parent.shape}")
    diff = (child - parent) * 100.0
    n_seeds, n_examples = diff.shape
    gain = float(diff.mean())
    mean_squares = _MeanSquares.of(diff)
    variance, df = mean_squares.gain_variance(borrow)
    se = math.sqrt(max(variance, 0.0))
    if se > 0:
        p_gain = float(stats.t.cdf((gain - min_gain) / se, df))
        half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
        bounds = (gain - float(stats.t.ppf(accept_at, df)) * se, gain + float(stats.t.ppf(confidence, df)) * se)
    else:  # identical outcomes everywhere: the sign of the difference is all there is
        p_gain = 0.5 if gain == min_gain else float(gain > min_gain)
        half = 0.0
        bounds = (gain, gain)
    decision = "accept" if p_gain >= accept_at else "reject" if p_gain <= 1 - confidence else "undecided"
    return Comparison(gain, (gain - half, gain + half), p_gain, decision, min_gain, confidence, accept_at, bounds,
                      se, df, n_seeds, n_examples, tuple(float(v) for v in diff.mean(axis=1)), borrow,
                      mean_squares.seed_component())


SPENDINGS = ("power", "equal")  # how a race's looks share its false-accept rate (``accept_level``)
POWER_SPENDING_RHO = 3.0  # Kim & DeMets' power family: rho = 3 is close to O'Brien & Fleming's boundary


def _check_spending(spending: str) -> None:
    if spending not in SPENDINGS:
        raise ValueError(f"spending must be one of {', '.join(SPENDINGS)}, got {spending!r}")


def accept_level(k: int, min_seeds: int, max_seeds: int, confidence: float, spending: str = "power") -> float:
    """The ``p_gain`` a look at ``k`` seeds needs to accept, in a race from ``min_seeds`` to ``max_seeds``: the looks'
    shares of the false-accept rate ``1 - confidence`` sum to it (module docstring)."""
    _check_spending(spending)
    if not 1 <= min_seeds <= k <= max_seeds:
        raise ValueError(f"a race from {min_seeds} to {max_seeds} seeds has no look at {k}")
    alpha = 1 - confidence
    if spending == "equal":
        return 1 - alpha / (max_seeds - min_seeds + 1)

    def spent(seeds: int) -> float:  # the share spent by the look at ``seeds`` (none before the first)
        return (seeds / max_seeds) ** POWER_SPENDING_RHO if seeds >= min_seeds else 0.0

    return 1 - alpha * (spent(k) - spent(k - 1))


@dataclass
class SequentialOutcome:
    """Where a sequential comparison ended: its last look, the seeds it used and what decided it."""

    final: Comparison
    decision: str  # accept | reject
    decided_by: str  # confidence | seed budget
    looks: list[Comparison] = field(default_factory=list)

    @property
    def seeds_used(self) -> int:
        return self.final.n_seeds


class SeedRace:
    """Racing over seeds in ask-and-tell form: ``wanted`` is how many seeds the next look needs, ``tell`` gives it
    their (k, n_examples) child and parent arrays, ``outcome`` says how it ended once decided.

    The first look is at ``min_seeds``; while undecided and seeds remain, one more seed and look again. Undecided at
    ``max_seeds`` (or when fewer rows than asked for came: the pool ran out) is a reject decided by the seed budget
    (the rule: "if it does not improve"). Each look accepts at its ``accept_level`` under ``spending`` (module
    docstring); ``borrow`` is the study's pooled seed variance.
    """

    def __init__(self, *, min_seeds: int, max_seeds: int, spending: str, min_gain: float = 0.0,
                 confidence: float = 0.9, borrow: SeedVariance | None = None) -> None:
        if not 1 <= min_seeds <= max_seeds:
            raise ValueError(f"need 1 <= min_seeds <= max_seeds, got {min_seeds} and {max_seeds}")
        _check_spending(spending)
        self.min_seeds, self.max_seeds, self.min_gain, self.confidence = min_seeds, max_seeds, min_gain, confidence
        self.borrow, self.spending = borrow, spending
        self.looks: list[Comparison] = []
        self.outcome: SequentialOutcome | None = None
        self._k: int | None = min_seeds

    @property
    def wanted(self) -> int | None:
        """Seeds the next look needs; ``None`` once decided."""
        return self._k

    def tell(self, child: np.ndarray, parent: np.ndarray) -> tuple[Comparison, bool]:
        """Look at the evidence of ``wanted`` seeds: (the look, whether a seed is added for another look)."""
        k = self._require()
        look = compare_paired(child, parent, self.min_gain, self.confidence, borrow=self.borrow,
                              accept_at=accept_level(k, self.min_seeds, self.max_seeds, self.confidence, self.spending))
        self.looks.append(look)
        more = look.decision == "undecided" and k < self.max_seeds and len(child) == k
        if look.decision != "undecided":
            self._end(look.decision, "confidence")
        elif more:
            self._k = k + 1
        else:
            self._end("reject", "seed budget")
        return look, more

    def skip(self) -> None:
        """No look at ``wanted`` seeds (a what-if replay of the build-up assumed it undecided): on to the next."""
        k = self._require()
        if k < self.max_seeds:
            self._k = k + 1
        else:
            self._end("reject", "seed budget")

    def _require(self) -> int:
        if self._k is None:
            raise RuntimeError("the race is decided: nothing more to look at")
        return self._k

    def _end(self, decision: str, decided_by: str) -> None:
        if not self.looks:
            raise RuntimeError("a race cannot end without a look")
        self.outcome, self._k = SequentialOutcome(self.looks[-1], decision, decided_by, list(self.looks)), None


def sequential_compare(
    evidence: Callable[[int], tuple[np.ndarray, np.ndarray] | None],
    *,
    min_seeds: int,
    max_seeds: int,
    spending: str,
    min_gain: float = 0.0,
    confidence: float = 0.9,
    on_look: Callable[[Comparison, int, bool], None] | None = None,
    borrow: SeedVariance | None = None,
) -> SequentialOutcome:
    """A ``SeedRace`` run to its end: ``evidence(k)`` returns the (k, n_examples) child and parent arrays of the
    first ``k`` seeds (fewer rows: the pool ran out; ``None``: no look at ``k``), ``on_look(comparison, seeds,
    will_add_seed)`` lets the caller report each look."""
    race = SeedRace(min_seeds=min_seeds, max_seeds=max_seeds, spending=spending, min_gain=min_gain,
                    confidence=confidence, borrow=borrow)
    while (k := race.wanted) is not None:
        arrays = evidence(k)
        if arrays is None:
            race.skip()
            continue
        look, more = race.tell(*arrays)
        if on_look is not None:
            on_look(look, look.n_seeds, more)
    assert race.outcome is not None
    return race.outcome
