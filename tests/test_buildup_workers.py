"""Many workers, one build-up: the planner on simulated training, and real concurrent workers on the journal file
and on PostgreSQL (same trajectory as one worker, nothing trained twice, a killed worker's run taken over)."""

import json
import os
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from alternas.bench import PAPER_BUILDUP, SimulatedTraining, buildup_workers, simulate_buildup
from alternas.search import study_from_dict
from alternas.search.buildup import _Worker
from alternas.search.planner import WHAT_IFS, BuildupSearch, plan_buildup
from tests.helpers import AlternasProcess, postgres_url, run_alternas, run_cli, small_study

PAPER_START = "CCC,CCCC,CCCCCC,CCCC"


def _paper_config(min_seeds: int = 3):
    return study_from_dict({"name": "sim", "base": "resnet50", "seeds": [0, 1, 2, 3, 4], "recipe": "paper",
                            "data": {"name": "cifar100"},
                            "buildup": {"start": PAPER_START, "min_gain": 0.0, "patience": 1,
                                        "min_seeds": min_seeds, "max_seeds": 5}})


def test_plan_asks_for_every_seed_of_a_look_at_once_and_ranks_speculation_below_it() -> None:
    config, world = _paper_config(), SimulatedTraining(examples=500)
    search = BuildupSearch(config)
    plan = plan_buildup(search)
    needed = [r for r, w in plan.requests if w == 1.0]
    asked = search.ask()  # the pending look's needs, all of its seeds at once, first in the plan
    assert asked and needed[: len(asked)] == asked
    assert [(r.placement, r.seed) for r in needed[:3]] == [(PAPER_START, s) for s in (0, 1, 2)]
    for request in needed[:3]:
        search.tell(request.id, world.evaluate(request, config))
    plan = plan_buildup(search)
    first_child = "CCC,CCCC,CCCCCC,CCCM"
    assert [(r.placement, r.seed) for r, w in plan.requests if w == 1.0] == [(first_child, s) for s in (0, 1, 2)]
    speculative = [(r, w) for r, w in plan.requests if w < 1.0]
    assert speculative and all(0 < w < 1 for _, w in speculative)
    weights = [w for _, w in plan.requests]
    assert weights == sorted(weights, reverse=True)  # most needed first
    assert {r.placement for r, _ in speculative} & {"CCC,CCCC,CCCCCC,CMCM", "CCC,CCCC,CCCCCM,CCCC"}  # both branches
    assert plan.replay.blocked is not None and plan.replay.stopped_by is None


def test_simulated_workers_decide_like_one_worker_and_scale() -> None:
    rows = {r["workers"]: r for r in buildup_workers((1, 2, 4), worlds=2, examples=1000, log=lambda _: None)}
    assert all(r["same_decisions"] for r in rows.values())
    assert rows[1]["speedup"] == 1.0 and rows[1]["wasted_fraction"] == 0.0
    for workers in (2, 4):  # the goal, up to 2 x min_seeds workers
        assert rows[workers]["speedup"] >= 0.7 * workers, rows[workers]
        assert 0 <= rows[workers]["wasted_fraction"] < 0.5


def test_with_little_noise_three_workers_retrace_the_papers_build_up() -> None:
    """Gains of 0.1-0.2 pp are detectable with 50,000 strongly paired examples and almost no seed noise: the
    simulated workers then take exactly the paper's nine steps (PAPER.md §3.3)."""
    run = simulate_buildup(_paper_config(), SimulatedTraining(examples=50_000, seed_sd=0.01, rho=0.98), workers=3)
    assert [placement for placement, _, _ in run["steps"]] == list(PAPER_BUILDUP)
    assert [d for _, d, _ in run["steps"]] == ["start"] + ["accept"] * 3 + ["reject"] * 2 + ["accept"] + ["reject"] * 2
    assert run["best"] == "CCC,CCCM,CCCCCM,CMCM"


def test_bench_buildup_workers_prints_json() -> None:
    res = run_cli("bench", "buildup-workers", "--workers", "1,2", "--worlds", "1", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["workers"] for r in rows] == [1, 2]
    assert {"workers", "speedup", "wasted_fraction", "same_decisions"} <= set(rows[0])
    res = run_cli("bench", "buildup-workers", "--workers", "two")
    assert res.returncode == 2 and "comma-separated integers" in res.stderr


# -- real workers ------------------------------------------------------------------------------------------------
def _raw(folder: Path, name: str = "t", **extra) -> dict:
    return small_study(folder, name=name, seeds=[0, 1, 2], data={"subset": 200},
                       recipe={"epochs": 2, "batch_size": 64}, diagnostics={"hessian": False, "fourier": False},
                       buildup={"max_candidates": 3, "min_seeds": 2, "max_seeds": 3, "confidence": 0.8}, **extra)


def _write(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _buildup(path: Path, *args: str, env: dict | None = None, wait: bool = True):
    args = ("buildup", "--study", str(path), "--quiet", *args)
    if wait:
        return run_alternas(*args, env=env, timeout=900)
    return AlternasProcess(args, env=env, merge_stderr=True)


def _decisions(folder: Path) -> list[tuple]:
    steps = json.loads((folder / "trajectory.json").read_text())["steps"]
    return [(s["placement"], s["decision"], s["decided_by"], tuple(s["seeds_used"]), s["gain"], s["score"])
            for s in steps]


def _trained(output: str) -> list[str]:
    """(placement, seed, fidelity) of every run a worker trained, from its terminal lines."""
    lines = [line.split("] training ", 1)[1] for line in output.splitlines() if "] training " in line]
    return [line.split("  (speculative")[0] for line in lines]


THREADS = str(max(1, len(os.sched_getaffinity(0)) // 2))  # what --workers 2 gives each worker


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory) -> list[tuple]:
    """The reference: one worker with the thread count each of two workers gets (CPU results depend on it)."""
    folder = tmp_path_factory.mktemp("one")
    res = _buildup(_write(folder, _raw(folder)), "--threads", THREADS)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(_trained(res.stdout)) == len(set(_trained(res.stdout)))
    return _decisions(folder / "study")


def _journal(folder: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study" / "optuna.journal")))


def _storage(kind: str) -> tuple[str | None, str]:
    if kind == "journal":
        return None, "t"
    return postgres_url(), f"t-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a fresh study


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_two_concurrent_workers_reach_one_workers_trajectory_without_training_twice(tmp_path, one_worker,
                                                                                      kind) -> None:
    url, name = _storage(kind)
    path = _write(tmp_path, _raw(tmp_path, name))
    res = _buildup(path, "--workers", "2", *(["--storage", url] if url else []))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "[worker 0] pid" in res.stdout and "[worker 1] pid" in res.stdout
    assert f"{THREADS} torch thread(s)" in res.stdout
    assert _decisions(tmp_path / "study") == one_worker
    trained = _trained(res.stdout)
    assert len(trained) == len(set(trained)), Counter(trained).most_common(3)  # nothing trained twice
    by_worker = {line.split("]")[0] for line in res.stdout.splitlines() if "] training " in line}
    assert by_worker == {"[worker 0", "[worker 1"}  # both did work
    study = optuna.load_study(study_name=f"{name}:buildup", storage=url or _journal(tmp_path))
    complete = [t.user_attrs["evaluation"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert len(complete) == len(set(complete))  # one finished trial per evaluation
    assert all(t.params.keys() == {"seed", "epochs", "num_msa"} and t.user_attrs["placement"]
               for t in study.get_trials())
    report = (tmp_path / "study" / "report.html").read_text()
    unused = json.loads((tmp_path / "study" / "trajectory.json").read_text())["speculative_unused"]
    assert all(key in report for key in unused) and ("speculative, unused" in report) == bool(unused)


def test_a_killed_workers_evaluation_is_finished_by_the_other_from_its_checkpoint(tmp_path, one_worker) -> None:
    path = _write(tmp_path, _raw(tmp_path))
    victim = _buildup(path, "--threads", THREADS, env={"ALTERNAS_KILL_AT": "epoch_end@3"}, wait=False)
    survivor = _buildup(path, "--threads", THREADS, wait=False)
    victim.communicate(timeout=600)
    assert victim.returncode == -9
    study = optuna.load_study(study_name="t:buildup", storage=_journal(tmp_path))
    orphan = next(t for t in study.get_trials() if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
                  and t.state == optuna.trial.TrialState.RUNNING)
    run_dir = tmp_path / "study" / "candidates" / orphan.user_attrs["key"]
    before = json.loads((run_dir / "metrics.json").read_text())["history"]
    out, _ = survivor.communicate(timeout=900)
    assert survivor.returncode == 0, out[-3000:]
    assert f"(its worker pid {victim.pid} died)" in out
    assert _decisions(tmp_path / "study") == one_worker
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert len(before) == 1 and len(history) == 2 and history[:1] == before  # resumed, not restarted
    finished = [t for t in study.get_trials() if t.user_attrs.get("evaluation") == orphan.user_attrs["evaluation"]
                and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 1 and finished[0].user_attrs["worker"].endswith(f":{survivor.pid}")


def test_the_simulated_workers_plan_as_far_ahead_as_real_ones() -> None:
    """The published speedups come from the planner real workers run: the same number of what-if branches."""
    import inspect

    assert inspect.signature(simulate_buildup).parameters["what_ifs"].default == WHAT_IFS
    assert inspect.signature(plan_buildup).parameters["what_ifs"].default == WHAT_IFS
    assert "what_ifs" not in inspect.getsource(_Worker.plan)  # the real worker takes the default
