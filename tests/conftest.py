"""Shared test settings: the machine's cores shared between pytest-xdist's workers, so the suite behaves on 2-core
CI machines."""

import os

import pytest
import torch

from alternas.data.loader import usable_cpus
from tests.helpers import end_test_processes

# Each of the N workers (pytest -n N; 1 without xdist) gets cores/N torch threads, at most 2 (the tiny test nets gain
# nothing from more). The processes the tests start get the same through OMP_NUM_THREADS, so a run in this process
# and one in a child add up their floats in the same order.
_THREADS = max(1, min(2, usable_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(_THREADS)
os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per CPU this process may use (xdist's own count is the host's physical cores, which
    ignores affinity masks and container limits)."""
    return usable_cpus()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A test that fails while an `AlternasProcess` runs leaves it killed, not training on into the next test."""
    yield
    end_test_processes()
