"""The paired comparison behind every build-up decision: its arithmetic, its calibration (by simulation) and the
per-example evidence files it reads."""

import hashlib
from typing import get_args

import numpy as np
import pytest
import torch

from alternas.data.datasets import DataConfig, ImageData, load_data
from alternas.search.decision import (
    BORROWED_DF_CAP,
    SPENDINGS,
    SeedVariance,
    accept_level,
    compare_paired,
    gain_variance,
    seed_component,
    sequential_compare,
)
from alternas.search.study import Spending
from alternas.train import fit, get_recipe
from alternas.train.evidence import Evidence, load_evidence
from alternas.train.run import model_for


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def simulate_pair(rng: np.random.Generator, shift: float, seed_sd: float, n_examples: int = 400,
                  n_seeds: int = 5, example_sd: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """0/1 correctness of a child and a parent on one freshly drawn validation set, seed by seed.

    Logit of a correct answer = example difficulty + the seed's effect shared by both models + each model's own
    seed effect + how the example reacts to each model (+ ``shift`` for the child). With ``shift = 0`` the two
    models are exchangeable, so the true gain is exactly zero."""
    difficulty = rng.normal(1.8, 1.5, n_examples)
    react_child, react_parent = rng.normal(0, example_sd, (2, n_examples))
    child, parent = [], []
    for _ in range(n_seeds):
        shared = rng.normal(0, seed_sd)
        own_child, own_parent = rng.normal(0, seed_sd, 2)
        child.append(rng.random(n_examples) < _sigmoid(difficulty + shift + shared + own_child + react_child))
        parent.append(rng.random(n_examples) < _sigmoid(difficulty + shared + own_parent + react_parent))
    return np.array(child), np.array(parent)


def true_gain(shift: float, example_sd: float = 0.6) -> float:
    """The population gain (pp) of ``simulate_pair``'s child, by Monte Carlo over examples."""
    rng = np.random.default_rng(123)
    difficulty = rng.normal(1.8, 1.5, 400_000)
    child = _sigmoid(difficulty + shift + rng.normal(0, example_sd, difficulty.size)).mean()
    parent = _sigmoid(difficulty + rng.normal(0, example_sd, difficulty.size)).mean()
    return float(child - parent) * 100


def test_gain_interval_and_probability_follow_the_evidence() -> None:
    rng = np.random.default_rng(0)
    parent = rng.random((3, 500)) < 0.7
    better = parent | (rng.random((3, 500)) < 0.3)  # fixes 30% of the errors, breaks nothing
    c = compare_paired(better, parent, min_gain=0.5, confidence=0.9)
    assert c.gain == pytest.approx((better.mean() - parent.mean()) * 100)
    assert c.ci[0] < c.gain < c.ci[1] and c.ci[0] > 0.5
    assert c.p_gain > 0.99 and c.decision == "accept"
    assert len(c.seed_gains) == 3 and c.n_seeds == 3 and c.n_examples == 500
    worse = compare_paired(parent, better, min_gain=0.5)
    assert worse.gain == pytest.approx(-c.gain) and worse.decision == "reject" and worse.p_gain < 0.01
    same = compare_paired(parent, parent)
    assert same.gain == 0 and same.p_gain == 0.5 and same.decision == "undecided"
    with pytest.raises(ValueError, match="one shape"):
        compare_paired(parent[:2], parent)
    with pytest.raises(ValueError, match="confidence"):
        compare_paired(parent, parent, confidence=1.2)


def test_a_single_seed_counts_example_level_noise_only() -> None:
    rng = np.random.default_rng(1)
    parent = rng.random(400) < 0.8
    child = np.where(rng.random(400) < 0.1, ~parent, parent)
    c = compare_paired(child[None], parent[None])
    diff = (child.astype(float) - parent) * 100
    assert c.se == pytest.approx(diff.std(ddof=1) / np.sqrt(400))  # the paired (McNemar-like) standard error
    assert c.df == 399


def test_seed_noise_widens_the_interval_and_examples_set_its_floor() -> None:
    rng = np.random.default_rng(2)
    n = 400
    # example-level differences with a real gain: +100 where the child fixed an error, -100 where it made one
    d = np.where(rng.random(n) < 0.15, 100.0, np.where(rng.random(n) < 0.08, -100.0, 0.0))
    var_agree, df_agree = gain_variance(np.vstack([d, d]))  # two seeds with the very same differences
    assert var_agree > 0 and var_agree == pytest.approx(d.var(ddof=1) / n)  # the examples' floor, nothing more
    assert df_agree == pytest.approx(n - 1)
    # the same differences, but the seeds disagree about the gain (one +8 pp better, the other 8 pp worse)
    shift = np.zeros(n)
    shift[rng.choice(n, 32, replace=False)] = 100.0
    var_split, df_split = gain_variance(np.vstack([d + shift, d - shift]))
    assert var_split > 3 * var_agree and df_split < 5  # the seed term dominates: about one degree of freedom


@pytest.mark.parametrize("spending", SPENDINGS)
@pytest.mark.parametrize("seed_sd", [0.1, 0.3])
def test_calibration_no_true_difference_false_accepts_stay_within_the_confidence(seed_sd: float,
                                                                                 spending: str) -> None:
    """With exchangeable child and parent (true gain 0 = min_gain, the hardest case), the sequential race from 2 to
    5 seeds at confidence 0.9 accepts at most 10% + 2 pp of the time, however its looks share that rate; so does a
    single look at 2 seeds."""
    rng = np.random.default_rng(10)
    sims, sequential_accepts, single_accepts = 1500, 0, 0
    for _ in range(sims):
        child, parent = simulate_pair(rng, 0.0, seed_sd)
        single_accepts += compare_paired(child[:2], parent[:2], 0.0, 0.9).decision == "accept"
        outcome = sequential_compare(lambda k, c=child, p=parent: (c[:k], p[:k]), min_seeds=2, max_seeds=5,
                                     min_gain=0.0, confidence=0.9, spending=spending)
        sequential_accepts += outcome.decision == "accept"
    assert sequential_accepts / sims <= 0.12
    assert single_accepts / sims <= 0.12


@pytest.mark.parametrize(("low", "high"), [(2, 3), (2, 5), (1, 4), (3, 3), (4, 5)])
def test_the_looks_of_a_race_share_exactly_its_false_accept_rate(low: int, high: int) -> None:
    """A union bound: the looks' shares of 1 - confidence sum to it under either spending, so the race's false-accept
    rate stays within it whatever the looks' correlation. "power" shares it by the seeds seen: where the first look
    has few of them, it keeps little and later looks accept more easily than the even split's."""
    for spending in SPENDINGS:
        shares = [1 - accept_level(k, low, high, 0.9, spending) for k in range(low, high + 1)]
        assert sum(shares) == pytest.approx(0.1) and all(share > 0 for share in shares)
    levels = [accept_level(k, low, high, 0.9) for k in range(low, high + 1)]
    if low == high:
        assert levels == [accept_level(low, low, high, 0.9, "equal")] == [0.9]  # a single look: the confidence
    elif low <= high / 2 + 1:
        assert levels[-1] < accept_level(high, low, high, 0.9, "equal")
        assert levels == sorted(levels, reverse=True)  # later looks accept more easily
    else:  # the first look already has most of the seeds (4 of 5): its share is about the last one's
        assert levels[0] == pytest.approx(levels[-1], abs=0.005)
    assert accept_level(3, 2, 3, 0.9) == pytest.approx(1 - 0.1 * (1 - (2 / 3) ** 3))
    with pytest.raises(ValueError, match="spending"):
        accept_level(2, 2, 3, 0.9, "late")
    with pytest.raises(ValueError, match="no look at 4"):
        accept_level(4, 2, 3, 0.9)
    with pytest.raises(ValueError, match="no look at 0"):
        accept_level(0, 0, 3, 0.9)
    with pytest.raises(ValueError, match="accept_at"):  # a look never accepts more easily than a single one
        compare_paired(np.ones((2, 10)), np.zeros((2, 10)), 0.5, 0.9, accept_at=0.85)
    assert get_args(Spending) == SPENDINGS  # the study file's choices are the rule's


def test_spending_the_false_accept_rate_late_accepts_true_gains_the_equal_split_rejects() -> None:
    """Why "power" is the default: from 2 to 3 seeds, a first look whose t has one degree of freedom almost never
    accepts, so the equal split wastes half the rate there; spent late, the same race accepts a real gain more often
    (and the null rate stays within the confidence: the calibration test above)."""
    rng = np.random.default_rng(32)
    sims, accepted = 400, {spending: 0 for spending in SPENDINGS}
    for _ in range(sims):
        child, parent = simulate_pair(rng, 0.6, 0.3)
        for spending in SPENDINGS:
            outcome = sequential_compare(lambda k, c=child, p=parent: (c[:k], p[:k]), min_seeds=2, max_seeds=3,
                                         min_gain=0.5, confidence=0.9, spending=spending)
            accepted[spending] += outcome.decision == "accept"
    assert accepted["power"] >= accepted["equal"] + 0.03 * sims, accepted


def test_calibration_without_the_look_correction_the_race_would_over_accept() -> None:
    """Why the looks share the rate (``accept_level``): four uncorrected looks at the same null comparison accept far
    more than 10%."""
    rng = np.random.default_rng(11)
    sims, accepts = 1000, 0
    for _ in range(sims):
        child, parent = simulate_pair(rng, 0.0, 0.3)
        for k in range(2, 6):
            decision = compare_paired(child[:k], parent[:k], 0.0, 0.9).decision
            if decision != "undecided":
                accepts += decision == "accept"
                break
    assert accepts / sims > 0.14


@pytest.mark.parametrize("seed_sd", [0.0, 0.1, 0.3])
def test_calibration_a_gain_of_three_seed_sds_is_accepted_within_the_seed_budget(seed_sd: float) -> None:
    rng = np.random.default_rng(20)
    # per-seed SD of a model's observed validation accuracy (what `mean ± sd over seeds` shows a user)
    sd = np.sqrt(np.mean([simulate_pair(rng, 0.0, seed_sd)[1].mean(1).var(ddof=1) for _ in range(300)])) * 100
    low, high = 0.0, 4.0
    for _ in range(18):  # the shift whose true gain is three per-seed SDs
        mid = (low + high) / 2
        low, high = (mid, high) if true_gain(mid) < 3 * sd else (low, mid)
    assert true_gain(high) == pytest.approx(3 * sd, rel=0.01)
    sims, accepts, seeds = 1000, 0, []
    for _ in range(sims):
        child, parent = simulate_pair(rng, high, seed_sd)
        outcome = sequential_compare(lambda k, c=child, p=parent: (c[:k], p[:k]), min_seeds=2, max_seeds=5,
                                     spending="power", min_gain=0.5, confidence=0.9)
        accepts += outcome.decision == "accept"
        seeds.append(outcome.seeds_used)
    assert accepts / sims >= 0.8
    assert 2 <= np.mean(seeds) < 5  # racing stops early when the evidence is clear


def test_a_borrowed_seed_component_is_averaged_in_by_degrees_of_freedom() -> None:
    rng = np.random.default_rng(5)
    child, parent = simulate_pair(rng, 0.3, 0.6, n_seeds=3)
    diff = (child.astype(float) - parent) * 100
    own = seed_component(diff)
    assert own.df == 2.0 and own.variance > 0
    alone, df_alone = gain_variance(diff)
    agreeing, df_agreeing = gain_variance(diff, SeedVariance(own.variance, 6.0))
    assert agreeing == pytest.approx(alone) and df_agreeing > df_alone  # same variance, known far better
    larger, _ = gain_variance(diff, SeedVariance(4 * own.variance, 6.0))
    assert larger > alone
    assert SeedVariance.pooled([own, None, SeedVariance(-own.variance, 2.0)]) == SeedVariance(0.0, 4.0)  # floored
    assert SeedVariance.pooled([own] * 10) == SeedVariance(pytest.approx(own.variance), BORROWED_DF_CAP)  # capped
    assert SeedVariance.pooled([None]) is None
    one = compare_paired(child[:1], parent[:1], borrow=SeedVariance(own.variance, 6.0))
    alone_one = compare_paired(child[:1], parent[:1])
    # one seed now counts seed noise too: the example term plus exactly the borrowed component
    assert one.se**2 == pytest.approx(alone_one.se**2 + own.variance)
    c = compare_paired(child, parent, 0.5, borrow=SeedVariance(own.variance, 6.0))
    assert c.borrowed.df == 6.0 and "pooled with 6 df" in c.describe() and c.seed_component == own


def _borrowed_from_others(rng: np.random.Generator, shift: float, seed_sd: float, others: int = 3) -> SeedVariance:
    """What a study's earlier comparisons (independent, on the same kind of noise, 3 seeds each) pool."""
    return SeedVariance.pooled(compare_paired(*simulate_pair(rng, shift, seed_sd, n_seeds=3)).seed_component
                               for _ in range(others))


@pytest.mark.parametrize("seed_sd", [0.1, 0.3, 0.6])
def test_calibration_borrowing_the_study_s_seed_variance_keeps_false_accepts_within_the_confidence(
        seed_sd: float) -> None:
    rng = np.random.default_rng(30)
    sims, accepts = 1500, 0
    for _ in range(sims):
        borrow = _borrowed_from_others(rng, float(rng.choice([0.0, 0.3])), seed_sd)
        child, parent = simulate_pair(rng, 0.0, seed_sd)
        outcome = sequential_compare(lambda k, c=child, p=parent: (c[:k], p[:k]), min_seeds=2, max_seeds=3,
                                     spending="power", min_gain=0.0, confidence=0.9, borrow=borrow)
        accepts += outcome.decision == "accept"
    assert accepts / sims <= 0.12


def test_borrowing_the_study_s_seed_variance_buys_power_at_two_to_three_seeds() -> None:
    """The point of pooling: where seed noise dominates (as on the shipped tables), a real gain is accepted more
    often at the seed budgets the build-up can afford, and never less."""
    rng = np.random.default_rng(31)
    sims, alone, borrowed = 400, 0, 0
    for _ in range(sims):
        borrow = _borrowed_from_others(rng, 0.0, 0.6)
        child, parent = simulate_pair(rng, 0.8, 0.6)
        decisions = [sequential_compare(lambda k, c=child, p=parent: (c[:k], p[:k]), min_seeds=2, max_seeds=3,
                                        spending="power", min_gain=0.5, confidence=0.9,
                                        borrow=given).decision == "accept"
                     for given in (None, borrow)]
        alone += decisions[0]
        borrowed += decisions[1]
    assert borrowed >= alone + 0.03 * sims, (alone, borrowed)


def test_sequential_compare_asks_for_seeds_only_while_undecided() -> None:
    asked = []
    rng = np.random.default_rng(3)
    parent = rng.random((5, 300)) < 0.7
    clear = parent | (rng.random((5, 300)) < 0.5)

    def evidence(k: int):
        asked.append(k)
        return clear[:k], parent[:k]

    outcome = sequential_compare(evidence, min_seeds=2, max_seeds=5, spending="power", min_gain=0.0, confidence=0.9)
    assert outcome.decision == "accept" and outcome.decided_by == "confidence" and asked == [2]
    asked.clear()
    looks = []
    outcome = sequential_compare(evidence := (lambda k: (asked.append(k) or (parent[:k], parent[:k]))),
                                 min_seeds=2, max_seeds=4, spending="power",
                                 on_look=lambda c, k, more: looks.append((k, more)))
    assert outcome.decision == "reject" and outcome.decided_by == "seed budget" and outcome.seeds_used == 4
    assert asked == [2, 3, 4] and looks == [(2, True), (3, True), (4, False)]


def test_evidence_round_trips_and_is_truncated_on_resume(tmp_path) -> None:
    images = torch.randint(0, 255, (37, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(37) % 5
    digest = ImageData(images, labels).digest()
    assert digest != ImageData(images, labels.roll(1)).digest()  # another split never pairs
    # the hash evidence files written before ImageData.digest existed: labels' bytes, then the images'
    assert digest == hashlib.sha256(labels.numpy().tobytes() + images.numpy().tobytes()).hexdigest()[:16]
    ev = Evidence.empty(digest, 37)
    rng = np.random.default_rng(0)
    rows = [(rng.random(37) < 0.5, rng.random(37).astype(np.float32)) for _ in range(3)]
    for epoch, (correct, nll) in enumerate(rows, start=1):
        ev = ev.with_epoch(epoch, correct, nll)
    ev.save(tmp_path)
    back = load_evidence(tmp_path)
    assert back is not None and back.digest == digest and back.epochs.tolist() == [1, 2, 3]
    assert np.array_equal(back.at(2)[0], rows[1][0]) and np.allclose(back.at()[1], rows[2][1])
    assert back.up_to(2).epochs.tolist() == [1, 2]
    replaced = back.up_to(2).with_epoch(2, ~rows[1][0], rows[1][1])
    assert replaced.epochs.tolist() == [1, 2] and np.array_equal(replaced.at(2)[0], ~rows[1][0])
    with pytest.raises(KeyError, match="epoch 7"):
        back.at(7)
    (tmp_path / "evidence.npz").write_bytes(b"not a zip")
    assert load_evidence(tmp_path) is None


def test_fit_writes_evidence_every_epoch_and_a_paused_run_resumes_to_the_same_evidence(tmp_path) -> None:
    data = load_data(DataConfig("shapes", subset=240, val_fraction=0.25))
    recipe = get_recipe("fast", {"epochs": 2, "warmup_epochs": 0, "batch_size": 60})
    whole = fit(model_for("CC,CC,CC,CM", "tiny", data, recipe, seed=3), data, recipe, tmp_path / "a", seed=3,
                quiet=True)
    evidence = load_evidence(tmp_path / "a")
    assert evidence is not None and evidence.epochs.tolist() == [1, 2] and evidence.n_examples == len(data.val)
    for row in whole.history:  # the rows are the examples behind each epoch's reported accuracy
        assert evidence.at(row["epoch"])[0].mean() * 100 == pytest.approx(row["val_acc"])
    paused = fit(model_for("CC,CC,CC,CM", "tiny", data, recipe, seed=3), data, recipe, tmp_path / "b", seed=3,
                 quiet=True, stop_after=1)
    assert paused.status == "paused" and paused.epochs_completed == 1
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = fit(model_for("CC,CC,CC,CM", "tiny", data, recipe, seed=3), data, recipe, tmp_path / "b", seed=3,
                  quiet=True, resume=True)
    untimed = [[{k: v for k, v in row.items() if k not in ("images_per_s", "epoch_time")} for row in run.history]
               for run in (resumed, whole)]
    assert resumed.status == "completed" and untimed[0] == untimed[1]  # the same epochs, bit for bit
    again = load_evidence(tmp_path / "b")
    assert np.array_equal(again.correct, evidence.correct) and np.allclose(again.nll, evidence.nll)
