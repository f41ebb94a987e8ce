"""The CUDA paths (bf16 autocast, channels_last, fused SDPA): run where a GPU is present, skipped on CPU machines."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from alternas.data import DataConfig, load_data
from alternas.diagnostics import hessian_eigenvalues
from alternas.models import build_model
from alternas.train import fit, get_recipe
from alternas.train.run import model_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_attention_runs_fused_sdpa_on_cuda_and_matches_the_math_path() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        fused = model(x)
        model.set_attention_path("math")
        plain = model(x)
    assert torch.allclose(fused, plain, atol=1e-3, rtol=1e-3)
    model.set_attention_path("auto")
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert kernels and "aten::_scaled_dot_product_attention_math" not in kernels, kernels  # training: fused too
    assert model.stages[3][1].attn.relative_position_bias.grad is not None


def test_fit_on_cuda_trains_in_bf16_with_channels_last(tmp_path) -> None:
    data = load_data(DataConfig("textures", subset=1500, val_fraction=0.2, seed=0))
    recipe = get_recipe("fast", {"epochs": 2, "warmup_epochs": 0})
    model = model_for("CC,CM,CM,CM", "tiny", data, recipe)
    result = fit(model, data, recipe, tmp_path / "run", device="cuda", quiet=True)
    assert result.status == "completed" and result.val["acc"] > 30  # chance is 10%
    weight = model.stem.conv.weight
    assert weight.is_cuda and weight.dtype == torch.float32  # bf16 only inside autocast
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_hessian_top_eigenvalue_on_cuda_agrees_with_cpu() -> None:
    torch.manual_seed(0)
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    on_cpu = hessian_eigenvalues(model, x, y, k=1, which="LM", tol=1e-4)[0]
    on_gpu = hessian_eigenvalues(model.cuda(), x.cuda(), y.cuda(), k=1, which="LM", tol=1e-4)[0]
    assert on_gpu == pytest.approx(on_cpu, rel=2e-2)  # cuDNN convolutions may run in TF32
