"""``alternas claims``: every verdict on constructed inputs whose answer is known, and the command on a study."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats
from torch import nn

from alternas.claims import (
    ChildChange,
    RunRecord,
    check_claims,
    claim_flatter,
    claim_lesion,
    claim_low_pass,
    claim_noise,
    claim_predicts,
    claim_variance,
    seed_interval,
    spearman_interval,
)
from alternas.diagnostics import fourier_profile
from alternas.diagnostics.hessian import hessian_spectrum
from alternas.models import Base, BlockInfo, build_model, register_base
from alternas.train.evidence import Evidence, load_evidence
from tests.browser import assert_report_renders
from tests.helpers import run_cli, small_study

SEEDS = (0, 1, 2, 3)


class _Filters(nn.Module):
    """stem -> 3×3 box blur -> Laplacian -> blur, tagged as units; ``blur_kind`` names what the blurs are."""

    def __init__(self, blur_kind: str, sharpen_kind: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity()] + [nn.Conv2d(1, 1, 3, padding=1, bias=False,
                                                                  padding_mode="circular") for _ in range(3)])
        kernels = [torch.full((3, 3), 1 / 9), torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]]),
                   torch.full((3, 3), 1 / 9)]
        with torch.no_grad():
            for conv, kernel in zip(self.blocks[1:], kernels):
                conv.weight.copy_(kernel.view(1, 1, 3, 3))
        kinds = ["stem", blur_kind, sharpen_kind, blur_kind]
        self.infos = [BlockInfo(f"u{i}", -1 if i == 0 else 0, i, kind, False, 1, 1, 16)
                      for i, kind in enumerate(kinds)]

    def units(self):
        return zip(self.infos, self.blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _filter_runs(blur_kind: str, sharpen_kind: str, seeds=SEEDS) -> list[RunRecord]:
    runs = []
    for seed in seeds:
        x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        units = [r.to_dict() for r in fourier_profile(_Filters(blur_kind, sharpen_kind), x)]
        runs.append(RunRecord("CM", seed, 50.0, {"units": units}))
    return runs


def test_a_blur_is_low_pass_and_a_laplacian_high_pass() -> None:
    """Blurs tagged MSA and Laplacians tagged Conv: the paper's claims hold; tagged the other way round they are
    contradicted; one seed cannot decide."""
    low, variance = claim_low_pass(_filter_runs("msa", "conv"), 0.9), claim_variance(_filter_runs("msa", "conv"), 0.9)
    assert low.verdict == "holds" and variance.verdict == "holds"
    assert low.measured["msa_change"]["mean"] < 0 < low.measured["conv_change"]["mean"]
    assert low.measured["msa_blocks"] == 2 * len(SEEDS) and low.measured["conv_blocks"] == len(SEEDS)
    assert low.measured["effect"]["n"] == len(SEEDS) and low.measured["frequency"] == [0.875]
    assert claim_low_pass(_filter_runs("conv", "msa"), 0.9).verdict == "contradicted"
    assert claim_variance(_filter_runs("conv", "msa"), 0.9).verdict == "contradicted"
    assert claim_low_pass(_filter_runs("msa", "conv", seeds=(0,)), 0.9).verdict == "inconclusive"
    assert claim_low_pass([r for r in _filter_runs("msa", "msa")], 0.9).measured["runs"] == 0  # no Conv to compare


MICRO = Base("micro-claims", "basic", (1, 1, 1, 1), widths=(3, 3, 3, 3), heads=(1, 1, 1, 1), dim_head=2,
             stem_width=3, description="small enough for exact Hessians")
register_base(MICRO, overwrite=True)


def _spectrum_runs(placement: str, weight_decay: float) -> list[RunRecord]:
    """λ_max of NLL + (wd/2)‖θ‖²: the L2 term adds wd to every eigenvalue, a planted large eigenvalue for big wd."""
    runs = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = build_model("CM,C,C,C", MICRO, num_classes=3, image_size=8, window_size=2).double()
        gen = torch.Generator().manual_seed(seed)
        batches = [(torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2] * 2))]
        spectrum = hessian_spectrum(model, batches, n_batches=1, k=3, weight_decay=weight_decay, tol=1e-6)
        runs.append(RunRecord(placement, seed, 50.0, {**spectrum.to_dict(), "hessian": spectrum.to_dict(),
                                                      "lambda_max": spectrum.lambda_max, "ape": spectrum.ape,
                                                      "nep": spectrum.nep}))
    return runs


def test_a_planted_large_eigenvalue_is_found_on_the_right_side() -> None:
    flat, sharp = _spectrum_runs("CM,C,C,C", 0.05), _spectrum_runs("C,C,C,C", 50.0)
    holds = claim_flatter(flat, sharp, 0.9)
    assert holds.verdict == "holds" and holds.measured["lambda_max_ratio"] < 0.5
    assert holds.measured["effect"]["n"] == len(SEEDS) and holds.measured["eigenvalues_per_run"] == 3
    assert holds.measured["best"] == "CM,C,C,C" and holds.measured["start"] == "C,C,C,C"
    assert claim_flatter(sharp, flat, 0.9).verdict == "contradicted"
    same = claim_flatter(flat, _spectrum_runs("C,C,C,C", 0.05), 0.9)
    assert same.verdict == "inconclusive" and same.measured["effect"]["mean"] == pytest.approx(0.0, abs=1e-9)
    unpaired = claim_flatter(flat[:2], sharp[2:], 0.9)  # no seed in common: nothing to pair
    assert unpaired.verdict == "inconclusive" and unpaired.measured["effect"]["n"] == 0


def _noise(high_drop: float, seed: int) -> dict:
    freqs = [round(0.1 * i, 1) for i in range(1, 10)]
    wobble = 0.2 * math.sin(seed)
    return {"noise": {"frequencies": freqs, "delta_acc": [-3.0 + wobble if f <= 0.5 else high_drop + wobble
                                                          for f in freqs], "images": 500, "energy": "equal"}}


def test_noise_robustness_compares_the_high_bands_paired_by_seed() -> None:
    robust = [RunRecord("CM", s, 90.0, _noise(-2.0 + 0.1 * s, s)) for s in SEEDS]
    fragile = [RunRecord("CC", s, 90.0, _noise(-12.0 + 0.3 * s, s)) for s in SEEDS]
    result = claim_noise(robust, fragile, 0.9)
    assert result.verdict == "holds" and result.measured["bands"] == [0.6, 0.7, 0.8, 0.9]
    assert result.measured["effect"]["mean"] == pytest.approx(10.0 - 0.2 * 1.5, abs=1e-9)
    assert claim_noise(fragile, robust, 0.9).verdict == "contradicted"
    missing = claim_noise([RunRecord("CM", 0, 90.0, {})], [RunRecord("CC", 0, 90.0, {})], 0.9)
    assert missing.verdict == "inconclusive" and "diagnostics.noise: true" in missing.measured["missing"]


def _lesion(**drops: float) -> dict:
    """Lesion rows of a ``CM,CC``-shaped net: block name -> Δacc; the kind follows the name (stages.0.1 is the MSA
    in an AlterNet, a Conv in the start net)."""
    return {"lesion": [{"name": name.replace("_", "."), "kind": kind, "delta_acc": drop}
                       for (name, drop), kind in zip(drops.items(), ("conv", "msa", "conv"))]}


def _start_lesion(**drops: float) -> dict:
    return {"lesion": [{"name": name.replace("_", "."), "kind": "conv", "delta_acc": d} for name, d in drops.items()]}


def test_lesions_compare_an_msa_with_the_conv_at_the_same_place() -> None:
    """The MSA at the end of stage 0 costs 8-11 pp when removed; the Conv that stood there in the start net costs
    2 pp: holds. The Convs elsewhere (removing them costs 20 pp) do not enter: the comparison is by place, so a
    net whose other Convs matter more is not mistaken for MSAs mattering less."""
    alternets = [RunRecord("CM,CC", s, 90.0, _lesion(stages_0_0=-20.0, stages_0_1=-8.0 - s, stages_1_1=-20.0))
                 for s in SEEDS]
    start = [RunRecord("CC,CC", s, 90.0, _start_lesion(stages_0_0=-20.0, stages_0_1=-2.0, stages_1_1=-20.0))
             for s in SEEDS]
    result = claim_lesion(alternets, start, 0.9)
    assert result.verdict == "holds" and result.measured["msa_removed"]["mean"] == pytest.approx(-9.5)
    assert result.measured["conv_removed_at_the_same_place"]["mean"] == pytest.approx(-2.0)
    assert result.measured["effect"]["mean"] == pytest.approx(-7.5) and result.measured["msa_blocks"] == len(SEEDS)
    weak = [RunRecord("CM,CC", s, 90.0, _lesion(stages_0_0=-1.0, stages_0_1=-0.5, stages_1_1=-1.0)) for s in SEEDS]
    strong_start = [RunRecord("CC,CC", s, 90.0, _start_lesion(stages_0_1=-6.0 - s)) for s in SEEDS]
    assert claim_lesion(weak, strong_start, 0.9).verdict == "contradicted"
    assert "diagnostics.lesion" in claim_lesion([RunRecord("CM", 0, 1.0, {})], [], 0.9).measured["missing"]
    unmatched = claim_lesion(alternets, [], 0.9)  # no start run to match places with: nothing measured
    assert unmatched.verdict == "inconclusive" and "start-net run" in unmatched.measured["missing"]


def test_diagnostics_that_rank_gains_are_found_and_ones_that_do_not_are_said_so() -> None:
    gen = torch.Generator().manual_seed(0)
    predictive = [ChildChange(f"p{i}", gain=float(g), decision="accept" if g > 0.5 else "reject",
                              log_lambda_ratio=-float(g) + 0.05 * float(torch.randn(1, generator=gen)),
                              high_frequency_change=float(torch.randn(1, generator=gen)))
                  for i, g in enumerate(torch.linspace(-2, 2, 12))]
    result = claim_predicts(predictive, 0.9)
    assert result.verdict == "holds" and result.measured["lambda_max"]["rho"]["mean"] < -0.9
    filtered = result.measured["lambda_max"]["early_filter"]
    assert filtered["trained"] == 6 and filtered["accepted_kept"] == filtered["accepted"] == 5
    assert "6 of 12 children (50% saved)" in result.measured["summary"]
    noise = [ChildChange(f"n{i}", float(torch.randn(1, generator=gen)), "reject",
                         float(torch.randn(1, generator=gen)), float(torch.randn(1, generator=gen)))
             for i in range(300)]
    unrelated = claim_predicts(noise, 0.9)
    assert unrelated.verdict == "contradicted" and "cannot replace training" in unrelated.measured["summary"]
    few = claim_predicts(predictive[:3], 0.9)
    assert few.verdict == "inconclusive" and "too few" in few.measured["summary"]
    rho = spearman_interval([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5], 0.9)
    assert rho.mean == pytest.approx(0.8286, abs=1e-4) and rho.ci[0] < rho.mean < rho.ci[1] < 1


def test_two_diagnostics_are_two_tests_and_their_intervals_say_so() -> None:
    """A correlation whose 90 % interval just excludes 0 would hold if it were the only test; with two diagnostics
    each is judged at 95 % (Bonferroni), and this one is inconclusive."""
    gains = list(range(12))
    rng = np.random.default_rng(0)
    order = next(o for o in (rng.permutation(12) for _ in range(10_000))
                 if 0.53 < stats.spearmanr(gains, o).statistic < 0.57)
    assert spearman_interval(gains, list(order), 0.9).ci[0] > 0  # alone, at 90 %, it would hold
    children = [ChildChange(f"c{i}", float(g), "reject", float(o), None) for i, (g, o) in enumerate(zip(gains, order))]
    result = claim_predicts(children, 0.9)
    assert result.measured["per_test_confidence"] == pytest.approx(0.95)
    assert result.verdict == "inconclusive" and result.measured["lambda_max"]["rho"]["ci"][0] < 0


def test_the_flatness_claim_uses_the_warmup_spectrum_where_every_run_has_one() -> None:
    """Measured at the end of warmup (the paper's point) where the study has it, labelled either way; runs whose
    λ_max is not positive cannot enter a log ratio and are counted, not dropped silently."""
    def runs(placement: str, final: float, warm: float | None) -> list[RunRecord]:
        return [RunRecord(placement, s, 50.0, {"lambda_max": final * (1 + 0.01 * s)},
                          warmup={} if warm is None else {"lambda_max": warm * (1 + 0.02 * s)}) for s in SEEDS]

    # flatter at the end of training, sharper at the end of warmup: the two readings disagree on purpose
    at_warmup = claim_flatter(runs("CM", 1.0, 40.0), runs("CC", 10.0, 4.0), 0.9)
    assert at_warmup.measured["measured_at"] == "end of warmup" and at_warmup.verdict == "contradicted"
    final = claim_flatter(runs("CM", 1.0, None), runs("CC", 10.0, 4.0), 0.9)
    assert final.measured["measured_at"] == "end of training" and final.verdict == "holds"
    negative = runs("CC", 10.0, None)
    negative[0] = RunRecord("CC", SEEDS[0], 50.0, {"lambda_max": -0.5})
    assert claim_flatter(runs("CM", 1.0, None), negative, 0.9).measured["runs_without_positive_lambda_max"] == 1


def test_seed_interval_is_a_student_t_over_seeds() -> None:
    estimate = seed_interval({0: 1.0, 1: 2.0, 2: 3.0}, 0.9)
    assert estimate.mean == 2.0 and estimate.ci == pytest.approx((2 - 2.919986 / math.sqrt(3),
                                                                   2 + 2.919986 / math.sqrt(3)), rel=1e-5)
    assert math.isnan(seed_interval({0: 1.0}, 0.9).ci[0]) and seed_interval({}, 0.9).n == 0


def test_every_claim_has_the_documented_fields() -> None:
    claims = check_claims(_filter_runs("msa", "conv"), [], [], [], 0.9)
    assert [c.claim for c in claims] == ["msa_low_pass", "msa_reduce_variance", "msa_flatten_loss",
                                         "alternet_noise_robust", "alternet_corruption_robust",
                                         "msa_matter_at_stage_end", "diagnostics_predict_gains"]
    for c in claims:
        out = c.to_dict()
        assert {"claim", "paper", "measured", "verdict", "method"} <= set(out)
        assert out["verdict"] in ("holds", "contradicted", "inconclusive")
        assert {"mean", "ci", "n"} <= set(out["measured"]["effect"])
        json.dumps(out, allow_nan=False)


def test_claims_command_on_a_finished_build_up(tmp_path) -> None:
    raw = small_study(tmp_path, seeds=[0, 1], diagnostics={"noise": True, "noise_images": 60, "lesion": True,
                                                           "lesion_images": 60, "corruptions": True,
                                                           "corruption_images": 24, "severities": [1, 5]},
                      buildup={"min_gain": 0.0, "max_candidates": 2})  # the start and one MSA child, 2 seeds each
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = run_cli("buildup", "--study", str(path))
    assert res.returncode == 0, res.stderr
    root = Path(raw["output"])
    table = run_cli("claims", str(root))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["claim", "paper", "measured"] and "verdict" in lines[0]
    for title in ("MSAs are low-pass", "MSAs suppress large Hessian eigenvalues", "AlterNets withstand",
                  "AlterNets are more robust", "MSAs matter at the end of a stage", "The diagnostics predict"):
        assert any(line.startswith(title) for line in lines), title
    as_json = run_cli("claims", str(root), "--json")
    assert as_json.returncode == 0, as_json.stderr
    claims = json.loads(as_json.stdout)
    assert claims == json.loads((root / "claims.json").read_text())
    by_id = {c["claim"]: c for c in claims}
    assert len(by_id) == 7 and all(c["verdict"] in ("holds", "contradicted", "inconclusive") for c in claims)
    noise = by_id["alternet_noise_robust"]["measured"]
    assert noise["effect"]["n"] == 2 and noise["images"] == 60 and "missing" not in noise
    corrupted = by_id["alternet_corruption_robust"]["measured"]  # paired by seed, on generated corruptions
    assert corrupted["effect"]["n"] == 2 and corrupted["source"].startswith("generated (albumentations")
    assert 0 <= corrupted["start_robustness"]["mean"] <= 100 and "missing" not in corrupted
    assert by_id["msa_flatten_loss"]["measured"]["effect"]["n"] == 2
    assert by_id["msa_matter_at_stage_end"]["measured"]["runs"] >= 2
    page = (root / "report.html").read_text()
    assert "The paper&#x27;s claims on this study" in page or "The paper's claims on this study" in page
    assert "Accuracy vs robustness (generated (albumentations" in page  # the paper's §4.1 figure
    shown = assert_report_renders(root / "report.html", min_figures=7)
    if shown is not None:  # None: no browser here (outside CI), only the browser checks are left out
        assert any(f["traces"] >= 4 for f in shown.figures)  # the claims figure: a marker per measured claim
    runs = sorted(p.parent for p in (root / "candidates").glob("*/evidence.npz"))
    (runs[0] / "result.json").write_text('{"key": ')  # torn: left out, and said
    damaged = run_cli("claims", str(root))
    assert damaged.returncode == 0 and "1 damaged result file(s) left out" in damaged.stderr
    moved = load_evidence(runs[1])
    Evidence("another-split", moved.epochs, moved.correct, moved.nll).save(runs[1])  # data that differed
    split = run_cli("claims", str(root))
    assert split.returncode == 2 and "validated on different splits" in split.stderr, split.stderr
    assert runs[1].name in split.stderr and "Traceback" not in split.stderr
    bad = run_cli("claims", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "has no build-up trajectory" in bad.stderr
