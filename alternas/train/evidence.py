"""Per-example validation outcomes of a run, per epoch: the evidence paired comparisons are made of.

Two candidates trained with the same seed and evaluated on the same validation set can be compared example by
example (``alternas.search.decision``), which separates a real gain from the noise of which examples happen to be
in the validation set. ``fit`` appends one row per epoch to ``RUN/evidence.npz`` (compressed; booleans and
float32 NLL) *before* the epoch's checkpoint, so after a kill the file holds at least every checkpointed epoch; a
resumed run drops the rows past its checkpoint. The digest of the validation set travels with the rows, so
evidence of different splits is never paired.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alternas.fileio import atomic_write

EVIDENCE_FILE = "evidence.npz"


@dataclass(frozen=True)
class Evidence:
    """Rows of per-example outcomes: ``correct[r, i]`` and ``nll[r, i]`` of example ``i`` after epoch
    ``epochs[r]`` (1-based, increasing)."""

    digest: str
    epochs: np.ndarray  # (E,) int
    correct: np.ndarray  # (E, N) bool
    nll: np.ndarray  # (E, N) float32

    @classmethod
    def empty(cls, digest: str, n_examples: int) -> Evidence:
        return cls(digest, np.zeros(0, dtype=np.int64), np.zeros((0, n_examples), dtype=bool),
                   np.zeros((0, n_examples), dtype=np.float32))

    @property
    def n_examples(self) -> int:
        return int(self.correct.shape[1])

    @property
    def last_epoch(self) -> int | None:
        return int(self.epochs[-1]) if len(self.epochs) else None

    def with_epoch(self, epoch: int, correct: torch.Tensor | np.ndarray, nll: torch.Tensor | np.ndarray) -> Evidence:
        """These rows plus ``epoch``'s outcomes (replacing a row of the same or a later epoch)."""
        keep = self.epochs < epoch
        correct, nll = np.asarray(correct, dtype=bool), np.asarray(nll, dtype=np.float32)
        if correct.shape != (self.n_examples,) or nll.shape != (self.n_examples,):
            raise ValueError(f"expected {self.n_examples} outcomes, got {correct.shape} and {nll.shape}")
        return Evidence(self.digest, np.append(self.epochs[keep], epoch),
                        np.vstack([self.correct[keep], correct[None]]), np.vstack([self.nll[keep], nll[None]]))

    def up_to(self, epoch: int) -> Evidence:
        """The rows of epochs <= ``epoch`` (a resumed run forgets what came after its checkpoint)."""
        keep = self.epochs <= epoch
        return Evidence(self.digest, self.epochs[keep], self.correct[keep], self.nll[keep])

    def at(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(correct, nll) after ``epoch``, or after the last recorded epoch when ``None``."""
        rows = np.arange(len(self.epochs))[-1:] if epoch is None else np.flatnonzero(self.epochs == epoch)
        if not len(rows):
            raise KeyError(f"epoch {epoch} not recorded (have {self.epochs.tolist()})")
        row = int(rows[0])
        return self.correct[row], self.nll[row]

    def save(self, run_dir: str | Path) -> Path:
        def write(tmp: Path) -> None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, digest=np.array(self.digest), epochs=self.epochs,
                                correct=np.packbits(self.correct, axis=1), n=np.array(self.n_examples),
                                nll=self.nll)
            tmp.write_bytes(buffer.getvalue())

        return atomic_write(Path(run_dir) / EVIDENCE_FILE, write)


def evidence_digest(run_dir: str | Path) -> str | None:
    """The validation-split digest of a run's evidence, read without decoding its rows (``None`` if it has none)."""
    try:
        with np.load(Path(run_dir) / EVIDENCE_FILE, allow_pickle=False) as f:
            return str(f["digest"])
    except (OSError, ValueError, KeyError, EOFError):
        return None


def load_evidence(run_dir: str | Path) -> Evidence | None:
    """The evidence of a run folder, or ``None`` if it has none (or an unreadable file, which is as good as none:
    the comparison that needs it then trains or re-evaluates)."""
    path = Path(run_dir) / EVIDENCE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            n = int(f["n"])
            correct = np.unpackbits(f["correct"], axis=1, count=n).astype(bool)
            return Evidence(str(f["digest"]), f["epochs"].astype(np.int64), correct, f["nll"].astype(np.float32))
    except (OSError, ValueError, KeyError, EOFError):
        return None
