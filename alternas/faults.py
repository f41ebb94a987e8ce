"""Deterministic fault injection, for the fault-injection tests: ``ALTERNAS_KILL_AT=PHASE[@N]`` makes this process
SIGKILL itself the N-th time (default the first) it reaches ``PHASE``, so a test can kill a real search at an exact
point instead of racing a timer.

Phases: ``train_step`` (after an optimizer step, mid-epoch), ``epoch_end`` (after an epoch's checkpoint),
``diagnostics`` (a trained candidate, before its diagnostics), and ``write:NAME`` (a file named NAME written to its
temporary file but not yet renamed into place: ``result.json``, ``results.csv``, ``report.html``, ...).
Unset (always, outside tests), a phase check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter[str] = Counter()


def fault_point(phase: str) -> None:
    """Die here if ``ALTERNAS_KILL_AT`` names this phase (and this is its N-th visit)."""
    spec = os.environ.get("ALTERNAS_KILL_AT")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != phase:
        return
    _reached[phase] += 1
    if _reached[phase] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
