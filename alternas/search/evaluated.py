"""What the build-up's decisions read: finished evaluations (a placement trained with a seed, to the end or paused at
the screening epoch) with their per-example validation correctness, and the requests that name the ones still
needed. Every worker sees the same ones (``alternas.search.evaluations`` keeps them in an Optuna storage), so every
worker replays the same decisions from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from alternas.errors import AlternasError
from alternas.search.evaluator import CandidateResult
from alternas.train.evidence import Evidence, load_evidence


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


