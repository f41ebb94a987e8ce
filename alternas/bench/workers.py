"""The many-worker build-up simulated without training (``alternas bench buildup-workers``): the real planner and
decisions on simulated seed noise, to measure wall-time speedup and speculative work."""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Callable

import numpy as np

from alternas.search.planner import WHAT_IFS

# PAPER.md §3.3: the authors' CIFAR-100 build-up, placement -> accuracy (%)
PAPER_BUILDUP = {
    "CCC,CCCC,CCCCCC,CCCC": 82.48, "CCC,CCCC,CCCCCC,CCCM": 83.45, "CCC,CCCC,CCCCCC,CMCM": 83.66,
    "CCC,CCCC,CCCCCM,CMCM": 83.77, "CCC,CCCC,CCCMCM,CMCM": 83.52, "CCC,CCCC,CMCMCM,CMCM": 83.19,
    "CCC,CCCM,CCCCCM,CMCM": 84.02, "CCC,CMCM,CCCCCM,CMCM": 83.39, "CCM,CCCM,CCCCCM,CMCM": 83.80,
}


class SimulatedTraining:
    """Outcomes of a paper-like build-up without training: each (placement, seed) run gets an accuracy (PAPER.md
    §3.3's value, or for a placement the paper did not train 84.02 minus up to 1.2 pp), seed noise of ``seed_sd``
    pp, per-example correctness correlated across runs through a shared example difficulty (``rho``), and a
    duration of one time unit (a from-scratch run of the base) plus 5 % per MSA, with 10 % log-normal jitter."""

    def __init__(self, examples: int = 2000, seed: int = 0, seed_sd: float = 0.3, rho: float = 0.6) -> None:
        self.seed, self.seed_sd, self.rho = seed, seed_sd, rho
        self.difficulty = np.random.default_rng([seed, 0]).standard_normal(examples)

    def accuracy(self, placement: str) -> float:
        if placement in PAPER_BUILDUP:
            return PAPER_BUILDUP[placement]
        return 84.02 - 1.2 * (zlib.crc32(f"{self.seed}:{placement}".encode()) % 1000) / 1000

    def _rng(self, request) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(request.placement.encode()), request.seed])

    def duration(self, request) -> float:
        num_msa = request.placement.count("M")
        return (1 + 0.05 * num_msa) * float(np.exp(self._rng(request).normal(0, 0.1)))

    def evaluate(self, request, config):
        from scipy.stats import norm

        from alternas.search.evaluated import Evaluated
        from alternas.search.evaluator import CandidateResult

        rng = self._rng(request)
        rng.normal()  # the duration's draw
        acc = (self.accuracy(request.placement) + rng.normal(0, self.seed_sd)) / 100
        score = np.sqrt(self.rho) * self.difficulty + np.sqrt(1 - self.rho) * rng.standard_normal(len(self.difficulty))
        correct = score < norm.ppf(acc)
        epochs = config.recipe.total_epochs
        result = CandidateResult(request.key, request.placement, request.placement.count("M"), request.seed,
                                 config.base, epochs, None, "completed", val_acc=100 * float(correct.mean()),
                                 wall_time=self.duration(request), epochs_trained=epochs)
        return Evaluated(result, {epochs: correct}, epochs)


def simulate_buildup(config, world: SimulatedTraining, workers: int, what_ifs: int = WHAT_IFS) -> dict:
    """Discrete-event run of ``workers`` build-up workers on simulated training: each idle worker takes the most
    needed evaluation nobody runs (the real planner, ``plan_buildup``), and a running evaluation nobody needs any
    more is stopped. Returns the wall time, the work per evaluation and the decisions."""
    from collections import defaultdict

    from alternas.search.planner import BuildupSearch, plan_buildup

    search = BuildupSearch(config)
    running: dict[str, tuple[float, float, object]] = {}  # evaluation id -> (start, finish, request)
    work: dict[str, float] = defaultdict(float)
    clock = 0.0
    while True:
        plan = plan_buildup(search, what_ifs=what_ifs)
        if plan.replay.stopped_by is not None:
            break
        needed = {request.id for request, _ in plan.requests}
        for eid in [e for e in running if e not in needed]:
            work[eid] += clock - running.pop(eid)[0]
        for request, _ in plan.requests:
            if len(running) >= workers:
                break
            if request.id not in running:
                running[request.id] = (clock, clock + world.duration(request), request)
        eid = min(running, key=lambda e: running[e][1])
        start, clock, request = running.pop(eid)
        work[eid] += clock - start
        search.tell(eid, world.evaluate(request, config))
    for eid, (start, _, _) in running.items():  # speculation still running when the search ended
        work[eid] += clock - start
    steps = [(s.placement, s.decision, tuple(s.seeds_used)) for s in plan.replay.policy.steps]
    return {"wall": clock, "work": dict(work), "steps": steps, "best": plan.replay.best}


def buildup_workers(worker_counts: tuple[int, ...] = (1, 2, 4, 8), min_seeds: int = 3, max_seeds: int = 5,
                    worlds: int = 5, examples: int = 2000, log: Callable[[str], None] = print) -> list[dict]:
    """The many-worker build-up, simulated: the paper's CIFAR-100 build-up (patience 1, min gain 0, confidence
    0.9, ``min_seeds`` to ``max_seeds`` seeds per comparison) on ``worlds`` simulated seed-noise worlds, for each
    worker count: wall-time speedup over one worker, the fraction of work no decision used (speculation), and
    whether the decisions equal one worker's."""
    from alternas.search import study_from_dict

    config = study_from_dict({
        "name": "simulated", "base": "resnet50", "seeds": list(range(max_seeds)), "data": {"name": "cifar100"},
        "recipe": "paper", "diagnostics": {"hessian": False, "fourier": False},
        "buildup": {"start": next(iter(PAPER_BUILDUP)), "min_gain": 0.0, "patience": 1, "confidence": 0.9,
                    "min_seeds": min_seeds, "max_seeds": max_seeds}}, "simulation")
    rows = []
    singles = []
    for w in range(worlds):
        world = SimulatedTraining(examples, seed=w)
        single = simulate_buildup(config, world, 1)
        singles.append((world, single))
    for workers in worker_counts:
        speedups, wasted, same = [], [], 0
        for world, single in singles:
            run = single if workers == 1 else simulate_buildup(config, world, workers)
            useful = sum(single["work"].values())
            total = sum(run["work"].values())
            speedups.append(single["wall"] / run["wall"])
            wasted.append(max(0.0, 1 - useful / total))
            same += run["steps"] == single["steps"]
        rows.append({"workers": workers, "speedup": statistics.fmean(speedups), "speedup_min": min(speedups),
                     "speedup_max": max(speedups), "efficiency": statistics.fmean(speedups) / workers,
                     "wasted_fraction": statistics.fmean(wasted), "same_decisions": same == worlds,
                     "worlds": worlds, "decisions_per_world": statistics.fmean(len(s["steps"]) - 1
                                                                              for _, s in singles)})
        r = rows[-1]
        log(f"{workers} workers: speedup {r['speedup']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] "
            f"({r['efficiency']:.0%} of {workers}), wasted {r['wasted_fraction']:.1%}, same decisions in "
            f"{same}/{worlds} worlds")
    return rows
