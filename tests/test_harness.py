"""The test harness itself: what a failed test leaves behind is cleaned up, not left training into the next test."""

import time
from pathlib import Path

import yaml

from tests.helpers import AlternasProcess, end_test_processes, small_study


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # ended while listed
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def test_a_process_left_running_is_killed_with_its_workers_and_its_output_removed(tmp_path) -> None:
    """What the autouse fixture does after a test that failed while a build-up trained on two local workers:
    SIGKILL to the whole process group, and no output folder left behind (a waited-for process only leaves its
    folder)."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_study(tmp_path, recipe={"epochs": 20})))
    finished = AlternasProcess(["--version"])
    assert finished.wait(timeout=120) == 0
    running = AlternasProcess(["buildup", "--study", str(path), "--quiet", "--workers", "2"])
    deadline = time.monotonic() + 180
    while len(_group_members(running.pid)) < 3 or not (tmp_path / "study" / "candidates").exists():
        assert running.poll() is None and time.monotonic() < deadline, "the workers never started training"
        time.sleep(0.2)
    folders = [Path(p._folder) for p in (finished, running)]
    assert all(folder.is_dir() for folder in folders)

    end_test_processes()

    assert running.returncode == -9
    deadline = time.monotonic() + 30  # a SIGKILLed worker takes a moment to release its memory and exit
    while _group_members(running.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(running.pid) == []
    assert not any(folder.exists() for folder in folders)
