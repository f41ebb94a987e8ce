"""Fault injection: real searches SIGKILLed at exact phases (``ALTERNAS_KILL_AT``, see ``alternas/faults.py``), then
run again. The second run must finish with the results of an uninterrupted run, keep every epoch trained before
the kill (no candidate trained again from scratch) and leave no file that does not parse."""

import json
import subprocess
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from tests.helpers import postgres_url, run_alternas, small_study

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("status", "val_acc", "val_nll", "test_acc", "delta_high", "epochs_trained")

BUILDUP_PHASES = ["train_step@7", "epoch_end@1", "diagnostics@1", "write:result.json@1", "write:results.csv@2",
                  "write:trajectory.json@1", "write:report.html@1", "write:model.safetensors@1", "write:state.pt@2"]
OPTUNA_PHASES = ["train_step@7", "diagnostics@1", "write:result.json@1", "write:report.html@1"]


def _study(folder: Path, **extra) -> dict:
    """Two candidates of 2 epochs (5 steps each), one seed, Fourier diagnostics: ~2 s of training."""
    optuna_section = {"trials": 2, "space": str(ROOT / "search_spaces" / "tiny.yaml"), "sampler": "random",
                      "pruner": "none", "heartbeat_s": 1, "grace_period_s": 2, **extra.pop("optuna", {})}
    return small_study(folder, data={"subset": 200}, recipe={"epochs": 2, "batch_size": 32},
                       diagnostics={"hessian": False, "fourier": True, "fourier_images": 8},
                       buildup={"max_candidates": 2}, optuna=optuna_section, **extra)


def _run(command: str, folder: Path, raw: dict, kill_at: str | None = None, storage: str | None = None
         ) -> subprocess.CompletedProcess:
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = [command, "--study", str(path), "--quiet", *(["--storage", storage] if storage else [])]
    return run_alternas(*args, env={"ALTERNAS_KILL_AT": kill_at or ""}, cwd=ROOT, timeout=300)


def _outcome(folder: Path) -> dict[str, dict]:
    """Every candidate's measured values by key (every result.json must parse)."""
    results = {}
    for path in (folder / "study" / "candidates").glob("*/result.json"):
        result = json.loads(path.read_text())
        results[result["key"]] = {k: result[k] for k in MEASURED}
    return results


def _histories(folder: Path) -> dict[str, list]:
    return {p.parent.name: json.loads(p.read_text())["history"]
            for p in (folder / "study" / "candidates").glob("*/metrics.json")}


def _assert_recovered(folder: Path, reference: dict[str, dict], before: dict[str, list]) -> None:
    outcome = _outcome(folder)
    assert sorted(outcome) == sorted(reference)
    for key, measured in reference.items():
        differ = {name: (outcome[key][name], value) for name, value in measured.items() if outcome[key][name] != value}
        assert not differ, (key, differ)
    after = _histories(folder)
    for key, history in before.items():  # epochs trained before the kill were kept, not trained again
        assert after[key][: len(history)] == history, key
    table = pd.read_csv(folder / "study" / "results.csv")
    assert sorted(table["key"]) == sorted(reference)


@pytest.fixture(scope="module")
def buildup_reference(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("reference")
    res = _run("buildup", folder, _study(folder))
    assert res.returncode == 0, res.stderr[-2000:]
    return _outcome(folder), json.loads((folder / "study" / "trajectory.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("phase", BUILDUP_PHASES)
def test_buildup_killed_at_any_phase_finishes_like_an_uninterrupted_run(tmp_path, buildup_reference, phase) -> None:
    reference, trajectory = buildup_reference
    killed = _run("buildup", tmp_path, _study(tmp_path), kill_at=phase)
    assert killed.returncode == -9, f"never reached {phase}: {killed.stderr[-1500:]}"
    before = _histories(tmp_path)
    again = _run("buildup", tmp_path, _study(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_recovered(tmp_path, reference, before)
    steps = json.loads((tmp_path / "study" / "trajectory.json").read_text())["steps"]
    assert [(s["placement"], s["decision"]) for s in steps] == [(s["placement"], s["decision"])
                                                                 for s in trajectory["steps"]]
    assert (tmp_path / "study" / "report.html").read_text().rstrip().endswith("</html>")


@pytest.fixture(scope="module")
def optuna_reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("optuna-reference")
    res = _run("optuna", folder, _study(folder))
    assert res.returncode == 0, res.stderr[-2000:]
    return _outcome(folder)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", "postgresql"])
@pytest.mark.parametrize("phase", OPTUNA_PHASES)
def test_optuna_worker_killed_at_any_phase_finishes_like_an_uninterrupted_run(tmp_path, optuna_reference, phase,
                                                                                storage) -> None:
    """The study's two trials are the enqueued base and paper placements, so both runs evaluate the same
    candidates; the killed worker's trial is re-queued (journal) or retried by the heartbeat (PostgreSQL)."""
    url = postgres_url() if storage == "postgresql" else None
    raw = _study(tmp_path, optuna={"study_name": f"faults-{uuid.uuid4().hex[:8]}"})
    killed = _run("optuna", tmp_path, raw, kill_at=phase, storage=url)
    assert killed.returncode == -9, f"never reached {phase}: {killed.stderr[-1500:]}"
    before = _histories(tmp_path)
    if url:
        import time

        time.sleep(3)  # past optuna.grace_period_s: the dead worker's trial is stale
    again = _run("optuna", tmp_path, raw, storage=url)
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_recovered(tmp_path, optuna_reference, before)
    storage_obj = url or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study" / "optuna.journal")))
    study = optuna.load_study(study_name=raw["optuna"]["study_name"], storage=storage_obj)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["placement"] for t in complete) == ["CC,CC,CC,CC", "CC,CM,CM,CM"]
