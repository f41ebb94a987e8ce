"""Shared test settings: small thread counts so the suite behaves on 2-core CI machines."""

import os

import pytest
import torch

from tests.helpers import kill_leftover_processes

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A test that fails while an `AlternasProcess` runs leaves it killed, not training on into the next test."""
    yield
    kill_leftover_processes()
