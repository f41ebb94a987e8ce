"""The build-up's decisions where they were measured wrong: screening stopped better children, a crash decided a
comparison, the printed interval disagreed with the decision, one seed was the default. Each test replays the real
build-up (``replay_buildup``) over hand-made evaluations whose truth is known, or runs real training."""

import numpy as np
import pytest

import alternas.search.evaluator as evaluator_module
from alternas.placement import Placement
from alternas.search import study_from_dict
from alternas.search.buildup import ONE_SEED, EvaluationCrashed, run_buildup
from alternas.search.decision import compare_paired, sequential_compare
from alternas.search.evaluated import Evaluated, evaluation_id
from alternas.search.evaluator import CandidateResult, candidate_key
from alternas.search.planner import replay_buildup
from alternas.search.study import StudyConfig, load_study
from tests.helpers import small_study

START, CHILD = "CC,CC,CC,CC", "CC,CC,CC,CM"
EXAMPLES = 2000


def _config(**buildup):
    return study_from_dict({"name": "t", "base": "tiny", "seeds": [0, 1, 2],
                            "recipe": {"name": "fast", "epochs": 4, "warmup_epochs": 0},
                            "buildup": {"min_gain": 0.5, "confidence": 0.9, "max_candidates": 2, **buildup}})


def _evaluated(config, placement: str, seed: int, correct: dict[int, np.ndarray], status: str = "completed",
               stop_after: int | None = None) -> tuple[str, Evaluated]:
    key = candidate_key(Placement.parse(placement), config, config.recipe, seed)
    last = max(correct) if correct else None
    acc = None if last is None else 100 * float(correct[last].mean())
    result = CandidateResult(key, placement, placement.count("M"), seed, config.base, config.recipe.total_epochs,
                             None, status, val_acc=acc, epochs_trained=last or 0, error="boom" if status == "failed"
                             else None)
    return evaluation_id(key, stop_after), Evaluated(result, correct, last)


def _parent(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(EXAMPLES) < 0.9


def _fix(parent: np.ndarray, errors: int) -> np.ndarray:
    """``parent`` with its first ``errors`` wrong examples made right: a gain of errors / EXAMPLES, no noise."""
    child = parent.copy()
    child[np.flatnonzero(~parent)[:errors]] = True
    return child


def test_screening_stops_only_a_child_confidently_worse_than_its_incumbent() -> None:
    """At the screen (epoch 2 of 4) the child leads by +0.30 pp on every seed: not confidently above min_gain 0.5,
    but not worse either. It must train on (it used to be stopped as 'confidently worse'); a child behind by
    0.30 pp on every seed is stopped."""
    config = _config(screen_at=0.5)
    for errors, stopped in ((6, False), (-6, True)):
        done = dict(_evaluated(config, START, s, {2: _parent(s), 4: _parent(s)}) for s in (0, 1, 2))
        for s in (0, 1):
            lead = _fix(_parent(s), errors) if errors > 0 else ~_fix(~_parent(s), -errors)
            done.update([_evaluated(config, CHILD, s, {2: lead}, "paused", stop_after=2)])
        replay = replay_buildup(config, done.get)
        if stopped:
            assert replay.blocked is None and replay.policy.steps[1].decided_by == "screen"
        else:
            assert replay.blocked is not None, "the child was stopped at the screen"
            assert {(r.placement, r.stop_after) for r in replay.blocked.requests} == {(CHILD, None)}


def test_a_crashed_run_is_asked_for_again_never_counted_as_a_failure() -> None:
    config = _config()
    done = dict(_evaluated(config, START, s, {4: _parent(s)}) for s in (0, 1, 2))
    done.update([_evaluated(config, CHILD, 0, {}, "failed"), _evaluated(config, CHILD, 1, {4: _fix(_parent(1), 40)})])
    replay = replay_buildup(config, done.get)
    assert len(replay.policy.steps) == 1, "a crash decided the comparison"
    assert [(r.placement, r.seed) for r in replay.blocked.requests] == [(CHILD, 0)]
    diverged = dict(done)
    diverged.update([_evaluated(config, CHILD, 0, {}, "diverged")])  # a divergence is the child's own outcome
    step = replay_buildup(config, diverged.get).policy.steps[1]
    assert step.decision == "reject" and step.decided_by == "failure"


@pytest.mark.parametrize("accept_at", [None, 0.97])
def test_the_printed_interval_is_the_one_the_decision_uses(accept_at: float | None) -> None:
    """Accept exactly when the interval's lower end clears min_gain, reject exactly when its upper end is below (a
    single look, and an early look of a race that accepts only at 0.97)."""
    rng = np.random.default_rng(1 if accept_at is None else 3)
    seen = set()
    for _ in range(400):
        parent = rng.random((3, 300)) < 0.8
        fixed = ~parent & (rng.random((3, 300)) < rng.uniform(0, 0.3))  # errors the child gets right
        broken = parent & (rng.random((3, 300)) < rng.uniform(0, 0.05))  # and right answers it gets wrong
        child = (parent | fixed) & ~broken
        c = compare_paired(child, parent, 0.5, 0.9, accept_at=accept_at)
        lo, hi = c.bounds
        assert (c.decision == "accept") == (lo >= c.min_gain) and (c.decision == "reject") == (hi <= c.min_gain)
        assert f"[{lo:+.2f}, {hi:+.2f}]" in c.describe() and f"accept >= {c.accept_at:.3g}" in c.describe()
        seen.add(c.decision)
    assert seen == {"accept", "reject", "undecided"}


def test_the_trajectory_keeps_the_decisions_interval() -> None:
    config = _config()
    done = dict(_evaluated(config, START, s, {4: _parent(s)}) for s in (0, 1, 2))
    done.update(_evaluated(config, CHILD, s, {4: _fix(_parent(s), 60)}) for s in (0, 1))
    step = replay_buildup(config, done.get).policy.steps[1]
    child = np.stack([_fix(_parent(s), 60) for s in (0, 1)])
    outcome = sequential_compare(lambda k: (child[:k], np.stack([_parent(s) for s in range(k)])), min_seeds=2,
                                 max_seeds=3, spending=config.buildup.accept_spending, min_gain=0.5, confidence=0.9)
    assert step.decision == outcome.decision == "accept"
    assert step.gain_ci == list(outcome.final.bounds) and step.gain_ci[0] > 0.5


def test_seeds_default_to_a_pool_of_three_and_one_seed_says_it_is_uncalibrated(tmp_path, capsys) -> None:
    assert StudyConfig().seeds == (0, 1, 2) and StudyConfig().seed_budget == (2, 3)
    paper = load_study("studies/cifar100-resnet50.yaml")
    assert len(paper.seeds) >= 3 and paper.seed_budget[0] == 2
    config = study_from_dict(small_study(tmp_path, diagnostics={"hessian": False, "fourier": False},
                                         buildup={"max_candidates": 1}))
    lines: list[str] = []
    run_buildup(config, quiet=True, log=lines.append)
    assert ONE_SEED in lines


def test_a_crash_is_retried_and_a_run_that_keeps_crashing_stops_the_search(tmp_path, monkeypatch) -> None:
    """Real training; ``fit`` crashes (out of memory) on the child's first attempt: the search trains it again and
    decides on the run that finished. A child that crashes every time stops the search with one line, keeping the
    start's finished runs."""
    raw = small_study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False, "fourier": False},
                      buildup={"max_candidates": 2, "min_seeds": 2})
    real_fit = evaluator_module.fit
    crashes: list[str] = []

    def flaky_fit(model, *args, crash_every_time: bool = False, **kwargs):
        if str(model.placement) == CHILD and (crash_every_time or not crashes):
            crashes.append(str(model.placement))
            raise RuntimeError("CUDA error: out of memory")
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(evaluator_module, "fit", flaky_fit)
    lines: list[str] = []
    outcome = run_buildup(study_from_dict(raw), quiet=True, log=lines.append)
    assert len(crashes) == 1 and any("crashed (RuntimeError: CUDA error: out of memory)" in line for line in lines)
    assert [s.decided_by for s in outcome.steps][1] != "failure" and outcome.steps[1].seeds_used == [0, 1]

    raw["output"] = str(tmp_path / "again")
    monkeypatch.setattr(evaluator_module, "fit", lambda model, *a, **k: flaky_fit(model, *a, crash_every_time=True,
                                                                                    **k))
    with pytest.raises(EvaluationCrashed, match=r"CC,CC,CC,CM seed 0 crashed 3 times .*error\.log"):
        run_buildup(study_from_dict(raw), quiet=True, log=lines.append)
    assert len(list((tmp_path / "again" / "candidates").glob("*/result.json"))) >= 2  # the start's runs are kept
