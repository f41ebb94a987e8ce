import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from alternas.data import DataConfig, load_data
from alternas.diagnostics import DiagnosticsConfig, diagnose, fourier_profile, hessian_eigenvalues, hutchinson_trace
from alternas.diagnostics.hessian import HessianOperator, hessian_spectrum, lanczos, twice_differentiable
from alternas.diagnostics.landscape import loss_landscape
from alternas.diagnostics.robustness import (
    band_limited_noise,
    band_mask,
    lesion_study,
    measured_band_mask,
    noise_robustness,
)
from alternas.models import Base, BlockInfo, build_model, register_base
from alternas.models.blocks import WindowAttention, attention_path
from alternas.train import get_recipe
from alternas.train.run import model_for
from tests.helpers import run_cli

MICRO = Base("micro-test", "basic", (1, 1, 1, 1), widths=(3, 3, 3, 3), heads=(1, 1, 1, 1), dim_head=2,
             stem_width=3, description="a few hundred parameters: small enough for a dense Hessian")
register_base(MICRO, overwrite=True)


def _micro_problem():
    torch.manual_seed(0)
    model = build_model("CM,C,C,C", MICRO, num_classes=3, image_size=8, window_size=2, drop_path=0.0).double()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, x, y


def _dense_hessian(model, x, y, weight_decay):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    buffers = dict(model.named_buffers())
    flat0 = torch.cat([p.reshape(-1) for p in params])

    def loss(flat):
        chunks = flat.split([p.numel() for p in params])
        state = {n: c.view_as(p) for n, c, p in zip(names, chunks, params)}
        logits = functional_call(model, {**state, **buffers}, (x,))
        return nn.functional.cross_entropy(logits, y) + 0.5 * weight_decay * flat.pow(2).sum()

    model.eval()
    with attention_path(model, "math"):
        return torch.autograd.functional.hessian(loss, flat0)


def test_lanczos_matches_the_dense_hessian_spectrum() -> None:
    model, x, y = _micro_problem()
    assert sum(p.numel() for p in model.parameters()) < 1000
    dense = torch.linalg.eigvalsh(_dense_hessian(model, x, y, weight_decay=0.05))
    top = hessian_eigenvalues(model, x, y, k=2, which="LA", weight_decay=0.05, tol=1e-8)
    bottom = hessian_eigenvalues(model, x, y, k=2, which="SA", weight_decay=0.05, tol=1e-8)
    assert top == pytest.approx(dense[-2:].flip(0).tolist(), rel=1e-4)
    assert bottom == pytest.approx(dense[:2].tolist(), rel=1e-4)
    assert bottom[0] < 0 < top[0]  # an untrained net has negative curvature too
    magnitude = hessian_eigenvalues(model, x, y, k=3, which="LM", weight_decay=0.05, tol=1e-8)
    expected = sorted(dense.tolist(), key=abs, reverse=True)[:3]
    assert magnitude == pytest.approx(expected, rel=1e-4)


def test_forward_over_reverse_hvp_equals_double_backward() -> None:
    model, x, y = _micro_problem()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with twice_differentiable(model):
        a = HessianOperator(model, x, y, 0.05, "reverse").hvp(v)
        b = HessianOperator(model, x, y, 0.05, "forward").hvp(v)
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert all(m.path == "auto" for m in model.modules() if isinstance(m, WindowAttention))  # restored afterwards


def test_hutchinson_trace_estimates_the_dense_trace() -> None:
    model, x, y = _micro_problem()
    hessian = _dense_hessian(model, x, y, weight_decay=0.0)
    dense = hessian.diagonal().sum().item()
    samples = 300
    estimate = hutchinson_trace(model, x, y, samples=samples)
    # Rademacher probes: Var(vᵀHv) = 2·Σ_{i≠j} H_ij², so the mean of n probes is off by < 4 standard errors
    off_diagonal = hessian.square().sum() - hessian.diagonal().square().sum()
    standard_error = (2 * off_diagonal / samples).sqrt().item()
    assert abs(estimate - dense) < 4 * standard_error
    assert standard_error < abs(dense)  # the bound is tight enough to mean something


def test_spectrum_summary_statistics() -> None:
    model, x, y = _micro_problem()
    spec = hessian_spectrum(model, [(x, y), (x[:4], y[:4])], n_batches=2, k=3, tol=1e-8)
    assert spec.batches == 2 and len(spec.eigenvalues) == 6
    negatives = [v for v in spec.eigenvalues if v < 0]
    assert spec.nep == pytest.approx(len(negatives) / 6)
    positives = [v for v in spec.eigenvalues if v > 0]
    assert spec.ape == pytest.approx(sum(positives) / len(positives))
    per_batch = [max(spec.eigenvalues[:3]), max(spec.eigenvalues[3:])]
    assert spec.lambda_max == pytest.approx(sum(per_batch) / 2)


class _ToyUnits(nn.Module):
    """stem (identity) -> 3x3 box blur -> identity -> Laplacian, exposed like an AlterNet's units()."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Identity()
        self.blur = nn.Conv2d(1, 1, 3, padding=1, bias=False, padding_mode="circular")
        self.same = nn.Identity()
        self.laplace = nn.Conv2d(1, 1, 3, padding=1, bias=False, padding_mode="circular")
        with torch.no_grad():
            self.blur.weight.fill_(1 / 9)
            self.laplace.weight.copy_(torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]]).view(1, 1, 3, 3))
        self.infos = [BlockInfo(n, -1 if n == "stem" else 0, i, "stem" if n == "stem" else "conv", False, 1, 1, 16)
                      for i, n in enumerate(["stem", "blur", "same", "laplace"])]

    def units(self):
        return zip(self.infos, [self.stem, self.blur, self.same, self.laplace])

    def forward(self, x):
        return self.laplace(self.same(self.blur(self.stem(x))))


def test_fourier_profile_analytic_cases() -> None:
    records = {r.name: r for r in fourier_profile(_ToyUnits(), torch.randn(16, 1, 16, 16))}
    assert records["same"].delta_log_amplitude == pytest.approx(records["blur"].delta_log_amplitude, abs=1e-5)
    assert records["blur"].delta_high < records["stem"].delta_high - 1.0  # low-pass
    assert records["laplace"].delta_high > records["same"].delta_high + 1.0  # high-pass
    assert [r.depth for r in records.values()] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert records["stem"].delta_log_amplitude[0] == 0.0 and len(records["stem"].frequencies) == 8


def test_fourier_profile_is_the_papers_recipe_on_an_alternet() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    records = fourier_profile(model, x)
    assert [r.kind for r in records].count("msa") == 3 and records[0].kind == "stem"
    assert len(records) == 9  # stem + 8 blocks, no logits
    with torch.no_grad():
        z = model.stem(x)
    spectrum = torch.log(torch.fft.fft2(z).abs() + 1e-6)
    spectrum = torch.roll(spectrum, shifts=(16, 16), dims=(-2, -1)).mean(dim=(0, 1))
    diag = torch.diagonal(spectrum)[16:]
    assert records[0].delta_log_amplitude == pytest.approx((diag - diag[0]).tolist(), abs=1e-4)
    assert records[0].variance == pytest.approx(z.var(dim=(-2, -1)).mean().item(), rel=1e-5)


def test_fourier_scores_compare_units_at_one_measured_frequency() -> None:
    """A 32×32 map's last half-diagonal point is 0.94π, a 4×4 map's 0.5π: the common score reads every unit at the
    highest frequency the coarsest map resolves; the paper's protocol reads each at its own last point."""
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    records = fourier_profile(model, x)
    sizes = [r.size for r in records]
    assert sizes[0] == 32 and sizes[-1] == 4
    for r in records:
        assert r.frequencies == pytest.approx([2 * k / r.size for k in range(r.size // 2)])
        assert r.high_frequency == pytest.approx(0.5)
        k = r.size // 4  # the point (k, k) of a size×size map is 2k/size = 0.5π
        assert r.delta_high == pytest.approx(r.delta_log_amplitude[k], abs=1e-6)
        assert r.delta_paper == r.delta_log_amplitude[-1]
    assert records[0].frequencies[-1] == pytest.approx(30 / 32) and records[-1].frequencies == [0.0, 0.5]
    paper = fourier_profile(model, x, score="paper")
    assert [r.delta_high for r in paper] == [r.delta_paper for r in records]
    assert [r.high_frequency for r in paper] == [r.frequencies[-1] for r in records]


def test_band_limited_noise_stays_in_its_band() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 3, 32, 32)
    noisy = band_limited_noise(x, 0.5 * math.pi, 0.1 * math.pi, eps=0.7, gen=gen)
    spectrum = torch.roll(torch.fft.fft2(noisy), shifts=(16, 16), dims=(-2, -1)).abs().pow(2)
    mask = band_mask(32, 0.5 * math.pi, 0.1 * math.pi)  # squares of side 2·⌊0.6·16⌋=18 minus 2·⌊0.4·16⌋=12
    assert mask.sum() == 18 * 18 - 12 * 12
    # L∞ distance from the zero frequency; taking the real part mirrors the (asymmetric) square by one bin
    idx = torch.arange(32) - 16
    radius = torch.maximum(idx.abs().view(-1, 1), idx.abs().view(1, -1))
    in_band = (radius >= 6) & (radius <= 9)
    assert spectrum[..., ~in_band].sum() / spectrum.sum() < 1e-10
    assert noisy.abs().max() > 0.01


def test_measured_noise_bands_hold_no_mean_and_equal_energy_at_32px() -> None:
    """The reference's 0.1π band at 32 px is the 4×4 square round the zero frequency (the image mean) and its bin
    count rises with frequency; the measured bands leave the mean out and get the same energy each."""
    assert band_mask(32, 0.1 * math.pi, 0.05 * math.pi)[16, 16] == 1  # the reference's lowest band holds DC
    x = torch.zeros(8, 3, 32, 32)
    target = 0.7 * math.sqrt(4 * 0.5 * 0.05)
    energies, bins = [], []
    for f in (0.1, 0.3, 0.5, 0.7, 0.9):
        gen = torch.Generator().manual_seed(0)
        noise = band_limited_noise(x, f * math.pi, 0.05 * math.pi, 0.7, gen, band="measured", rms=target)
        assert noise.mean(dim=(-2, -1)).abs().max() < 1e-6  # no zero-frequency term
        energies.append(noise.pow(2).mean().sqrt().item())
        mask = measured_band_mask(32, f * math.pi, 0.05 * math.pi)
        freqs = torch.fft.fftfreq(32).abs() * 2
        linf = torch.maximum(freqs.view(-1, 1), freqs.view(1, -1))[mask.bool()]
        assert linf.min() >= f - 0.05 - 1e-6 and linf.max() < f + 0.05  # only bins in the band
        bins.append(int(mask.sum()))
        spectrum = torch.fft.fft2(noise).abs().pow(2)
        assert spectrum[..., ~mask.bool()].sum() / spectrum.sum() < 1e-10
    assert energies == pytest.approx([target] * 5, rel=1e-5)
    assert max(bins) > 4 * min(bins)  # why the energy needs equalising: 24 bins at 0.1π, 232 at 0.9π
    data = load_data(DataConfig("shapes", subset=200))
    model = model_for("CC,CC,CC,CC", "tiny", data, get_recipe("fast"))
    from alternas.data.loader import TensorLoader

    loader = TensorLoader(data.val, 64, mean=data.mean, std=data.std)
    result = noise_robustness(model, loader, frequencies=(0.1, 0.5, 0.9))
    assert result["band"] == "measured" and result["energy"] == "equal" and result["image_size"] == 32
    assert result["bins"] == [bins[0], bins[2], bins[4]] and result["rms"] == pytest.approx([target] * 3, rel=1e-4)
    coarse = noise_robustness(model, TensorLoader(data.val.take(torch.arange(8)), 8, mean=data.mean, std=data.std),
                              frequencies=(0.1,), half_width=0.01)
    assert coarse["bins"] == [0] and math.isnan(coarse["delta_acc"][0])  # no bin at 0.09-0.11π on 32 px


def test_lesion_skips_subsampling_blocks_and_measures_drops() -> None:
    data = load_data(DataConfig("shapes", subset=200))
    model = model_for("CC,CM,CM,CM", "tiny", data, get_recipe("fast"))
    from alternas.data.loader import TensorLoader

    rows = lesion_study(model, TensorLoader(data.val, 64, mean=data.mean, std=data.std))
    assert [r["name"] for r in rows] == ["stages.0.0", "stages.0.1", "stages.1.1", "stages.2.1", "stages.3.1"]
    assert [r["kind"] for r in rows].count("msa") == 3


def test_landscape_centre_is_the_model_and_weights_are_restored() -> None:
    model, x, y = _micro_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    land = loss_landscape(model, [(x, y)], grid=3, weight_decay=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    centre = nn.functional.cross_entropy(model(x), y).item() + 0.05 * sum(p.norm().item() for p in model.parameters())
    assert land["loss"][1][1] == pytest.approx(centre, rel=1e-6)
    assert land["loss"][0][0] != pytest.approx(centre, rel=1e-3)


def test_diagnose_writes_json_and_figures(tmp_path) -> None:
    data = load_data(DataConfig("shapes", subset=300))
    recipe = get_recipe("fast")
    model = model_for("CC,CM,CM,CM", "tiny", data, recipe)
    config = DiagnosticsConfig(hessian_batches=1, hessian_batch_size=16, noise=True, noise_images=100,
                               lesion=True, lesion_images=100)
    out = diagnose(model, data, recipe, config, out_dir=tmp_path, label="alter")
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert saved["settings"]["weight_decay_in_loss"] == 0.05 and saved["settings"]["augment"] is True
    assert set(saved["delta_high"]) == {"c1", "c2", "c3", "c4"}
    assert math.isfinite(out["lambda_max"]) and 0 <= out["nep"] <= 1
    assert len(saved["noise"]["delta_acc"]) == 9
    page = (tmp_path / "diagnostics.html").read_text()
    assert page.count("class='figure'") == 5  # fourier, variance, hessian, noise, lesion
    assert "Hessian max-eigenvalue spectrum" in page


def test_diagnose_cli_runs_on_a_checkpoint_and_reports_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    res = run_cli("diagnose", "--placement", "CC,CM,CM,CM", "--base", "tiny", "--checkpoint",
                  str(tmp_path / "w.safetensors"), "--data", "shapes", "--subset", "200", "--fourier", "--json",
                  "--out", str(tmp_path / "diag"))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert set(summary["delta_high"]) == {"c1", "c2", "c3", "c4"} and "lambda_max" not in summary
    bad = run_cli("diagnose", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "is not a run folder" in bad.stderr


def test_lanczos_stops_on_its_error_bound_and_keeps_to_the_budget() -> None:
    gen = torch.Generator().manual_seed(0)
    spectrum = torch.cat([torch.tensor([100.0, -40.0]), torch.rand(298, generator=gen) * 10]).double()
    basis, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen, dtype=torch.float64))
    matrix = basis @ torch.diag(spectrum) @ basis.T
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matrix @ v

    start = torch.randn(300, generator=gen, dtype=torch.float64)
    values, done = lanczos(matvec, start, k=1, which="LM", tol=1e-6)
    assert done and values[0] == pytest.approx(100.0, rel=1e-6)
    assert len(calls) < 30  # a well-separated top needs few products, not the whole space
    values, done = lanczos(matvec, start, k=1, which="SA", tol=1e-6)
    assert done and values[0] == pytest.approx(-40.0, rel=1e-6)
    calls.clear()
    values, done = lanczos(matvec, start, k=5, which="LA", tol=1e-12, max_matvecs=6)
    assert not done and len(calls) == 6 and len(values) < 5


def test_paper_preset_is_the_papers_hessian_protocol_with_counts(tmp_path) -> None:
    """Top-5 by magnitude per augmented training batch of the recipe's size, over the whole training set; every
    statistic says how many values it rests on; a density is drawn only from enough values."""
    from alternas.diagnostics.figures import MIN_DENSITY_VALUES, hessian_figure
    from alternas.diagnostics.run import get_diagnostics

    paper = get_diagnostics("paper")
    assert (paper.hessian_k, paper.hessian_batches, paper.hessian_batch_size) == (5, None, None)
    assert paper.at_epochs == ("warmup",) and paper.fourier_score == "paper" and paper.cka and paper.lesion
    data = load_data(DataConfig("shapes", subset=50, val_fraction=0.2, seed=0))  # 40 training images
    recipe = get_recipe("fast", {"batch_size": 20, "mixup": 0.8})
    model = model_for("CC,CC,CC,CM", "tiny", data, recipe)
    config = get_diagnostics({"preset": "paper", "fourier": False, "noise": False, "lesion": False, "cka": False,
                              "hessian_max_matvecs": 80})
    out = diagnose(model, data, recipe, config)
    spectrum = out["hessian"]
    assert spectrum["batches"] == 2 and spectrum["k"] == 5  # 40 images / 20 per batch
    counts = spectrum["counts"]
    assert counts["nep"] == len(spectrum["eigenvalues"]) == 5 * (2 - spectrum["unconverged"]) > 0
    assert counts["lambda_max"] == 2 - spectrum["unconverged"] and counts["ape"] <= counts["nep"]
    assert out["settings"]["mixup_in_loss"] is True
    few = hessian_figure({"start": [3.0, 4.0, -1.0]})
    assert {t.mode for t in few.data} == {"markers"} and "n=2" in few.data[1].name
    many = hessian_figure({"start": [float(v) for v in range(1, MIN_DENSITY_VALUES + 1)]})
    assert [t.mode for t in many.data] == ["lines"]


def test_diagnostics_presets_in_a_study_file_round_trip() -> None:
    from alternas.search import study_from_dict
    from alternas.search.study import StudyConfig

    config = study_from_dict({"name": "p", "diagnostics": "paper"})
    assert config.diagnostics.hessian_k == 5 and study_from_dict(config.to_dict()) == config
    mixed = study_from_dict({"name": "p", "diagnostics": {"preset": "paper", "hessian_k": 2, "at_epochs": [3]}})
    assert mixed.diagnostics.hessian_k == 2 and mixed.diagnostics.at_epochs == (3,) and mixed.diagnostics.cka
    assert study_from_dict({"name": "p"}).diagnostics == StudyConfig().diagnostics
    from alternas.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown diagnostics preset 'papr'"):
        study_from_dict({"name": "p", "diagnostics": "papr"})
    with pytest.raises(ConfigError, match="at_epochs must list epochs >= 1 or 'warmup'"):
        study_from_dict({"name": "p", "diagnostics": {"at_epochs": [0]}})


def test_diagnostics_at_chosen_epochs_leave_training_unchanged(tmp_path) -> None:
    """The paper's spectra are at the end of warmup: at_epochs diagnoses then, into diagnostics/epoch-NNN/, and puts
    training's random state back (Mixup in the Hessian loss draws from it), so the run ends the same."""
    from alternas.search import Evaluator, study_from_dict
    from alternas.search.evaluator import epoch_diagnostics_dir

    def study(name: str, **diagnostics) -> dict:
        return {"name": name, "base": "tiny", "seeds": [0], "output": str(tmp_path / name),
                "data": {"name": "shapes", "subset": 200, "val_fraction": 0.2},
                "recipe": {"name": "fast", "epochs": 1, "warmup_epochs": 1, "batch_size": 32, "mixup": 0.8},
                "diagnostics": {"hessian_batches": 1, "hessian_batch_size": 16, "fourier_images": 16, **diagnostics}}

    plain = Evaluator(study_from_dict(study("plain")), quiet=True).evaluate("CC,CC,CC,CM", seed=0)
    evaluator = Evaluator(study_from_dict(study("warm", at_epochs=["warmup"], cka=True, cka_batches=2,
                                                cka_batch_size=16)), quiet=True)
    at = evaluator.evaluate("CC,CC,CC,CM", seed=0)
    assert at.val_acc == plain.val_acc and at.val_nll == plain.val_nll
    saved = json.loads((epoch_diagnostics_dir(at.run_dir, 1) / "diagnostics.json").read_text())
    final = json.loads((Path(at.run_dir) / "diagnostics" / "diagnostics.json").read_text())
    assert math.isfinite(saved["lambda_max"]) and saved["lambda_max"] != final["lambda_max"]
    assert not epoch_diagnostics_dir(at.run_dir, 2).exists()
    assert len(final["cka"]["matrix"]) == len(final["units"]) and final["cka"]["examples"] == 32
    assert "Representation similarity" in (Path(at.run_dir) / "diagnostics" / "diagnostics.html").read_text()


class _SimilarityUnits(nn.Module):
    """stem -> an orthogonal channel mix scaled by 3 (same representation) -> fresh noise (an unrelated one)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Identity()
        self.mix = nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
            self.mix.weight.copy_(3 * q.view(4, 4, 1, 1))
        self.noise = _Noise()
        self.infos = [BlockInfo(n, s, i, k, False, 4, 4, 8) for i, (n, s, k) in
                      enumerate([("stem", -1, "stem"), ("mix", 0, "conv"), ("noise", 1, "msa")])]

    def units(self):
        return zip(self.infos, [self.stem, self.mix, self.noise])

    def forward(self, x):
        return self.noise(self.mix(self.stem(x)))


class _Noise(nn.Module):
    def forward(self, x):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(int(x.abs().sum() * 1e3) % 2**31))


def test_minibatch_cka_is_invariant_to_rotation_and_scale_and_near_zero_for_unrelated() -> None:
    from alternas.diagnostics.similarity import minibatch_cka, unbiased_hsic

    gen = torch.Generator().manual_seed(1)
    cka = minibatch_cka(_SimilarityUnits(), [torch.randn(32, 4, 8, 8, generator=gen) for _ in range(4)])
    m = torch.tensor(cka["matrix"])
    assert cka["names"] == ["stem", "mix", "noise"] and (cka["batches"], cka["examples"]) == (4, 128)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-6) and torch.allclose(m, m.T)
    assert m.diagonal().tolist() == pytest.approx([1.0] * 3)
    assert abs(m[0, 2]) < 0.05  # the unbiased estimator is centred on 0 for independent representations
    x = torch.randn(10, 6, generator=gen)
    grams = torch.stack([x @ x.T, (2 * x) @ (2 * x).T])
    hsic = unbiased_hsic(grams)
    assert hsic[1, 1] == pytest.approx(16 * hsic[0, 0].item()) and hsic[0, 1] == pytest.approx(4 * hsic[0, 0].item())
    with pytest.raises(ValueError, match="at least 4 examples"):
        unbiased_hsic(grams[:, :3, :3])
