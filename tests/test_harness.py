"""The test harness itself: what a failed test leaves behind is cleaned up, not left training into the next test."""

import os
import time
from pathlib import Path

import yaml

from tests.helpers import AlternasProcess, end_test_processes, small_study


def test_a_process_left_running_is_killed_with_its_group_and_its_output_removed(tmp_path) -> None:
    """What the autouse fixture does after a test that failed while a build-up trained: SIGKILL to the process
    group, and no output folder left in the temp dir (one waited-for process only leaves its folder)."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_study(tmp_path, recipe={"epochs": 20})))
    finished = AlternasProcess(["--version"])
    assert finished.wait(timeout=120) == 0
    running = AlternasProcess(["buildup", "--study", str(path), "--quiet"])
    deadline = time.monotonic() + 120
    while not (tmp_path / "study" / "candidates").exists():  # training has started
        assert running.poll() is None and time.monotonic() < deadline, "the build-up never started"
        time.sleep(0.2)
    folders = [Path(p._folder) for p in (finished, running)]
    assert all(folder.is_dir() for folder in folders)

    end_test_processes()

    assert running.returncode == -9
    try:
        os.killpg(running.pid, 0)
        raise AssertionError("a process of the killed build-up's group still runs")
    except ProcessLookupError:
        pass
    assert not any(folder.exists() for folder in folders)
