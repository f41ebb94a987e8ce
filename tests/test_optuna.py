import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from alternas.data import load_data
from alternas.errors import ConfigError
from alternas.placement import Placement
from alternas.report.html import _importances
from alternas.search import study_from_dict
from alternas.search.optuna_search import load_optuna_study, run_optuna
from alternas.search.spaces import InvalidCandidate, load_space, space_from_dict
from alternas.search.storage import redact
from tests.browser import assert_report_renders
from tests.helpers import AlternasProcess, kill_mid_candidate, postgres_url, run_alternas, run_cli, write_imagefolder

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, **optuna_settings) -> dict:
    return {
        "name": "opt", "base": "tiny", "seeds": [0], "output": str(tmp_path / "study"),
        "data": {"name": "shapes", "subset": 300, "val_fraction": 0.2},
        "recipe": {"name": "fast", "epochs": 1, "warmup_epochs": 0, "batch_size": 64},
        "diagnostics": {"hessian": False, "fourier": True, "fourier_images": 16},
        "optuna": {"trials": 4, "space": str(ROOT / "search_spaces" / "tiny.yaml"), **optuna_settings},
    }


def test_shipped_spaces_are_valid_and_encode_the_paper_models() -> None:
    r50 = load_space(ROOT / "search_spaces" / "resnet50.yaml")
    params = r50.encode(Placement.parse("CCC,CCCM,CCCCCM,CMCM"))
    assert params["c4_depth"] == 4 and params["c3_msa"] == 1 and params["msa_dim_head"] == 64
    assert r50.encode(Placement.parse("CCC,CCCM,CCMCCC,CMCM")) is None  # not the reference pattern
    assert load_space(ROOT / "search_spaces" / "resnet18.yaml").base == "resnet18"
    tiny = load_space(ROOT / "search_spaces" / "tiny.yaml")
    assert set(tiny.grid()) == {"c1_msa", "c2_msa", "c3_msa", "c4_depth", "c4_b2", "c4_b3"}


def test_space_sampling_maps_invalid_combinations_to_invalid_candidate() -> None:
    space = space_from_dict({"base": "tiny", "stages": [{"depth": [2]}, {"depth": [2]}, {"depth": [2]},
                                                        {"depth": [2, 4], "msa": "count"}]})
    trial = optuna.trial.FixedTrial({"c1_msa": 0, "c2_msa": 1, "c3_msa": 0, "c4_depth": 2, "c4_msa": 2})
    with pytest.raises(InvalidCandidate, match="c4: 2 alternating MSAs do not fit 2 blocks"):
        space.sample(trial)
    ok = optuna.trial.FixedTrial({"c1_msa": 0, "c2_msa": 1, "c3_msa": 0, "c4_depth": 4, "c4_msa": 2})
    assert str(space.sample(ok)[0]) == "CC,CM,CC,CMCM"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"base": "tiny", "stages": []}, "stages: give a list of 4 stage entries"),
        ({"base": "tiny", "stages": [{"depth": [2], "msa": "some"}] * 4}, "stages[1].msa: unknown mode 'some'"),
        ({"base": "nope", "stages": []}, "base: unknown base 'nope'"),
        ({"base": "tiny", "stages": [{"depth": [2]}] * 4, "msa": {"heads": [1]}}, "msa.heads: unknown key"),
    ],
)
def test_space_errors_name_file_and_key(tmp_path, raw: dict, fragment: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=str(path).replace(".", r"\.")) as err:
        load_space(path)
    assert fragment in str(err.value)


def test_redact_hides_credentials() -> None:
    assert redact("postgresql://alice:s3cret@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert "s3cret" not in redact("redis://h/0?password=s3cret")


def test_optuna_search_on_the_journal_file_records_every_trial(tmp_path, monkeypatch) -> None:
    from alternas.search import optuna_search

    loads = []  # a spy: the real loader, counted
    monkeypatch.setattr(optuna_search, "load_data", lambda cfg: loads.append(cfg) or load_data(cfg))
    config = study_from_dict(_study(tmp_path, pruner="none"))
    study = run_optuna(config, quiet=True, log=lambda _: None)
    trials = study.get_trials()
    trained = {t.user_attrs["placement"] for t in trials if t.state == TrialState.COMPLETE}
    assert len(trained) >= 2 and len(loads) == 1  # the dataset is decoded once per worker, not once per trial
    assert len(trials) == 4 and (Path(config.output_dir) / "optuna.journal").is_file()
    enqueued = [t.user_attrs.get("enqueued") for t in trials[:2]]
    assert enqueued == ["base", "paper"]
    assert trials[0].user_attrs["placement"] == "CC,CC,CC,CC" and trials[1].user_attrs["placement"] == "CC,CM,CM,CM"
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done and all({"val_acc", "params", "flops", "delta_high", "run_dirs"} <= set(t.user_attrs) for t in done)
    assert all(t.user_attrs["seeds"] == list(config.seeds) for t in done)
    assert study.metric_names == ["acc"]
    # the same placements at the same fidelity come from the shared cache
    results = list((Path(config.output_dir) / "candidates").glob("*/result.json"))
    assert len(results) == len({t.user_attrs["placement"] for t in done})
    again = load_optuna_study(config)
    assert len(again.trials) == 4

    # the report's figures are attached to the study; building it again replaces them rather than adding copies
    from alternas.report import build_report

    build_report(config.output_dir)
    page = build_report(config.output_dir)
    assert_report_renders(page, min_figures=5)
    text = page.read_text()
    assert "Paired gain against the best trial" in text  # each top trial's gain over the best, with its interval
    ranked = sorted(done, key=lambda t: t.value, reverse=True)
    assert all(f"trial {t.number}</td>" in text for t in ranked[1:])
    attached = _dashboard_figures(Path(config.output_dir) / "optuna.journal")
    assert len(attached) == page.read_text().count('class="plotly-graph-div"') >= 5
    assert all(json.loads(a["graph_object"])["data"] for a in attached)


def test_multi_objective_importances_follow_each_objectives_direction() -> None:
    """High accuracy comes only from x (x > 0.8), low accuracy is decided by y: x must rank first for `acc`
    (maximised), which Optuna's evaluator gets backwards unless the report negates the target."""
    dist = optuna.distributions.FloatDistribution(0, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    rng = np.random.default_rng(0)
    for _ in range(60):
        x, y = rng.random(2)
        acc = 90 + 10 * x if x > 0.8 else 50 * y
        study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions={"x": dist, "y": dist},
                                                  values=[acc, y]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the evaluator's direction warning is answered, not leaked
        (acc_figure,) = _importances(study, 0, "acc")
        (params_figure,) = _importances(study, 1, "params")
    assert acc_figure.data[0].y[-1] == "x"  # plotly bars run from least to most important
    assert params_figure.data[0].y[-1] == "y"


def _dashboard_figures(journal: Path) -> list[dict]:
    """What a real optuna-dashboard server, opened on the journal file as README says, serves for the study."""
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), str(journal), "--port",
                               str(port), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/0", timeout=10) as reply:
                    return json.load(reply)["plotly_graph_objects"]
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.stderr else ""
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_two_concurrent_workers_share_one_study(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path, trials=6, pruner="none", sampler="random")))
    workers = [AlternasProcess(["optuna", "--study", str(path), "--quiet"]) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-1500:] for o in outputs]
    study = load_optuna_study(study_from_dict(_study(tmp_path)))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert 6 <= len(finished) <= 7  # the total is the study's, not per worker (one race may add one)
    assert all(t.user_attrs.get("val_acc") is not None for t in study.trials if t.state == TrialState.COMPLETE)
    # both workers wrote the report at their end; it is whole and renders (history, coordinates, heat map, ...)
    assert_report_renders(tmp_path / "study" / "report.html", min_figures=5)


def test_optuna_cli_errors(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path)))
    res = run_cli("optuna", "--study", str(path), "--objectives", "acc,speed")
    assert res.returncode == 2 and "unknown objective 'speed'" in res.stderr
    res = run_cli("optuna", "--study", str(path), "--objectives", "acc,robustness")
    assert res.returncode == 2 and "needs diagnostics.corruptions: true" in res.stderr, res.stderr
    res = run_cli("optuna", "--study", str(path), "--storage", "postgresql://u:topsecret@127.0.0.1:1/none")
    assert res.returncode == 2 and "topsecret" not in res.stderr + res.stdout


def test_a_user_error_inside_a_trial_is_one_line_and_stops_the_study(tmp_path) -> None:
    """An image that cannot be read is only met when a trial trains on it: the trial fails without Optuna's logged
    traceback, the study stops, and the command says what to fix in one line (exit 2)."""
    write_imagefolder(tmp_path / "ds", classes=2, per_class=6, ext="jpg")
    bad = sorted((tmp_path / "ds" / "train").rglob("*.jpg"))[0]
    bad.write_bytes(b"not a jpeg")
    raw = _study(tmp_path, trials=3)
    raw["data"] = {"name": f"imagefolder:{tmp_path / 'ds'}", "stream": "always", "val_fraction": 0.25}
    raw["recipe"] = {**raw["recipe"], "batch_size": 4, "workers": 0}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = run_cli("optuna", "--study", str(path), "--quiet")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [f"alternas: error: cannot read image {bad} (UnidentifiedImageError); "
                                               "replace or remove the file"], res.stderr
    study = load_optuna_study(study_from_dict(raw))
    states = [t.state for t in study.trials]  # the enqueued known placements still wait
    assert states[0] == TrialState.FAIL and states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    assert "cannot read image" in study.trials[0].user_attrs["error"]
    raw["recipe"]["batch_size"] = 64  # more than the 9 training images: said before any trial is created
    raw["output"] = str(tmp_path / "other")
    path.write_text(yaml.safe_dump(raw))
    res = run_cli("optuna", "--study", str(path), "--quiet")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "alternas: error: the training set has 9 images, fewer than recipe.batch_size 64; lower the batch size or "
        "use more data"], res.stderr
    assert not (tmp_path / "other" / "optuna.journal").exists()


def test_multi_objective_pareto_front_and_export_rule(tmp_path) -> None:
    import timm

    config = study_from_dict(_study(tmp_path, trials=3, objectives=["acc", "params"]))
    study = run_optuna(config, quiet=True, log=lambda _: None)
    assert len(study.directions) == 2 and study.best_trials
    root = str(config.output_dir)
    base = ["export", "--study", root, "--best", "--out"]
    res = run_cli(*base, str(tmp_path / "a"))
    assert res.returncode == 2 and "--prefer acc|params" in res.stderr and "Pareto trials: #" in res.stderr
    res = run_cli(*base, str(tmp_path / "b"), "--prefer", "params")
    assert res.returncode == 0, res.stderr
    smallest = min(study.best_trials, key=lambda t: t.values[1])
    model = timm.create_model(f"local-dir:{tmp_path / 'b'}", pretrained=True)
    assert str(model.placement) == smallest.user_attrs["placement"]
    report = run_cli("report", root)
    assert report.returncode == 0, report.stderr
    page = (Path(root) / "report.html").read_text()
    assert "Pareto" in page and "MSA placement among the top" in page
    assert_report_renders(Path(root) / "report.html", min_figures=7)  # Pareto, parallel coords x2, heat map, ...


def test_robustness_on_corrupted_images_is_an_objective(tmp_path) -> None:
    raw = _study(tmp_path, trials=2, objectives=["acc", "robustness"], sampler="random")
    raw["diagnostics"] = {"hessian": False, "fourier": False, "corruptions": True, "corruption_images": 16,
                          "severities": [3]}
    study = run_optuna(study_from_dict(raw), quiet=True, log=lambda _: None)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
    for trial in complete:
        assert trial.values[1] == pytest.approx(trial.user_attrs["robustness"]) and 0 <= trial.values[1] <= 100
    rows = pd.read_csv(tmp_path / "study" / "results.csv")
    assert rows["robustness_source"].str.startswith("generated (albumentations").all()


def test_two_workers_on_a_real_postgresql_server(tmp_path) -> None:
    import uuid

    url = postgres_url()
    name = f"pg-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path, trials=5, pruner="none", sampler="random", study_name=name)))
    workers = [AlternasProcess(["optuna", "--study", str(path), "--quiet", "--storage", url]) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-1500:] for o in outputs]
    password = url.split("://", 1)[1].split("@")[0].partition(":")[2]
    assert all(password not in out + err for out, err in outputs)  # credentials never logged
    saved = [p for p in (tmp_path / "study").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".html")]
    assert saved and not any(password in p.read_text() for p in saved)  # ... nor written to the study folder
    study = optuna.load_study(study_name=name, storage=url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 5 <= len(finished) <= 6
    assert all(t.user_attrs.get("val_acc") is not None for t in finished if t.state == TrialState.COMPLETE)


def _killed_and_restarted_worker(tmp_path: Path, storage: str | None, **optuna_settings
                                 ) -> tuple[optuna.Study, optuna.trial.FrozenTrial, Path, list[dict], str]:
    """Start a worker, SIGKILL it inside a trial (after an epoch checkpoint), then run a fresh worker to the end."""
    raw = _study(tmp_path, trials=2, pruner="none", sampler="random", **optuna_settings)
    raw["data"]["subset"] = 300
    raw["recipe"]["epochs"] = 4
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = ["optuna", "--study", str(path), "--quiet", *(["--storage", storage] if storage else [])]
    proc = AlternasProcess(args)
    victim, epochs_before = kill_mid_candidate(proc, tmp_path / "study" / "candidates")
    assert 1 <= len(epochs_before) < 4
    config = study_from_dict(raw)
    running = load_optuna_study(config, storage).get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1  # the killed worker's trial is left RUNNING
    res = run_alternas(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    return load_optuna_study(config, storage), running[0], victim, epochs_before, res.stdout


def _assert_retried_and_resumed(study: optuna.Study, killed: optuna.trial.FrozenTrial, retry_number: int,
                                victim: Path, epochs_before: list[dict]) -> None:
    states = {t.number: t.state for t in study.trials}
    assert states[killed.number] == TrialState.FAIL
    retry = study.trials[retry_number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["placement"] == killed.user_attrs["placement"]
    history = json.loads((victim / "metrics.json").read_text())["history"]
    assert len(history) == 4 and history[: len(epochs_before)] == epochs_before  # resumed, not restarted
    assert list(states.values()).count(TrialState.COMPLETE) == 2  # the study's total, the lost trial made good
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))


def test_worker_killed_mid_trial_on_the_journal_file_is_requeued_and_resumes(tmp_path) -> None:
    study, killed, victim, epochs_before, out = _killed_and_restarted_worker(tmp_path, None)
    assert f"re-queued trial {killed.number}" in out
    retries = [t.number for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1
    _assert_retried_and_resumed(study, killed, retries[0], victim, epochs_before)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_worker_killed_mid_trial_on_postgresql_is_retried_by_the_heartbeat(tmp_path) -> None:
    import uuid

    url = postgres_url()
    # restarted well inside the grace period, the dead worker's trial still looks alive: the new worker runs the
    # rest of the study, then waits for that trial to go stale and runs its retry (it used to leave it RUNNING)
    study, killed, victim, epochs_before, out = _killed_and_restarted_worker(
        tmp_path, url, study_name=f"kill-{uuid.uuid4().hex[:8]}", heartbeat_s=1, grace_period_s=20)
    retries = [t.number for t in study.trials
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number]
    assert f"trial {killed.number} stopped beating (its worker died): retried here" in out
    assert len(retries) == 1
    _assert_retried_and_resumed(study, killed, retries[0], victim, epochs_before)
