"""Atomic file writes: results are read while other workers and processes write them.

A writer fills a temporary file next to the target (named by process id, so concurrent writers never share
one) and renames it over the target; readers see the old file or the new one, never a torn mix. ``durable``
writes are fsynced before the rename, so they survive a power cut too (results, weights, checkpoints).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alternas.faults import fault_point

# What reading a truncated or garbled file raises: such a file is treated as absent and its work is redone.
DAMAGED_FILE_ERRORS = (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError)
# ... and what building a record (a dataclass) from a parsed file of the wrong shape raises.
DAMAGED_RECORD_ERRORS = (*DAMAGED_FILE_ERRORS, TypeError, AttributeError)


def atomic_write(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """Call ``write(tmp)`` and rename ``tmp`` onto ``path``; ``durable`` also fsyncs before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fault_point(f"write:{path.name}")
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A state dict as safetensors, atomically and fsynced: a file that exists is a complete one."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)), durable=True)


def load_weights(path: str | Path) -> dict[str, torch.Tensor] | None:
    """A safetensors state dict, or ``None`` when the file is missing or damaged."""
    try:
        return load_file(str(path))
    except DAMAGED_FILE_ERRORS:
        return None
