"""Atomic per-epoch checkpoints: weights as safetensors, the rest loaded with ``weights_only=True``.

Layout of ``RUN/checkpoint/``: ``model-EEEE.safetensors`` and ``state.pt`` (epoch, optimizer, RNG states and the
name of the weights file). ``state.pt`` is written to a temporary file and renamed, and the previous weights file
is removed only afterwards, so a kill at any point leaves a consistent pair on disk.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alternas.fileio import DAMAGED_FILE_ERRORS, atomic_write, load_weights, save_weights


def rng_state() -> dict[str, Any]:
    """Every random stream a training epoch draws from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(folder: Path, model_state: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write weights + training state for the epoch in ``state['epoch']``; returns the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"model-{state['epoch']:04d}.safetensors"
    save_weights(weights, model_state)
    previous = load_state(folder)
    atomic_write(folder / "state.pt", lambda tmp: torch.save({**state, "weights": weights.name}, tmp), durable=True)
    if previous and previous["weights"] != weights.name:
        (folder / previous["weights"]).unlink(missing_ok=True)
    return weights


def load_state(folder: Path) -> dict[str, Any] | None:
    """The training state of the last checkpoint, or ``None`` when there is none or it is damaged."""
    try:
        return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except DAMAGED_FILE_ERRORS:
        return None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(weights, state) of the last complete epoch, or ``None`` when there is no readable checkpoint (the run
    then starts again: a damaged checkpoint costs the epochs it held, never a wrong result)."""
    state = load_state(folder)
    weights = load_weights(folder / state["weights"]) if state is not None else None
    return None if weights is None else (weights, state)
