"""Tabular benchmarks and searches replayed against them: a hand-made table whose truth is known, and a real one
computed by `alternas table` (resume, cache reuse)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import norm

from alternas.bench.decisions import _gradable, graded_by_table
from alternas.errors import ConfigError
from alternas.placement import Placement
from alternas.search import study_from_dict
from alternas.search.evaluator import CandidateResult, candidate_key
from alternas.search.policy import Step
from alternas.search.replay import FIELDS, Outcome, Truth, cross_fit_regret, replay_search
from alternas.search.study import StudyConfig
from alternas.search.table import Table, reachable_placements, table_placements
from tests.helpers import run_cli, small_study

START = "CC,CC,CC,CC"
HELPS = "CC,CC,CC,CM"  # the one MSA that truly helps, by +3 pp
C3 = "CC,CC,CM,CC"


def _study(**buildup) -> dict:
    return {"name": "hand", "base": "tiny", "seeds": [0, 1, 2],
            "recipe": {"name": "fast", "epochs": 2, "warmup_epochs": 0},
            "buildup": {"min_gain": 0.5, "confidence": 0.9, **buildup}}


def hand_made_table(gains: dict[str, float], seeds: int = 8, examples: int = 1000, seed_sd: float = 0.3,
                    base_acc: float = 85.0, rho: float = 0.9, config: StudyConfig | None = None) -> Table:
    """Every placement the build-up reaches on the tiny base, each seed's per-example correctness drawn around its
    true accuracy (``base_acc`` + its gain in ``gains``, else - 2 pp): shared example difficulty (``rho``: runs
    agree on most examples, as trained nets do) and ``seed_sd`` pp of seed noise. Epoch 1 is 5 pp below epoch 2.
    Its runs are keyed as ``config``'s (default ``_study()``; it must train 2 epochs)."""
    placements = [str(p) for p in reachable_placements(Placement.parse(START))]
    config = config or study_from_dict(_study())
    table = Table(list(range(seeds)), placements, 2, examples, "hand")
    difficulty = np.random.default_rng(0).standard_normal(examples)
    for i, placement in enumerate(placements):
        for seed in range(seeds):
            rng = np.random.default_rng([i, seed])
            truth = base_acc + gains.get(placement, 0.0 if placement == START else -2.0)
            acc = truth + rng.normal(0, seed_sd)
            score = np.sqrt(rho) * difficulty + np.sqrt(1 - rho) * rng.standard_normal(examples)
            correct = np.stack([score < norm.ppf((acc - 5) / 100), score < norm.ppf(acc / 100)])
            key = candidate_key(Placement.parse(placement), config, config.recipe, seed)  # as `alternas table` keys
            result = CandidateResult(key, placement, placement.count("M"), seed, "tiny", 2, None, "completed",
                                     epochs_trained=2, wall_time=1.0)
            table.add(result, correct)
    return table


def test_a_table_round_trips_through_its_files(tmp_path) -> None:
    table = hand_made_table({HELPS: 3.0}, seeds=3, examples=77)
    table.add(CandidateResult("d", START, 0, 3, "tiny", 2, None, "diverged", epochs_trained=1), np.zeros((0, 0)))
    table.seeds = [0, 1, 2, 3]
    table.save(tmp_path)
    back = Table.load(tmp_path)
    assert back.seeds == [0, 1, 2, 3] and back.placements == table.placements and back.n_examples == 77
    assert back.runs == table.runs and back.status(START, 3) == "diverged" and not back.complete
    for run, correct in table.correct.items():
        assert np.array_equal(back.correct[run], correct)
    assert back.accuracy(START, [3]) == 0.0  # a diverged run left no model
    assert list(back.rows.columns[:4]) == ["placement", "seed", "epoch", "val_acc"]
    (tmp_path / "evidence.npz").write_bytes(b"garbage")
    with pytest.raises(Exception, match="the table is damaged"):
        Table.load(tmp_path)


def test_the_build_up_replayed_on_a_table_with_a_helping_msa_finds_it_and_an_always_no_rule_does_not() -> None:
    table = hand_made_table({HELPS: 3.0})
    config = study_from_dict(_study())
    rows = {r["strategy"]: r for r in replay_search(table, config, pools=20)}
    assert set(rows) == {"buildup", "tpe", "random", "qmc", "decision-rule"}
    assert all(set(FIELDS) <= set(r) for r in rows.values())
    buildup = rows["buildup"]
    assert buildup["p_best"]["mean"] >= 0.9 and buildup["regret_pp"]["mean"] < 0.3
    assert buildup["regret_pp"]["cross_fit"]["mean"] < 0.3 and buildup["regret_pp"]["cross_fit"]["n"] == 20
    assert buildup["false_reject"]["mean"] <= 0.1 and buildup["false_accept"]["mean"] <= 0.15
    assert buildup["candidate_epochs"]["mean"] > 0
    for sampler in ("tpe", "random", "qmc"):  # paired budgets: never more than the build-up bought
        assert rows[sampler]["candidate_epochs"]["mean"] <= buildup["candidate_epochs"]["mean"] + 1e-9
    rule = rows["decision-rule"]
    assert rule["false_accept"]["mean"] <= 0.12 and rule["false_accept"]["n"] > 1000
    assert 1 - rule["false_reject"]["mean"] >= 0.6  # power: true gains of 1-5 pp, against min_gain 0.5
    never = {r["strategy"]: r for r in replay_search(table, study_from_dict(_study(min_gain=50.0)), ("buildup",),
                                                      pools=10)}["buildup"]
    assert never["p_best"]["mean"] == 0.0 and never["false_reject"] is None  # no true gain exceeds 50 pp
    assert never["false_accept"]["mean"] == 0.0  # ... and it agrees with itself: stable, and wrong


def test_each_comparison_borrows_the_seed_variance_of_the_study_s_earlier_ones() -> None:
    """The first comparison has nothing to borrow; every later look says how many df it borrowed (the earlier
    comparisons' seeds minus one each); switched off, none does."""
    from alternas.search.planner import replay_buildup
    from alternas.search.replay import table_lookup

    table = hand_made_table({HELPS: 3.0}, seed_sd=1.0)
    for pooled in (True, False):
        config = study_from_dict(_study(pool_seed_variance=pooled))
        lines: list[str] = []
        replay = replay_buildup(config, table_lookup(table, config),
                                say=lambda key, line, out=lines: out.append(line))
        steps = replay.policy.steps
        assert replay.stopped_by == "finished" and len(steps) >= 4
        looks = [line for line in lines if "P(gain >" in line]
        first = [line for line in looks if "pooled" not in line]
        if not pooled:
            assert first == looks and all(s.borrowed_seed_variance is None for s in steps)
            continue
        assert looks[: len(first)] == first and len(first) < len(looks)  # only the first comparison decides alone
        used = [len(s.seeds_used) - 1 for s in steps[1:]]
        for earlier in range(1, len(used)):  # the (earlier + 1)-th comparison borrowed the df of those before it
            assert any(f"pooled with {sum(used[:earlier])} df" in line for line in looks), (used, looks)
        # and the trajectory records it: [variance, df] per decided step, none for the start and the first child
        assert steps[0].borrowed_seed_variance is None and steps[1].borrowed_seed_variance is None
        for step, earlier in zip(steps[2:], range(1, len(used))):
            variance, df = step.borrowed_seed_variance
            assert df == min(sum(used[:earlier]), 6) and variance >= 0, (step, used)


@pytest.mark.parametrize(("spending", "levels"), [("power", ["0.97", "0.93"]), ("equal", ["0.95", "0.95"])])
def test_the_study_s_accept_spending_decides_each_look_of_its_races(spending: str, levels: list[str]) -> None:
    """Every race of the build-up (2 -> 3 seeds) accepts at its look's level under the study's spending: a look at two
    seeds that adds a seed prints the first level, and the looks at the third seed the second."""
    from alternas.search.planner import replay_buildup
    from alternas.search.replay import table_lookup

    table = hand_made_table({HELPS: 1.0}, seed_sd=1.0)
    config = study_from_dict(_study(accept_spending=spending))
    lines: list[str] = []
    replay_buildup(config, table_lookup(table, config), say=lambda key, line: lines.append(line))
    looks = [line for line in lines if "P(gain >" in line]
    firsts = [line for line in looks if "adding seed 2" in line]
    assert firsts and all(f"accept >= {levels[0]}," in line for line in firsts), looks
    assert any(f"accept >= {levels[1]}," in line for line in looks if line not in firsts), looks


def test_an_incomplete_table_is_refused_and_pools_are_distinct() -> None:
    from alternas.search.replay import seed_pools

    table = hand_made_table({}, seeds=5)
    table.seeds = [0, 1, 2, 3, 4, 5]  # seed 5 was asked for but never trained
    with pytest.raises(Exception, match="the table lacks 16 of its runs"):
        replay_search(table, study_from_dict(_study()), ("buildup",), pools=2)
    every = seed_pools(list(range(5)), 3, 1000)
    assert len(every) == 60 == len({tuple(p) for p in every})  # 5 * 4 * 3 ordered pools, each once
    some = seed_pools(list(range(8)), 3, 50, seed=1)
    assert len({tuple(p) for p in some}) == 50 and some == seed_pools(list(range(8)), 3, 50, seed=1)


def test_without_a_helping_msa_the_replay_measures_false_accepts_on_the_null() -> None:
    rows = {r["strategy"]: r for r in replay_search(hand_made_table({}), study_from_dict(_study(min_gain=0.0)),
                                                     ("buildup", "decision-rule"), pools=12)}
    assert rows["buildup"]["p_best"]["mean"] >= 0.8  # the start is the true best: keep it
    assert rows["decision-rule"]["false_accept"]["mean"] <= 0.12


def test_bench_search_command_prints_json_rows(tmp_path) -> None:
    table = hand_made_table({HELPS: 3.0})
    table.save(tmp_path / "t")
    (tmp_path / "t" / "study.yaml").write_text(yaml.safe_dump(_study()))
    res = run_cli("bench", "search", "--table", str(tmp_path / "t"), "--pools", "4", "--strategies",
                  "buildup,random", "--set", "buildup.screen_at=0.5", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["strategy"] for r in rows] == ["buildup", "random"]
    assert all(set(r) == {"strategy", *FIELDS} for r in rows)
    assert all(set(r["regret_pp"]) == {"mean", "ci", "n", "cross_fit"} for r in rows)
    bad = run_cli("bench", "search", "--table", str(tmp_path / "t"), "--pool-size", "8")
    assert bad.returncode == 2 and "leaves fewer than 2 to judge by" in bad.stderr and "Traceback" not in bad.stderr
    other = run_cli("bench", "search", "--table", str(tmp_path / "t"), "--set", "recipe.lr=0.1", "--pools", "2")
    assert other.returncode == 2 and "only buildup.* settings can be replayed" in other.stderr
    missing = run_cli("bench", "search")
    assert missing.returncode == 2 and "needs --table" in missing.stderr


def test_a_pool_s_answers_are_graded_by_the_table_s_seeds_outside_the_pool() -> None:
    table = hand_made_table({HELPS: 3.0})
    start = Step(1, START, None, None, 0, 85.0, 0.3, None, "start", START)
    c4 = Step(2, HELPS, START, 4, 1, 88.0, 0.3, 3.0, "accept", HELPS, incumbent=START)
    c3 = Step(3, "CC,CC,CM,CM", HELPS, 3, 2, 86.0, 0.3, -2.0, "reject", HELPS, incumbent=HELPS)  # truly -5 pp
    graded = graded_by_table(table, (0, 1, 2), [start, c4, c3], HELPS, 0.5)
    assert graded["judged_by"] == [3, 4, 5, 6, 7] and graded["held_out_best"] == HELPS
    assert graded["regret_pp"] == 0.0 and graded["within_min_gain"] and graded["not_confidently_worse"]
    assert graded["regret_cross_fit_pp"] == 0.0 and graded["cross_fit_within_min_gain"]  # c4 leads on every seed
    assert (graded["accepted_helping"], graded["helping"], graded["false_accepts"], graded["null_decisions"],
            graded["ungraded"]) == (1, 1, 0, 1, 0)
    # the helping MSA rejected: the final stays at the start, ~3 pp and confidently more than min_gain below
    stayed = graded_by_table(table, (5, 6, 7), [start, replace(c4, decision="reject", best_after=START)], START, 0.5)
    truth = Truth(table, [5, 6, 7])
    low, high = stayed["regret_ci"]
    assert stayed["judged_by"] == [0, 1, 2, 3, 4]
    assert stayed["regret_pp"] == pytest.approx(truth.acc[HELPS] - truth.acc[START]) and 2 < stayed["regret_pp"] < 4
    assert 0.5 < low < stayed["regret_pp"] < high
    assert not stayed["within_min_gain"] and not stayed["not_confidently_worse"]
    assert stayed["regret_cross_fit_pp"] == pytest.approx(stayed["regret_pp"], abs=0.5)  # no tie to be lucky in
    assert not stayed["cross_fit_within_min_gain"]
    assert (stayed["accepted_helping"], stayed["helping"]) == (0, 1)
    # a c3 child accepted against the truth: a false accept
    wrong = graded_by_table(table, (0, 1, 2), [start, c4, replace(c3, decision="accept", best_after=c3.placement)],
                            c3.placement, 0.5)
    assert (wrong["false_accepts"], wrong["null_decisions"]) == (1, 1) and wrong["regret_ci"][0] > 0.5
    with pytest.raises(ConfigError, match="the table has no placement CM,CM,CM,CM,CM"):
        graded_by_table(table, (0, 1, 2), [start], "CM,CM,CM,CM,CM", 0.5)
    table.placements.remove("CM,CM,CM,CM")  # refused before a pool trains: the build-up may end there
    with pytest.raises(ConfigError, match="the table lacks 1 of the placements the build-up can reach"):
        _gradable(table, study_from_dict(_study()), [(0, 1, 2)])


def test_the_cross_fitted_regret_has_no_winner_s_curse_where_the_plain_one_does() -> None:
    """Known truth: 8 placements that truly tie, 5 seeds of noise (SD 2 pp). The plain regret of a fixed one (best
    picked and measured on the same seeds) is about 1.42 standard errors above 0 on average, the expected maximum of
    8 normal means; the cross-fitted regret (picked on half, measured on the other half) is 0 on average. Where one
    placement is better on every seed, both give its exact gap."""
    rng = np.random.default_rng(0)
    plain, crossed = [], []
    for _ in range(1000):
        acc = 85.0 + rng.normal(0, 2.0, (8, 5))
        means = acc.mean(axis=1)
        plain.append(means.max() - means[0])
        crossed.append(cross_fit_regret(acc, 0))
    se = 2.0 / np.sqrt(5)
    assert np.mean(plain) == pytest.approx(1.42 * se, abs=0.15)
    assert abs(np.mean(crossed)) < 0.1 and np.std(crossed) / np.sqrt(1000) < 0.05
    clear = np.array([[90.0, 91.0, 89.0, 90.0], [87.0, 88.0, 86.0, 87.0], [80.0, 81.0, 85.0, 79.0]])
    assert cross_fit_regret(clear, 1) == pytest.approx(3.0) and cross_fit_regret(clear, 0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        cross_fit_regret(clear[:, :1], 0)
    with pytest.raises(ConfigError, match="the table has no placement CM,CM,CM,CM,CM"):
        Truth(hand_made_table({HELPS: 3.0}, seeds=4), [0]).cross_fit_regret("CM,CM,CM,CM,CM")
    wide = 85.0 + rng.normal(0, 2.0, (8, 12))  # 924 splits: 256 drawn (seeded), near the mean over all of them
    assert cross_fit_regret(wide, 2) == cross_fit_regret(wide, 2)
    assert cross_fit_regret(wide, 2) == pytest.approx(cross_fit_regret(wide, 2, max_splits=1000), abs=0.2)
    tied = np.array([[90.0, 90.0, 80.0, 80.0], [90.0, 90.0, 100.0, 100.0], [85.0, 85.0, 85.0, 85.0]])
    # seeds 0-1 tie the first two rows, whose other seeds differ by 20 pp: they share the pick, whatever their order
    assert cross_fit_regret(tied, 2) == cross_fit_regret(tied[[1, 0, 2]], 2) == pytest.approx((5 + 5 + 4 * 10) / 6)


def test_a_final_tied_with_the_held_out_best_is_the_best_whatever_the_row_order() -> None:
    """Two placements with the same held-out accuracy on every seed are both the true best: p_best 1 for either
    (before, the first in the table's order won the tie and the other scored 0), regret 0."""
    from alternas.search.replay import Outcome

    table = hand_made_table({HELPS: 3.0}, seeds=4)
    twin = next(p for p in table.placements if p not in (HELPS, START))
    for seed in table.seeds:  # the twin's runs answer exactly as the helping MSA's
        table.correct[(twin, seed)] = table.correct[(HELPS, seed)].copy()
    truth = Truth(table, [0])
    for final in (HELPS, twin):
        scored = truth.score(Outcome(final))
        assert scored.p_best == 1.0 and scored.regret_pp == 0.0, final
    assert truth.score(Outcome(START)).p_best == 0.0 and truth.tied_best == {HELPS, twin}


def test_bench_decisions_grades_each_pool_of_real_runs_against_a_table(tmp_path) -> None:
    raw = small_study(tmp_path, seeds=[0, 1], recipe={"epochs": 2},
                      diagnostics={"hessian": False, "fourier": False},
                      buildup={"min_gain": 0.5, "max_candidates": 2, "min_seeds": 2, "max_seeds": 2})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw))
    table = hand_made_table({HELPS: 3.0}, seeds=6, config=study_from_dict(raw))
    table.save(tmp_path / "t")
    res = run_cli("bench", "decisions", "--study", str(study), "--pools", "2", "--table", str(tmp_path / "t"),
                  "--out", str(tmp_path / "pools"), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for pool, run in zip(([0, 1], [2, 3]), out["runs"], strict=True):
        graded = run["graded"]
        assert run["seeds"] == pool and graded["judged_by"] == [s for s in range(6) if s not in pool]
        accepted = [placement for placement, decision, _ in run["steps"] if decision == "accept"]
        assert graded["helping"] == 1 and graded["accepted_helping"] == int(HELPS in accepted)
        truth = Truth(table, pool)
        assert graded["regret_pp"] == pytest.approx(truth.acc[HELPS] - truth.acc[run["best"]])
        assert graded["regret_ci"][0] <= graded["regret_pp"] <= graded["regret_ci"][1]
    totals = out["graded"]
    assert totals["table_dir"] == str(tmp_path / "t") and totals["helping"] == 2
    assert totals["pools_within_min_gain"] == sum(r["best"] == HELPS for r in out["runs"])
    cross_fitted = [Truth(table, pool).cross_fit_regret(run["best"])
                    for pool, run in zip(([0, 1], [2, 3]), out["runs"], strict=True)]
    assert [run["graded"]["regret_cross_fit_pp"] for run in out["runs"]] == pytest.approx(cross_fitted)
    assert totals["pools_cross_fit_within_min_gain"] == sum(r <= 0.5 for r in cross_fitted)
    again = run_cli("bench", "decisions", "--study", str(study), "--pools", "2", "--table", str(tmp_path / "t"),
                    "--out", str(tmp_path / "pools"))  # every run cached: only the grading is new
    assert again.returncode == 0 and "judged by the table's seeds 2,3,4,5: regret" in again.stdout
    assert f"final within min_gain of the held-out best in {totals['pools_within_min_gain']} pools" in again.stdout

    def refused(table_dir: Path, *args: str) -> str:
        res = run_cli("bench", "decisions", "--study", str(study), "--table", str(table_dir),
                      "--out", str(tmp_path / "other"), *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr and not (tmp_path / "other").exists()
        return res.stderr  # refused before anything trained

    assert "only buildup.* settings can be replayed" in refused(tmp_path / "t", "--set", "recipe.lr=0.1")
    hand_made_table({HELPS: 3.0}, seeds=3, config=study_from_dict(raw)).save(tmp_path / "three")
    assert "pool 0 (seeds 0-1) leaves fewer than 2 of the table's seeds [0, 1, 2]" in refused(tmp_path / "three")
    table.seeds = [0, 1, 2, 3, 4, 5, 6]
    table.save(tmp_path / "t")
    assert "the table lacks 16 of its runs" in refused(tmp_path / "t")


def test_table_command_trains_each_run_once_resumes_and_reuses_the_cache(tmp_path) -> None:
    """Real training: 2 placements (a space file) x 2 seeds. A build-up in the same study folder first: the table
    reuses its runs; a second call trains nothing; the table folder alone (runs deleted) resumes too."""
    raw = small_study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False, "fourier": False},
                      buildup={"max_candidates": 1, "min_gain": 0.5})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"base": "tiny", "stages": [
        {"depth": [2], "msa": "none"}, {"depth": [2], "msa": "none"}, {"depth": [2], "msa": "none"},
        {"depth": [2], "msa": "count"}]}))
    assert [str(p) for p in table_placements(study_from_dict(raw), None)][:2] == [START, "CC,CC,CC,CM"]
    assert run_cli("buildup", "--study", str(tmp_path / "study.yaml"), "--quiet").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "candidates").glob("*/metrics.json")}
    assert len(before) == 2  # the start with seeds 0 and 1

    args = ("table", "--study", str(tmp_path / "study.yaml"), "--space", str(tmp_path / "space.yaml"), "--out",
            str(tmp_path / "table"), "--quiet")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "4 of 4 runs" in first.stdout and "(complete)" in first.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the build-up's runs were reused, not retrained
    table = Table.load(tmp_path / "table")
    assert table.placements == [START, "CC,CC,CC,CM"] and table.seeds == [0, 1] and table.complete
    assert len(table.rows) == 4 and set(table.rows.epoch) == {1}  # 1 epoch each
    rows = table.rows.set_index(["placement", "seed"])
    results = {(r.placement, r.seed): r.val_acc for r in _results(tmp_path / "study")}
    for (placement, seed), acc in results.items():
        assert rows.loc[(placement, seed), "val_acc"] == pytest.approx(acc, abs=1e-3)
    assert (tmp_path / "table" / "study.yaml").is_file()

    again = run_cli(*args)
    assert again.returncode == 0 and "4 already in" in again.stdout
    shutil.rmtree(tmp_path / "study")  # the runs are gone: the table folder alone still answers
    alone = run_cli(*args, "--seeds", "0-1")
    assert alone.returncode == 0 and "4 already in" in alone.stdout, alone.stderr


def _results(study: Path) -> list[CandidateResult]:
    return [CandidateResult.from_dict(json.loads(p.read_text())) for p in study.glob("candidates/*/result.json")]


SHIPPED = Path(__file__).resolve().parents[1] / "studies"


def _shipped_replays(name: str, study: Path, pools: int) -> tuple[Table, Truth, list[Outcome]]:
    """A shipped table (checked complete: every placement x >= 8 seeds), its truth over every seed, and the build-up
    of ``study`` replayed on ``pools`` random 3-seed pools of it, each graded on its held-out seeds."""
    from alternas.search import load_study
    from alternas.search.replay import replay_buildup_on, seed_pools, table_lookup

    table = Table.load(SHIPPED / "tables" / name)
    assert table.complete and len(table.seeds) >= 8 and len(table.placements) == 16
    config = load_study(study)
    lookup = table_lookup(table, config)
    outcomes = [replay_buildup_on(table, replace(config, seeds=tuple(pool)), Truth(table, pool), lookup)
                for pool in seed_pools(table.seeds, 3, pools)]
    return table, Truth(table, []), outcomes


def _null_accepts(table: Table, config: StudyConfig, every_seed: Truth, pools: int) -> list[bool]:
    """Whether each replayed decision (``pools`` random 3-seed pools) whose child's true gain over its incumbent (all
    the table's seeds) is at most min_gain was accepted."""
    from alternas.search.planner import replay_buildup
    from alternas.search.replay import seed_pools, table_lookup

    lookup = table_lookup(table, config)
    decisions = [(step.placement, step.incumbent, step.decision) for pool in seed_pools(table.seeds, 3, pools)
                 for step in replay_buildup(replace(config, seeds=tuple(pool)), lookup).policy.steps
                 if step.incumbent is not None]
    return [accepted == "accept" for child, parent, accepted in decisions
            if every_seed.gain(child, parent)[0] <= config.buildup.min_gain]


def _brightest_families(name: str, study: Path, pools: int = 40) -> tuple[Table, Truth, list[Outcome], float]:
    """A shipped `brightest` table and its build-up replayed on ``pools`` 3-seed pools, checked for what every
    `brightest` table says: the MSA at the end of the last stage truly helps by far more than min_gain, one at the end
    of stage 3 alone truly hurts, no placement without c4 helps; and for what its build-up does: c4 accepted (then
    kept) in every pool, children whose true gain is below min_gain accepted at most at the calibrated rate."""
    from alternas.search import load_study

    table, every_seed, outcomes = _shipped_replays(name, study, pools)
    config = load_study(study)
    min_gain = config.buildup.min_gain
    assert every_seed.gain_is(HELPS, START, min_gain) == "above"
    assert every_seed.gain(C3, START)[2] < 0  # c3 alone: its 90 % interval lies below 0
    gains = {p: every_seed.acc[p] - every_seed.acc[START] for p in table.placements}
    assert max(g for p, g in gains.items() if not p.endswith("M")) < 0.5, gains
    assert all(o.final.endswith("M") for o in outcomes), [o.final for o in outcomes]  # c4 accepted, then kept
    null = _null_accepts(table, config, every_seed, pools)
    assert len(null) >= 40 and sum(null) <= 0.1 * len(null), (sum(null), len(null))
    return table, every_seed, outcomes, min_gain


def test_the_8_epoch_brightest_table_holds_a_second_gain_its_build_up_mostly_misses() -> None:
    """The shipped 8+1-epoch table of the `brightest` probe (every placement x 16 seeds) holds the two families of
    ``_brightest_families``, and c1 on top of c4 truly helps by another ~1.4 pp (the best placement; at 12+1 epochs
    that gain is gone: c1 sped c4 up). Its own study's build-up (the quickstart's min_gain, confidence and 2->3 seed
    race), replayed on 3-seed pools, finds the second gain in some pools but misses it in most: its plain regret
    exceeds min_gain (docs/concepts/ground-truth.md)."""
    study = SHIPPED / "tables" / "brightest" / "study.yaml"
    _, every_seed, outcomes, min_gain = _brightest_families("brightest", study)
    assert every_seed.best == "CM,CC,CC,CM" and every_seed.gain_is("CM,CC,CC,CM", HELPS, min_gain) == "above"
    assert 0 < sum(o.p_best for o in outcomes) < len(outcomes) / 2  # c1 on top of c4: found in some pools, not most
    assert sum(o.rejects_true for o in outcomes) > 0
    regret = np.mean([o.regret_pp for o in outcomes])
    assert min_gain < regret and np.mean([o.regret_cross_fit_pp for o in outcomes]) < regret


def test_the_quickstart_table_holds_a_helping_msa_and_the_quickstart_accepts_it() -> None:
    """The shipped table of the quickstart's probe (`brightest` at 12+1 epochs, every placement x 32 seeds) holds the
    two families of ``_brightest_families``, and no MSA added on top of c4 is confidently above min_gain. The
    quickstart's own build-up (same data, recipe and decision settings; test_buildup.py checks their cache keys
    agree), replayed on 3-seed pools, ends within min_gain of the best picked on other held-out seeds in nearly every
    pool (docs/concepts/ground-truth.md)."""
    table, every_seed, outcomes, min_gain = _brightest_families("brightest-12ep", SHIPPED / "quickstart.yaml")
    on_c4 = [p for p in table.placements if p.endswith("M") and p != HELPS]
    assert len(on_c4) == 7 and not any(every_seed.gain_is(p, HELPS, min_gain) == "above" for p in on_c4)
    regret = np.mean([o.regret_pp for o in outcomes])
    cross_fit = [o.regret_cross_fit_pp for o in outcomes]
    assert np.mean(cross_fit) < regret < 2 * min_gain  # staying at the start would cost ~20 pp
    assert np.mean(np.array(cross_fit) <= min_gain) >= 0.9, cross_fit


def test_the_cued_shapes_table_holds_a_helping_msa_that_its_build_up_accepts_only_sometimes() -> None:
    """The shipped cued-shapes table (every placement x 8 seeds) says some MSA truly helps by more than min_gain and
    some does not; its own build-up, replayed on 3-seed pools of the table, accepts a helping MSA in some pools and
    never accepts a child the held-out seeds call no better: calibrated, but the gain (+3.7 pp) is too small against
    its seed noise (SD 2.7 pp) for 2-3 seeds to say yes often (docs/concepts/ground-truth.md)."""
    from alternas.search import load_study

    study = SHIPPED / "tables" / "cued-shapes" / "study.yaml"
    table, every_seed, outcomes = _shipped_replays("cued-shapes", study, 40)
    min_gain = load_study(study).buildup.min_gain
    assert every_seed.gain_is(HELPS, START, min_gain) == "above"  # c4: its 90 % interval lies above min_gain
    gains = {p: every_seed.acc[p] - every_seed.acc[START] for p in table.placements}
    assert min(gains.values()) < min_gain, gains  # ... and some MSAs bring less (c3, c2: about 0)
    finals = [o.final for o in outcomes]
    false_accepts = sum(o.accepts_null for o in outcomes)
    accepted = sum(final != START for final in finals) / len(finals)
    assert 0.2 <= accepted < 0.8, finals  # it can say yes where the truth says yes, but not reliably ...
    assert false_accepts == 0  # ... and says it only there


def test_the_fashion_mnist_table_says_no_msa_helps_and_the_build_up_never_accepts_one() -> None:
    """Real data: the shipped Fashion-MNIST table (every placement x 8 seeds) puts no MSA above the start by
    min_gain, and its own build-up (default decision rule, 2->3 race), replayed on 3-seed pools, accepts no MSA the
    held-out seeds call no better, while keeping within half a point of the true best."""
    from alternas.search import load_study

    study = SHIPPED / "tables" / "fashion-mnist" / "study.yaml"
    table, every_seed, outcomes = _shipped_replays("fashion-mnist", study, 30)
    config = load_study(study)
    assert not config.buildup.pool_seed_variance and config.seed_budget == (2, 3)
    assert all(every_seed.gain_is(p, START, config.buildup.min_gain) != "above" for p in table.placements if p != START)
    assert sum(o.accepts_null for o in outcomes) == 0 and sum(o.decisions_null for o in outcomes) > 0
    assert np.mean([o.regret_pp for o in outcomes]) < 0.5
