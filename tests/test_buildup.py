import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml

import alternas  # noqa: F401
from alternas.errors import ConfigError
from alternas.placement import Placement
from alternas.search import BuildupPolicy, Evaluator, load_study, run_buildup, study_from_dict
from alternas.search.evaluator import candidate_key
from tests.browser import assert_report_renders
from tests.helpers import AlternasProcess, kill_mid_candidate, run_alternas, run_cli, small_study

PAPER_CIFAR100 = {  # PAPER.md §3.3, in the order the authors evaluated them
    "CCC,CCCC,CCCCCC,CCCC": (82.48, "start"),
    "CCC,CCCC,CCCCCC,CCCM": (83.45, "accept"),
    "CCC,CCCC,CCCCCC,CMCM": (83.66, "accept"),
    "CCC,CCCC,CCCCCM,CMCM": (83.77, "accept"),
    "CCC,CCCC,CCCMCM,CMCM": (83.52, "reject"),
    "CCC,CCCC,CMCMCM,CMCM": (83.19, "reject"),
    "CCC,CCCM,CCCCCM,CMCM": (84.02, "accept"),
    "CCC,CMCM,CCCCCM,CMCM": (83.39, "reject"),
    "CCM,CCCM,CCCCCM,CMCM": (83.80, "reject"),
}


def test_policy_reproduces_the_papers_build_up() -> None:
    policy = BuildupPolicy(Placement.all_conv((3, 4, 6, 4)), min_gain=0.0, patience=1)
    proposed = []
    while (candidate := policy.propose()) is not None:
        proposed.append(str(candidate))
        policy.observe(PAPER_CIFAR100[str(candidate)][0])
    assert proposed == list(PAPER_CIFAR100)
    assert [s.decision for s in policy.steps] == [d for _, d in PAPER_CIFAR100.values()]
    assert str(policy.best) == "CCC,CCCM,CCCCCM,CMCM"
    assert [s.stage for s in policy.steps] == [None, 4, 4, 3, 3, 3, 2, 2, 1]
    assert policy.steps[5].parent == "CCC,CCCC,CCCMCM,CMCM"  # patience stacks on the rejected candidate
    assert policy.steps[6].parent == "CCC,CCCC,CCCCCM,CMCM"  # the next stage starts from the best


def test_policy_without_patience_leaves_a_stage_at_the_first_reject() -> None:
    policy = BuildupPolicy(Placement.all_conv((3, 4, 6, 4)), min_gain=0.0, patience=0)
    proposed = []
    while (candidate := policy.propose()) is not None:
        proposed.append(str(candidate))
        policy.observe(PAPER_CIFAR100.get(str(candidate), (0.0,))[0])
    assert "CCC,CCCC,CMCMCM,CMCM" not in proposed and "CCC,CCCM,CCCCCM,CMCM" in proposed


def test_policy_min_gain_and_failures_count_as_no_gain() -> None:
    policy = BuildupPolicy(Placement.parse("CC,CC"), min_gain=1.0)
    assert str(policy.propose()) == "CC,CC"
    policy.observe(50.0)
    assert str(policy.propose()) == "CC,CM"
    assert policy.observe(50.9).decision == "reject"  # +0.9 is not more than min_gain
    assert str(policy.propose()) == "CM,CC"
    assert policy.observe(None).decision == "reject"  # failed / diverged
    assert policy.propose() is None and str(policy.best) == "CC,CC"


def test_policy_skips_stages_without_a_valid_position() -> None:
    policy = BuildupPolicy(Placement.parse("CC,C,CCC"), min_gain=0.0)
    policy.observe(10.0)
    seen = []
    while (candidate := policy.propose()) is not None:
        seen.append(str(candidate))
        policy.observe(5.0)
    assert seen == ["CC,C,CCM", "CM,C,CCC"]  # stage 2 (one strided block) has no position


_study = small_study


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"buildup": {"patiense": 1}}, "buildup: unknown key 'patiense'"),
        ({"recipe": {"name": "fast", "lr": -1}}, "lr must be > 0"),
        ({"base": "resnet9"}, "unknown base 'resnet9'"),
        ({"buildup": {"start": "CX,CC,CC,CC"}}, "unknown block letter 'X'"),
        ({"seeds": ["a"]}, "seeds must be whole numbers"),
    ],
)
def test_study_file_errors_name_the_key(tmp_path, change: dict, fragment: str) -> None:
    raw = _study(tmp_path)
    raw.update(change)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")) as err:
        load_study(path)
    assert str(path) in str(err.value)
    res = run_cli("buildup", "--study", str(path))
    assert res.returncode == 2 and fragment in res.stderr and "Traceback" not in res.stderr


def test_shipped_study_files_are_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "studies"
    quick = load_study(root / "quickstart.yaml")
    assert quick.base == "tiny" and quick.data.name == "brightest"
    # the quickstart trains exactly what its table holds, so each of its answers can be replayed against the truth
    table = load_study(root / "tables" / "brightest-12ep" / "study.yaml")
    for seed in (0, 2):
        assert candidate_key(Placement.parse("CC,CC,CC,CM"), quick, quick.recipe, seed) == \
            candidate_key(Placement.parse("CC,CC,CC,CM"), table, table.recipe, seed)
    assert quick.buildup.min_gain == table.buildup.min_gain and quick.seed_budget == table.seed_budget
    paper = load_study(root / "cifar100-resnet50.yaml")
    assert paper.recipe.name == "paper" and paper.buildup.patience == 1 and paper.base == "resnet50"


def test_evaluator_caches_by_content(tmp_path) -> None:
    config = study_from_dict(_study(tmp_path))
    evaluator = Evaluator(config, quiet=True)
    first = evaluator.evaluate("CC,CC,CC,CM", seed=0)
    assert first.status == "completed" and first.val_acc is not None and first.lambda_max is not None
    assert set(first.delta_high) == {"c1", "c2", "c3", "c4"} and first.params > 0 and first.flops > 0
    stamp = (Path(first.run_dir) / "model.safetensors").stat().st_mtime_ns
    again = Evaluator(config, quiet=True).evaluate("cc,cc,cc,cm", seed=0)  # a new evaluator: read from disk
    assert again == first
    assert (Path(first.run_dir) / "model.safetensors").stat().st_mtime_ns == stamp
    other_seed = evaluator.evaluate("CC,CC,CC,CM", seed=1)
    assert other_seed.key != first.key
    table = (Path(config.output_dir) / "results.csv").read_text().splitlines()
    assert len(table) == 3 and "delta_high_c4" in table[0]


def test_diverged_candidates_are_recorded_and_the_search_goes_on(tmp_path) -> None:
    config = study_from_dict(_study(tmp_path, recipe={"name": "fast", "epochs": 1, "warmup_epochs": 0,
                                                      "lr": 1e30, "clip_grad": None}))
    outcome = run_buildup(config, quiet=True, log=lambda _: None)
    assert outcome.candidates_evaluated == 3 and outcome.stopped_by == "max_candidates"
    statuses = {r.status for r in Evaluator(config).all_results()}
    assert statuses == {"diverged"}
    assert [s.decision for s in outcome.steps] == ["start", "reject", "reject"]


def test_resume_after_kill_mid_comparison_reuses_finished_runs_and_the_interrupted_epochs(tmp_path) -> None:
    """Seed pool [0, 1], one seed first: at confidence 0.9999 the first look cannot decide, so the comparison adds
    seed 1 (the incumbent's run, then the child's). The process is killed inside the child's seed-1 run."""
    raw = _study(tmp_path, seeds=[0, 1], data={"subset": 300}, recipe={"name": "fast", "epochs": 4, "warmup_epochs": 0},
                 diagnostics={"hessian": False, "fourier": False},
                 buildup={"max_candidates": 2, "min_seeds": 1, "max_seeds": 2, "confidence": 0.9999})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = ["buildup", "--study", str(path), "--quiet"]
    proc = AlternasProcess(args)
    candidates = tmp_path / "study" / "candidates"
    victim, epochs_before = kill_mid_candidate(proc, candidates, after_finished=3)
    done_before = {p: p.stat().st_mtime_ns for p in candidates.glob("*/result.json")}
    assert len(done_before) == 3 and 1 <= len(epochs_before) < 4

    res = run_alternas(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # never retrained
    assert res.stdout.count("] training") == 1  # only the interrupted run, resumed
    history = json.loads((victim / "metrics.json").read_text())["history"]
    assert len(history) == 4 and history[: len(epochs_before)] == epochs_before  # resumed, not restarted
    trajectory = json.loads((tmp_path / "study" / "trajectory.json").read_text())
    child = trajectory["steps"][1]
    assert child["seeds_used"] == [0, 1] and child["decided_by"] == "seed budget" and child["decision"] == "reject"
    assert len(trajectory["steps"][0]["keys"]) == 2  # the incumbent's seed-1 run stands for it too
    assert "undecided -> adding seed 1" in res.stdout


def test_racing_reuses_the_incumbents_runs_and_records_each_decisions_evidence(tmp_path) -> None:
    config = study_from_dict(_study(tmp_path, seeds=[0, 1, 2], diagnostics={"hessian": False, "fourier": False},
                                    buildup={"max_candidates": 3, "min_seeds": 1, "max_seeds": 3,
                                             "confidence": 0.9999, "screen_at": 0.5},
                                    recipe={"name": "fast", "epochs": 2, "warmup_epochs": 0, "batch_size": 64}))
    lines: list[str] = []
    outcome = run_buildup(config, quiet=True, log=lines.append)
    trained = [line for line in lines if "] training" in line]
    assert len(trained) == len(set(trained))  # nothing trained twice: incumbent runs come from the cache
    assert sum("CC,CC,CC,CC  seed" in line for line in trained) <= 3  # the incumbent, at most once per seed
    steps = json.loads((Path(config.output_dir) / "trajectory.json").read_text())["steps"]
    assert steps[0]["decision"] == "start" and steps[0]["seeds_used"] == [0]
    for step in steps[1:]:
        assert step["incumbent"] == "CC,CC,CC,CC" and step["decided_by"] in ("confidence", "seed budget", "screen")
        low, high = step["gain_ci"]
        assert low <= step["gain"] <= high and 0 <= step["p_gain"] <= 1
        if step["decided_by"] == "seed budget":
            assert step["seeds_used"] == [0, 1, 2] and step["decision"] == "reject"
        # a child stopped at the screen (epoch 1 of 2) has paused runs, never a final result; every other has results
        finals = [Path(config.output_dir, "candidates", k, "result.json").exists() for k in step["keys"]]
        assert finals == [step["decided_by"] != "screen"] * len(finals), step
    # whether a child is screened here depends on training noise; which child the screen stops is pinned by
    # tests/test_buildup_decisions.py on hand-made evidence
    assert any(s["decided_by"] == "seed budget" and s["decision"] == "reject" for s in steps[1:])
    assert any("P(gain > 0) = " in line and "adding seed 1" in line for line in lines)
    assert any("screen at epoch 1:" in line for line in lines)
    assert outcome.candidates_evaluated == 3
    table = pd.read_csv(Path(config.output_dir) / "results.csv")
    assert len(table) == len(table[["placement", "seed"]].drop_duplicates())  # one row per (placement, seed)


def test_seed_budget_is_checked_against_the_pool(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"buildup.max_seeds must be between 1 and the number of seeds"):
        study_from_dict(_study(tmp_path, seeds=[0, 1], buildup={"max_seeds": 3}))
    with pytest.raises(ConfigError, match=r"min_seeds \(3\) must not exceed buildup.max_seeds \(2\)"):
        study_from_dict(_study(tmp_path, seeds=[0, 1, 2], buildup={"min_seeds": 3, "max_seeds": 2}))
    assert study_from_dict(_study(tmp_path, seeds=[0])).seed_budget == (1, 1)
    assert study_from_dict(_study(tmp_path, seeds=list(range(8)))).seed_budget == (2, 5)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_study(tmp_path, seeds=[0, 1, 2])))
    res = run_cli("buildup", "--study", str(path), "--max-seeds", "4")
    assert res.returncode == 2 and "buildup.max_seeds must be between 1 and the number of seeds in the pool (3" in \
        res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("bench", "decisions", "--study", str(path), "--set", "buildup.screen_at=1.5")
    assert res.returncode == 2 and "buildup.screen_at must be a fraction" in res.stderr


def test_report_and_export_of_the_best_candidate(tmp_path) -> None:
    config = study_from_dict(_study(tmp_path, seeds=[0, 1]))
    outcome = run_buildup(config, quiet=True, log=lambda _: None)
    root = Path(config.output_dir)
    res = run_cli("report", str(root))
    assert res.returncode == 0, res.stderr
    page = (root / "report.html").read_text()
    assert "Build-up trajectory" in page and "Chosen architecture" in page and "Fourier analysis" in page
    assert "Hessian max-eigenvalue spectrum" in page
    assert_report_renders(root / "report.html", min_figures=5)
    results = Evaluator(config).all_results()
    assert len(results) == 6 and all(r.key in page for r in results)  # 3 placements x 2 seeds in the table
    out = tmp_path / "exported"
    res = run_cli("export", "--study", str(root), "--best", "--out", str(out))
    assert res.returncode == 0, res.stderr
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert str(model.placement) == outcome.best
    from alternas.models.timm_hub import model_from_run
    from alternas.search.selection import best_buildup_run

    source = model_from_run(best_buildup_run(root).run_dir)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), source(x), atol=1e-6)
