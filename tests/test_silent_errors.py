"""Regression tests of results that used to be silently wrong or lost (issue 11, items 1-11): each failed before
its fix. Faults are injected into real runs (real training, real files, real processes)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import alternas.search.evaluator as evaluator_module
from alternas.data import DataConfig, load_data
from alternas.data.datasets import ImageData
from alternas.data.loader import TensorLoader
from alternas.diagnostics.hessian import twice_differentiable
from alternas.errors import PlacementError
from alternas.search import Evaluator, run_buildup, study_from_dict
from alternas.search.selection import load_results
from alternas.search.storage import alive, fail_dead_workers, open_storage, process_start, trial_id_of
from alternas.train import fit, get_recipe
from alternas.train.metrics import predict
from alternas.train.run import model_for
from tests.helpers import run_cli, small_study, write_cifar

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, **overrides) -> dict:
    """``small_study`` with 2 candidates and an Optuna section; overrides as there."""
    optuna_section = {"trials": 2, "space": str(ROOT / "search_spaces" / "tiny.yaml"), "pruner": "none"}
    return small_study(tmp_path, **{"buildup": {"max_candidates": 2, **overrides.pop("buildup", {})},
                                    "optuna": {**optuna_section, **overrides.pop("optuna", {})}, **overrides})


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- 1. failures ---------------------------------------------------------------------------------------------------
def test_a_user_error_stops_the_search_with_one_line_and_caches_nothing(tmp_path) -> None:
    path = _write(tmp_path, _study(tmp_path, window_size=3, buildup={"start": "CC,CC,CC,CM"}))
    res = run_cli("buildup", "--study", str(path), "--quiet")
    assert res.returncode == 2 and "not tiled by 3x3 windows" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "study").glob("candidates/*/result.json"))
    with pytest.raises(PlacementError):
        Evaluator(study_from_dict(_study(tmp_path, window_size=3)), quiet=True).evaluate("CC,CC,CC,CM", 0)


def test_a_crash_is_recorded_then_retried_by_the_next_run(tmp_path, monkeypatch) -> None:
    config = study_from_dict(_study(tmp_path, diagnostics={"hessian": False, "fourier": False}))
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluator_module, "fit", out_of_memory)
    evaluator = Evaluator(config, quiet=True)
    crashed = evaluator.evaluate("CC,CC,CC,CC", 0)
    assert crashed.status == "failed" and "lower recipe.batch_size (64)" in crashed.error
    assert evaluator.evaluate("CC,CC,CC,CC", 0) is crashed and len(calls) == 1  # not retried within the run
    assert json.loads(Path(evaluator.result_path(crashed.key)).read_text())["status"] == "failed"  # recorded
    monkeypatch.undo()
    retried = Evaluator(config, quiet=True).evaluate("CC,CC,CC,CC", 0)  # the next run
    assert retried.status == "completed" and retried.key == crashed.key and retried.val_acc is not None


def test_divergence_is_final_until_retry_failed(tmp_path) -> None:
    raw = _study(tmp_path, recipe={"lr": 1e30, "clip_grad": None}, diagnostics={"hessian": False, "fourier": False})
    config = study_from_dict(raw)
    first = Evaluator(config, quiet=True).evaluate("CC,CC,CC,CC", 0)
    assert first.status == "diverged"
    metrics = Path(first.run_dir) / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert Evaluator(config, quiet=True).evaluate("CC,CC,CC,CC", 0) == first and metrics.stat().st_mtime_ns == stamp
    again = Evaluator(config, quiet=True, retry_failed=True).evaluate("CC,CC,CC,CC", 0)
    assert again.status == "diverged" and metrics.stat().st_mtime_ns != stamp  # trained again from scratch
    res = run_cli("buildup", "--study", str(_write(tmp_path, raw)), "--quiet", "--retry-failed")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("] training") == 1  # the diverged start again (a child never pairs with it)
    assert run_cli("buildup", "--study", str(_write(tmp_path, raw)), "--quiet").stdout.count("] training") == 0


# -- 2. diagnostics of the trained model ---------------------------------------------------------------------------
def test_losing_result_json_after_training_rediagnoses_the_trained_weights(tmp_path) -> None:
    config = study_from_dict(_study(tmp_path))
    first = Evaluator(config, quiet=True).evaluate("CC,CC,CC,CM", 0)
    weights = Path(first.run_dir) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    Path(first.run_dir, "result.json").unlink()  # a kill between training and the result
    again = Evaluator(config, quiet=True).evaluate("CC,CC,CC,CM", 0)
    assert weights.stat().st_mtime_ns == stamp  # not retrained
    assert again.val_acc == first.val_acc
    assert again.lambda_max == pytest.approx(first.lambda_max, rel=1e-4)
    assert again.delta_high == pytest.approx(first.delta_high, rel=1e-4, abs=1e-6)


def test_a_lost_result_json_is_restored_from_the_storage_not_retrained(tmp_path) -> None:
    raw = _study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False, "fourier": False},
                 buildup={"max_candidates": 1})
    path = _write(tmp_path, raw)
    assert run_cli("buildup", "--study", str(path), "--quiet").returncode == 0
    files = sorted((tmp_path / "study" / "candidates").glob("*/result.json"))
    before = {f: f.read_text() for f in files}
    stamps = {f: (f.parent / "model.safetensors").stat().st_mtime_ns for f in files}
    assert len(files) == 2
    for f in files:
        f.unlink()
    res = run_cli("buildup", "--study", str(path))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "restored 2 lost result.json file(s)" in res.stdout and "training" not in res.stdout
    assert {f: f.read_text() for f in files} == before  # the storage's record, as written
    assert {f: (f.parent / "model.safetensors").stat().st_mtime_ns for f in files} == stamps  # nothing retrained
    assert len(pd.read_csv(tmp_path / "study" / "results.csv")) == 2
    for command in (("report", str(tmp_path / "study")),
                    ("export", "--study", str(tmp_path / "study"), "--best", "--out", str(tmp_path / "exported"))):
        res = run_cli(*command)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


# -- 9. cache keys ---------------------------------------------------------------------------------------------------
def test_one_architecture_spelled_two_ways_is_one_candidate(tmp_path) -> None:
    from alternas.models.bases import get_base

    dim_head = get_base("tiny").dim_head
    plain = Evaluator(study_from_dict(_study(tmp_path)))
    spelled = Evaluator(study_from_dict(_study(tmp_path, base=f"tiny@heads_mult=1.0,dim_head={dim_head}")))
    wider = Evaluator(study_from_dict(_study(tmp_path, base="tiny@heads_mult=2")))
    assert plain.key_for("CC,CC,CC,CM", 0) == spelled.key_for("CC,CC,CC,CM", 0)
    assert plain.key_for("CC,CC,CC,CM", 0) != wider.key_for("CC,CC,CC,CM", 0)


def test_other_diagnostics_settings_remeasure_without_retraining(tmp_path) -> None:
    first = Evaluator(study_from_dict(_study(tmp_path)), quiet=True).evaluate("CC,CC,CC,CC", 0)
    weights = Path(first.run_dir) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    other = study_from_dict(_study(tmp_path, diagnostics={"hessian_batch_size": 32, "fourier": False}))
    again = Evaluator(other, quiet=True).evaluate("CC,CC,CC,CC", 0)
    assert again.key == first.key and weights.stat().st_mtime_ns == stamp  # same training, not retrained
    assert again.diagnostics != first.diagnostics and again.delta_high == {}  # measured with the new settings
    assert again.lambda_max is not None and again.lambda_max != first.lambda_max
    reread = Evaluator(other, quiet=True).evaluate("CC,CC,CC,CC", 0)
    assert reread == again  # and cached under them


# -- 3. data-parallel shards ---------------------------------------------------------------------------------------
def test_data_parallel_shards_are_disjoint_and_equal_in_every_epoch() -> None:
    n = 203  # uneven over 2 ranks: one image left out per epoch, the documented rule
    data = ImageData(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.arange(n))
    for drop_last in (False, True):
        loaders = [TensorLoader(data, 16, mean=(0.0,) * 3, std=(1.0,) * 3, shuffle=True, crop_padding=2, flip=True,
                                drop_last=drop_last, seed=3, rank=rank, world=2) for rank in range(2)]
        assert len(loaders[0]) == len(loaders[1]) == (6 if drop_last else 7)
        for _ in range(3):  # the old shared generator knocked the ranks' permutations apart from epoch 2
            seen = [torch.cat([y for _, y in loader]).tolist() for loader in loaders]
            assert len(seen[0]) == len(seen[1]) == (96 if drop_last else 101)
            assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0])


def test_data_parallel_ranks_end_with_identical_weights(tmp_path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys\n"
        "from safetensors.torch import save_file\n"
        "from alternas.data import DataConfig, load_data\n"
        "from alternas.train import fit, get_recipe\n"
        "from alternas.train.run import model_for\n"
        "data = load_data(DataConfig('shapes', subset=301, val_fraction=0.2))\n"  # 241 training images
        "recipe = get_recipe('fast', {'epochs': 2, 'warmup_epochs': 0, 'batch_size': 32})\n"
        "model = model_for('CC,CC,CC,CM', 'tiny', data, recipe)\n"
        "out = sys.argv[1]\n"
        "result = fit(model, data, recipe, out, quiet=True, device='cpu')\n"
        "rank = os.environ['RANK']\n"
        "save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f'{out}-rank{rank}.safetensors')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(script), str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (load_file(tmp_path / f"run-rank{r}.safetensors") for r in (0, 1))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"


# -- 4. no false divergence from a one-image last batch ------------------------------------------------------------
def test_mixup_with_a_one_image_last_batch_trains(tmp_path) -> None:
    data = load_data(DataConfig("shapes", subset=300, val_fraction=0.2))  # 240 training images
    recipe = get_recipe("fast", {"epochs": 1, "warmup_epochs": 0, "batch_size": 239, "mixup": 0.8})
    result = fit(model_for("CC,CC,CC,CC", "tiny", data, recipe), data, recipe, tmp_path / "r", quiet=True)
    assert result.status == "completed", result.error
    small = get_recipe("fast", {"batch_size": 250})
    with pytest.raises(Exception, match="fewer than recipe.batch_size 250"):
        fit(model_for("CC,CC,CC,CC", "tiny", data, small), data, small, tmp_path / "s", quiet=True)


# -- 5. exact resume of the DataLoader (paper recipe) path -----------------------------------------------------------
def test_paper_recipe_resumes_exactly(tmp_path) -> None:
    write_cifar(tmp_path / "data", "cifar10", n_train=80, n_test=20)
    data = load_data(DataConfig("cifar10", root=str(tmp_path / "data"), val_fraction=0.2))
    recipe = get_recipe("paper", {"epochs": 2, "warmup_epochs": 1, "batch_size": 16, "workers": 1})

    def run(out: str, **kwargs):
        torch.manual_seed(99)  # whatever the caller's RNG was, the run is determined by its seed
        return fit(model_for("CC,CC,CC,CC", "tiny", data, recipe, seed=1), data, recipe, tmp_path / out, seed=1,
                   quiet=True, **kwargs)

    straight = run("a")
    assert run("b", stop_after=2).status == "paused"
    resumed = run("b", resume=True)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]


# -- 6. training on the full training set ----------------------------------------------------------------------------
def test_val_fraction_zero_selects_on_the_test_split_and_says_so(tmp_path) -> None:
    raw = _study(tmp_path, data={"val_fraction": 0}, diagnostics={"hessian": False, "fourier": False})
    data = load_data(DataConfig("shapes", subset=300, val_fraction=0))
    assert len(data.train) == 300 and data.val is data.test and data.selects_on == "test"
    lines: list[str] = []
    outcome = run_buildup(study_from_dict(raw), quiet=True, log=lines.append)
    assert outcome.candidates_evaluated == 2
    trajectory = json.loads((tmp_path / "study" / "trajectory.json").read_text())
    assert trajectory["selection_split"] == "test"
    assert any("compared on the test split" in line for line in lines)
    results = Evaluator(study_from_dict(raw)).all_results()
    assert all(r.status == "completed" and r.val_acc == r.test_acc for r in results)


# -- 7. study values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"buildup": {"min_gain": "a"}}, "buildup: min_gain = 'a' is not allowed: input should be a valid number"),
        ({"window_size": "four"}, "window_size = 'four' is not allowed: input should be a valid integer"),
        ({"data": {"val_fraction": "x"}}, "data: val_fraction = 'x' is not allowed"),
        ({"data": {"val_fraction": 1.5}}, "val_fraction must be in [0, 1)"),
        ({"optuna": {"sampler": "bogus"}}, "sampler = 'bogus' is not allowed: input should be 'tpe', 'nsga2'"),
        ({"buildup": {"warm_start_epochs": -3}}, "buildup.warm_start_epochs must be in [1, 100000]"),
        ({"device": 3}, "device = 3 is not allowed: input should be a valid string"),
        ({"device": "gpu7"}, "device 'gpu7' is not a torch device"),
        ({"recipe": {"name": "fast", "epochs": "many"}}, "epochs = 'many' is not allowed"),
        ({"seeds": [0, 0]}, "seeds must not repeat"),
        ({"diagnostics": {"hessian": "maybe"}}, "hessian = 'maybe' is not allowed: input should be a valid boolean"),
    ],
)
def test_study_values_are_type_and_range_checked(tmp_path, change: dict, fragment: str) -> None:
    path = _write(tmp_path, _study(tmp_path, **change))
    res = run_cli("buildup", "--study", str(path))
    assert res.returncode == 2 and fragment in res.stderr and str(path) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# -- 8. Optuna -------------------------------------------------------------------------------------------------------
def test_optuna_refuses_at_start_what_would_fail_later(tmp_path) -> None:
    raw = _study(tmp_path, diagnostics={"hessian": False}, optuna={"objectives": ["acc", "lambda_max"]})
    res = run_cli("optuna", "--study", str(_write(tmp_path, raw)))
    assert res.returncode == 2 and "needs the Hessian diagnostics" in res.stderr
    assert not (tmp_path / "study" / "candidates").exists()  # refused before any trial trained
    res = run_cli("optuna", "--study", str(_write(tmp_path, _study(tmp_path))), "--storage",
                  "redis://user:hunter2@localhost:6379")
    assert res.returncode == 2 and "unsupported Optuna storage" in res.stderr and "hunter2" not in res.stderr
    assert "Traceback" not in res.stderr


def test_optuna_without_its_data_is_one_line_and_leaves_no_trial(tmp_path, monkeypatch) -> None:
    """The mission's `alternas optuna --trials 50` on a machine without CIFAR-100: one line, exit 2, and the study's
    storage holds no failed trial."""
    monkeypatch.setenv("ALTERNAS_OFFLINE", "1")
    monkeypatch.setenv("ALTERNAS_DATA", str(tmp_path / "no-data"))
    monkeypatch.chdir(tmp_path)
    res = run_cli("optuna", "--trials", "50", "--base", "tiny", "--data", "cifar100")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "cifar-100-python" in res.stderr, res.stderr
    journals = [p for p in tmp_path.rglob("*") if p.is_file() and "journal" in p.name and "lock" not in p.name]
    for journal in journals:  # a storage, if one was opened at all, holds no trial
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        assert not any(summary.n_trials for summary in optuna.get_all_study_summaries(storage)), journal


def test_on_an_rdb_storage_only_the_heartbeat_says_a_worker_died(tmp_path) -> None:
    """Another container may share this host name but not its pids: on an RDB storage a trial whose pid is unknown
    here stays RUNNING while its heartbeat is fresh; on the journal file (no heartbeats) the same trial is failed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for url, fails in ((f"sqlite:///{tmp_path / 'rdb.sqlite3'}", False), (None, True)):
        storage = open_storage(tmp_path / "study", url)
        study = optuna.create_study(study_name="t", storage=storage)
        trial = study.ask()
        trial.set_user_attr("worker", f"{os.uname().nodename}:{dead.pid}")
        if url:
            storage.record_heartbeat(trial_id_of(storage, study, trial.number))
        assert fail_dead_workers(study, storage, lambda _: None, requeue=False) == int(fails)
        state = study.get_trials(deepcopy=False)[0].state
        assert state == (optuna.trial.TrialState.FAIL if fails else optuna.trial.TrialState.RUNNING), url


def test_dead_workers_trial_is_requeued_once_even_by_two_workers(tmp_path, monkeypatch) -> None:
    """Two workers start together: both list the dead worker's RUNNING trial before either fails it."""
    config = study_from_dict(_study(tmp_path))
    storage = open_storage(config.output_dir)
    study = optuna.create_study(study_name="t", storage=storage)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.set_user_attr("worker", f"{os.uname().nodename}:{dead.pid}")
    trial.suggest_int("c4_msa", 0, 1)
    other_storage = open_storage(config.output_dir)  # a second worker, same journal
    other = optuna.load_study(study_name="t", storage=other_storage)
    listed = other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    monkeypatch.setattr(other, "get_trials", lambda **_: listed)  # its listing predates the first worker's change
    assert fail_dead_workers(study, storage, lambda _: None) == 1
    assert fail_dead_workers(other, other_storage, lambda _: None) == 0  # failed by the first already: no error
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1


def test_a_reused_pid_does_not_count_as_the_dead_worker() -> None:
    me = os.getpid()
    assert alive(me, process_start(me))
    assert not alive(me, "1.0")  # this pid, but a process started at another time: the recorded worker is gone
    assert alive(me, "123456")  # clock ticks recorded by an older alternas: not comparable, so not taken as gone


# -- 10. atomic writes -----------------------------------------------------------------------------------------------
def test_damaged_files_are_redone_never_reported(tmp_path) -> None:
    config = study_from_dict(_study(tmp_path, diagnostics={"hessian": False, "fourier": False}))
    first = Evaluator(config, quiet=True).evaluate("CC,CC,CC,CC", 0)
    run_dir = Path(first.run_dir)
    (run_dir / "result.json").write_text('{"key": "')  # torn write
    (run_dir / "model.safetensors").write_bytes(b"\x00" * 10)
    said: list[str] = []
    assert load_results(tmp_path / "study", said.append) == {}  # export, claims, report, bench: not a result ...
    assert len(said) == 1 and "1 damaged result file(s) left out" in said[0]  # ... and they say so
    assert f"candidates/{run_dir.name}/result.json" in said[0]
    again = Evaluator(config, quiet=True).evaluate("CC,CC,CC,CC", 0)  # finishes again from the last checkpoint
    assert again.status == "completed" and again.val_acc == first.val_acc and again.test_acc == first.test_acc
    assert load_file(run_dir / "model.safetensors")  # whole again
    (tmp_path / "study" / "study.yaml").write_text("recipe: [unclosed")
    res = run_cli("report", str(tmp_path / "study"))
    assert res.returncode == 2 and "study.yaml: not valid YAML" in res.stderr and "Traceback" not in res.stderr


# -- 11. GPU paths that a CPU can check ----------------------------------------------------------------------------
def test_hessian_products_run_without_tf32_and_restore_the_setting() -> None:
    model = torch.nn.Linear(2, 2)
    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    with twice_differentiable(model):
        assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_mixed_precision_validation_computes_logits_in_fp32() -> None:
    data = load_data(DataConfig("shapes", subset=200, val_fraction=0.5))
    model = model_for("CC,CC,CC,CM", "tiny", data, get_recipe("fast"))
    batches = [(data.val.images[:64].float() / 255, data.val.labels[:64])]
    logits, _ = predict(model, batches, device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not bf16 values widened to fp32


def test_the_heartbeat_outlives_a_storage_error_and_says_so_once(tmp_path) -> None:
    """A real storage error: another connection holds the SQLite database exclusively for a while, so beats fail
    ("database is locked"); the thread keeps beating and recovers when the lock goes."""
    import sqlite3
    import time

    from alternas.search.storage import Heartbeat

    db = tmp_path / "rdb.sqlite3"
    storage = open_storage(tmp_path, f"sqlite:///{db}", heartbeat_s=1, grace_period_s=60)
    study = optuna.create_study(study_name="t", storage=storage)
    trial_id = trial_id_of(storage, study, study.ask().number)
    lines: list[str] = []
    with Heartbeat(storage, trial_id, lines.append) as beat:
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        time.sleep(7)  # longer than SQLite's 5 s busy timeout: at least one beat fails
        lock.execute("ROLLBACK")
        lock.close()
        time.sleep(3)
        assert beat._thread is not None and beat._thread.is_alive()
    assert sum("heartbeat of trial" in line and "failed" in line for line in lines) == 1, lines
    assert any("recovered" in line for line in lines), lines


def test_optuna_s_own_heartbeat_thread_outlives_a_storage_error(tmp_path, capfd) -> None:
    """study.optimize beats from a thread of Optuna's that has no exception handling: a database locked for longer
    than SQLite's busy timeout used to end it (the thread died on the StorageInternalError and never beat again),
    leaving the live trial to go stale; now the failure is said once and the thread's next beat recovers."""
    import sqlite3
    import time

    db = tmp_path / "rdb.sqlite3"
    storage = open_storage(tmp_path, f"sqlite:///{db}", heartbeat_s=1, grace_period_s=60)
    study = optuna.create_study(study_name="t", storage=storage)

    def objective(trial: optuna.Trial) -> float:
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        time.sleep(7)  # longer than SQLite's 5 s busy timeout: at least one beat fails
        lock.execute("ROLLBACK")
        lock.close()
        time.sleep(2.5)  # beats again
        return 1.0

    study.optimize(objective, n_trials=1)
    err = capfd.readouterr().err
    assert "Exception in thread" not in err and "Traceback" not in err, err
    assert err.count("heartbeat of trial") >= 2 and err.count("failed") == 1 and "recovered" in err, err
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE


def test_two_workers_starting_at_once_with_different_settings_never_both_go_on(tmp_path) -> None:
    """Both join a search with no evaluation yet, so both store their settings (the second overwrites the first);
    the one whose settings were overwritten reads them again at its next claim and stops with one line, that claim
    given back."""
    from alternas.errors import ConfigError
    from alternas.search.evaluated import EvaluationRequest
    from alternas.search.evaluations import SharedEvaluations

    first = SharedEvaluations(study_from_dict(_study(tmp_path, buildup={"min_gain": 0.0})), log=lambda _: None)
    second = SharedEvaluations(study_from_dict(_study(tmp_path, buildup={"min_gain": 1.0})), log=lambda _: None)
    request = EvaluationRequest("CC,CC,CC,CC", 0, "k0")
    with pytest.raises(ConfigError, match=r"runs with other settings: min_gain 1\.0 \(here 0\.0\)"):
        first.claim(request)
    assert second.claim(request) is not None  # the given-back claim is asked for again, by the search's policy
    with pytest.raises(ConfigError, match="runs with other settings"):  # and once a search evaluates, it is fixed
        SharedEvaluations(study_from_dict(_study(tmp_path, buildup={"min_gain": 0.0})), log=lambda _: None)


@pytest.mark.parametrize(("key", "before", "now"), [("pool_seed_variance", False, True),
                                                     ("accept_spending", "equal", "power")])
def test_a_search_stored_before_a_decision_setting_existed_resumes_only_as_it_decided(tmp_path, key: str,
                                                                                     before: object,
                                                                                     now: object) -> None:
    """Its settings lack the key: it decided as the code did then (no seed pooling; looks sharing the false-accept
    rate evenly), so resuming it otherwise would replay other decisions: refused, naming the key; with the old
    setting it resumes."""
    from alternas.errors import ConfigError
    from alternas.search.evaluated import EvaluationRequest
    from alternas.search.evaluations import SharedEvaluations

    config = study_from_dict(_study(tmp_path, seeds=[0, 1, 2], buildup={key: now}))  # a race from 2 to 3 seeds
    assert config.seed_budget == (2, 3)
    board = SharedEvaluations(config, log=lambda _: None)
    board.claim(EvaluationRequest("CC,CC,CC,CC", 0, "k0"))
    stored = dict(board.study.user_attrs["decision_settings"])
    assert stored.pop(key) == now
    board.study.set_user_attr("decision_settings", stored)  # as a search started before the key existed left it
    with pytest.raises(ConfigError, match=rf"{key} {before!r} \(here {now!r}\); run it with the same settings "
                                          rf"\(buildup\.{key}={str(before).lower()}\)"):
        SharedEvaluations(config, log=lambda _: None)
    SharedEvaluations(replace(config, buildup=replace(config.buildup, **{key: before})), log=lambda _: None)
    if key == "accept_spending":  # a single look at 2 seeds decides alike under either spending: it resumes
        single = study_from_dict(_study(tmp_path, seeds=[0, 1, 2], buildup={key: now, "min_seeds": 2, "max_seeds": 2}))
        stored.update(min_seeds=2, max_seeds=2)
        board.study.set_user_attr("decision_settings", stored)
        SharedEvaluations(single, log=lambda _: None)


def test_a_worker_whose_data_gives_another_split_is_refused_before_it_trains(tmp_path) -> None:
    """Another machine recorded a run validated on a split this machine's data does not give: joining that search
    stops with one line naming the run before anything trains here (it used to train a child first)."""
    from alternas.errors import AlternasError
    from alternas.search.evaluated import Evaluated, EvaluationRequest
    from alternas.search.evaluations import SharedEvaluations
    from alternas.search.evaluator import CandidateResult

    config = study_from_dict(_study(tmp_path))
    board = SharedEvaluations(config, log=lambda _: None)
    request = EvaluationRequest("CC,CC,CC,CC", 0, "k0")
    result = CandidateResult("k0", "CC,CC,CC,CC", 0, 0, "tiny", 1, None, "completed", val_acc=50.0)
    board.record(board.claim(request), Evaluated(result, {1: np.array([True, False])}, 1, "elsewhere"))
    with pytest.raises(AlternasError, match=r"differs from the one run k0 \(CC,CC,CC,CC, seed 0\).*\(elsewhere\)"):
        run_buildup(config, quiet=True, log=lambda _: None)
    assert not list((tmp_path / "study" / "candidates").glob("*/result.json"))  # nothing trained here


def test_a_result_for_a_trial_another_worker_failed_is_stored_not_lost(tmp_path) -> None:
    from alternas.search.evaluated import Evaluated, EvaluationRequest
    from alternas.search.evaluations import SharedEvaluations
    from alternas.search.evaluator import CandidateResult

    config = study_from_dict(_study(tmp_path))
    board = SharedEvaluations(config, log=lambda _: None)
    request = EvaluationRequest("CC,CC,CC,CC", 0, "k0")
    trial_id = board.claim(request)
    board.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)  # another worker's verdict
    result = CandidateResult("k0", "CC,CC,CC,CC", 0, 0, "tiny", 1, None, "completed", val_acc=50.0)
    board.record(trial_id, Evaluated(result, {1: np.array([True, False])}, 1))
    done = board.snapshot().done[request.id]
    assert done.result == result and done.at().tolist() == [True, False]


def test_an_optuna_trial_with_a_diverged_seed_is_not_scored_on_the_others(tmp_path) -> None:
    """Seed 1 of the first trial's placement diverged (its final result is in the cache, as a real run leaves it);
    seed 0 trains. The trial is pruned, as the build-up rejects such a placement, not scored on its lucky seed."""
    from dataclasses import asdict

    from alternas.search.evaluator import CandidateResult
    from alternas.search.optuna_search import run_optuna

    config = study_from_dict(_study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False, "fourier": False},
                                    optuna={"trials": 1, "pruner": "none"}))
    key = Evaluator(config).key_for("CC,CC,CC,CC", 1)
    diverged = CandidateResult(key, "CC,CC,CC,CC", 0, 1, "tiny", 1, 300, "diverged", error="training loss became nan")
    (tmp_path / "study" / "candidates" / key).mkdir(parents=True)
    (tmp_path / "study" / "candidates" / key / "result.json").write_text(json.dumps(asdict(diverged)))
    lines: list[str] = []
    study = run_optuna(config, quiet=True, log=lines.append)
    trial = study.trials[0]
    assert trial.user_attrs["placement"] == "CC,CC,CC,CC" and trial.user_attrs["statuses"] == ["completed", "diverged"]
    assert trial.state == optuna.trial.TrialState.PRUNED  # never ranked: only complete trials are
    assert any("1 of 2 seeds did not complete" in line for line in lines), lines


def test_an_optuna_trial_whose_seed_crashed_fails_and_its_placement_is_tried_again(tmp_path, monkeypatch) -> None:
    """A crash (out of memory) is not the placement's outcome: the trial fails without a score (neither pruned nor
    ranked), the same placement is queued again (behind the placements queued before it), and the retry trains it
    and completes; the run still delivers the trials it owes."""
    from alternas.search import evaluator as evaluator_module
    from alternas.search.optuna_search import run_optuna

    config = study_from_dict(_study(tmp_path, seeds=[0], diagnostics={"hessian": False, "fourier": False},
                                    optuna={"trials": 2, "pruner": "none"}))
    real_fit, crashes = evaluator_module.fit, []

    def flaky_fit(model, *args, **kwargs):
        if not crashes:
            crashes.append(str(model.placement))
            raise RuntimeError("CUDA error: out of memory")
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(evaluator_module, "fit", flaky_fit)
    lines: list[str] = []
    study = run_optuna(config, quiet=True, log=lines.append)
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["statuses"] == ["failed"]
    assert any("seed 0 crashed (RuntimeError: CUDA error: out of memory)" in line for line in lines), lines
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == first.number)
    assert retry.params == first.params and retry.user_attrs["statuses"] == ["completed"]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.value == retry.user_attrs["val_acc"]
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2 == len(study.trials) - 1  # it owed two trials: the crash did not count

    config = replace(config, output=str(tmp_path / "always"))  # a placement that crashes every time: 3 attempts
    always = crashes[0]

    def always_crashing_fit(model, *args, **kwargs):
        if str(model.placement) == always:
            raise RuntimeError("CUDA error: out of memory")
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(evaluator_module, "fit", always_crashing_fit)
    lines.clear()
    study = run_optuna(config, quiet=True, log=lines.append)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 3 and [t.user_attrs.get("attempt", 1) for t in failed] == [1, 2, 3]
    assert any("crashed 3 times in a row and is not queued again" in line for line in lines), lines
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2  # the others were still tried


def test_a_worker_with_other_decision_settings_or_a_second_folder_is_refused(tmp_path) -> None:
    """One build-up, one policy: a worker whose min_gain (or any decision setting) differs is refused with one line
    naming the key before it rewrites anything; on a shared database a second study folder of the same name on this
    host is refused too. Settings that only say when to stop may change."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    raw = _study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False, "fourier": False},
                 buildup={"max_candidates": 1})
    path = _write(tmp_path, raw)
    assert run_cli("buildup", "--study", str(path), "--quiet", "--storage", url).returncode == 0
    saved = (tmp_path / "study" / "study.yaml").read_text()
    res = run_cli("buildup", "--study", str(path), "--quiet", "--storage", url, "--min-gain", "0.3")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "other settings: min_gain 0.0 (here 0.3)" in res.stderr, res.stderr
    assert (tmp_path / "study" / "study.yaml").read_text() == saved  # the running search's settings stay
    res = run_cli("buildup", "--study", str(path), "--quiet", "--storage", url, "--max-candidates", "2")
    assert res.returncode == 0, res.stderr
    res = run_cli("buildup", "--study", str(path), "--quiet", "--storage", url, "--out", str(tmp_path / "other"))
    assert res.returncode == 2 and "belongs to the study folder" in res.stderr and str(tmp_path / "study") in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_evidence_of_two_validation_splits_is_never_paired(tmp_path) -> None:
    """A second machine whose CIFAR files differ (the cache key leaves out where data lives) continues the search
    in a shared storage: its child would be paired with the first machine's runs of another split. One line."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    write_cifar(tmp_path / "a", "cifar10", n_train=200, seed=1)
    write_cifar(tmp_path / "b", "cifar10", n_train=200, seed=2)
    raw = _study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False, "fourier": False},
                 data={"name": "cifar10", "root": str(tmp_path / "a"), "subset": None, "val_fraction": 0.3},
                 buildup={"max_candidates": 1, "min_seeds": 2})
    assert run_cli("buildup", "--study", str(_write(tmp_path, raw)), "--quiet", "--storage", url).returncode == 0
    raw["data"]["root"] = str(tmp_path / "b")
    raw["buildup"]["max_candidates"] = 2
    res = run_cli("buildup", "--study", str(_write(tmp_path, raw)), "--quiet", "--storage", url)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # refused at start-up, before the second machine trains a child that would be paired with the first's runs
    assert "this machine's validation split" in res.stderr and "(CC,CC,CC,CC, seed 0)" in res.stderr, res.stderr
    assert len(list((tmp_path / "study" / "candidates").glob("*/result.json"))) == 2  # the first machine's 2 seeds


def test_a_paired_look_refuses_evidence_of_two_splits_naming_both_runs() -> None:
    """The last guard, where two candidates' evidence meets: runs recorded with different split digests."""
    from alternas.errors import AlternasError
    from alternas.search.evaluated import Evaluated, same_split
    from alternas.search.evaluator import CandidateResult

    def run(key: str, placement: str, digest: str | None) -> Evaluated:
        result = CandidateResult(key, placement, 0, 0, "tiny", 1, None, "completed", val_acc=50.0)
        return Evaluated(result, {1: np.array([True, False])}, 1, digest)

    same_split([run("k0", "CC,CC,CC,CC", "aaaa"), run("k1", "CC,CC,CC,CM", None), run("k2", "CC,CC,CC,CM", "aaaa")])
    with pytest.raises(AlternasError, match=r"runs k0 \(CC,CC,CC,CC, seed 0\) and k2 \(CC,CC,CC,CM, seed 0\) were "
                                            r"validated on different splits \(aaaa vs bbbb\)"):
        same_split([run("k0", "CC,CC,CC,CC", "aaaa"), run("k1", "CC,CC,CC,CM", None), run("k2", "CC,CC,CC,CM", "bbbb")])
