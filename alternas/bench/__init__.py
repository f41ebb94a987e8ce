"""``alternas bench``: speed measured side by side (``speed``), how far a study's answer depends on its seeds
(``decisions``), and the many-worker build-up simulated (``workers``)."""

from alternas.bench.decisions import decision_agreement
from alternas.bench.speed import SPEED_BENCHMARKS, describe
from alternas.bench.workers import PAPER_BUILDUP, SimulatedTraining, buildup_workers, simulate_buildup

__all__ = ["PAPER_BUILDUP", "SPEED_BENCHMARKS", "SimulatedTraining", "buildup_workers", "decision_agreement",
           "describe", "simulate_buildup"]
