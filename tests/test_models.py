import pytest
import torch

from alternas import build_model
from alternas.errors import ConfigError, PlacementError
from alternas.models import count_flops, count_parameters, get_base
from alternas.models.blocks import MSABlock, WindowAttention, relative_position_index
from alternas.placement import Placement

PAPER_CIFAR = "CCC,CCCM,CCCCCM,CMCM"


def test_paper_cifar100_alternet50_has_the_reference_parameter_count() -> None:
    model = build_model(PAPER_CIFAR, "resnet50", num_classes=100, image_size=32, window_size=4)
    assert count_parameters(model) == 33_012_840


@pytest.mark.parametrize(
    ("placement", "num_classes", "image_size", "millions"),
    [  # PAPER.md §1.4 [RUN] table
        ("CCC,CCCM,CMCMCM,CMCM", 100, 32, 34.06),  # code default on CIFAR, ws=4
        ("CCC,CCCC,CCCCCC,CCCC", 100, 32, 28.16),  # the build-up starting point
        ("CCC,CCCM,CMCMCM,CMCM", 1000, 224, 35.92),  # ImageNet AlterNet-50, ws=7
    ],
)
def test_reference_parameter_counts(placement: str, num_classes: int, image_size: int, millions: float) -> None:
    model = build_model(placement, "resnet50", num_classes=num_classes, image_size=image_size)
    assert round(count_parameters(model) / 1e6, 2) == millions


def test_msa_block_parameters_follow_the_reference_widths() -> None:
    # c4 MSA of AlterNet-50: 2048 -> 1x1 -> 512, qkv 512 -> 3*24*64, proj 1536 -> 2048 (+bias), 7x7 bias table.
    block = MSABlock(2048, 512, expansion=4, heads=24, dim_head=64, window_size=4)
    expected = (2 * 2048) + 2048 * 512 + (2 * 512) + 512 * 3 * 1536 + 1536 * 2048 + 2048 + 7 * 7
    assert count_parameters(block) == expected


@pytest.mark.parametrize("base", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "tiny", "small"])
@pytest.mark.parametrize("image_size", [32, 224])
def test_forward_shapes_for_every_base(base: str, image_size: int) -> None:
    b = get_base(base)
    placement = Placement.from_counts(b.depths, b.paper_msa_counts)
    model = build_model(placement, base, num_classes=7, image_size=image_size).eval()
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    final = 4 if image_size == 32 else 7
    assert features.shape == (1, b.num_features, final, final)
    assert logits.shape == (1, 7)
    assert model.forward_head(features, pre_logits=True).shape == (1, b.num_features)


def test_sdpa_path_equals_math_path() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        model.set_attention_path("math")
        plain = model(x)
    assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)
    assert all(m.path == "math" for m in model.modules() if isinstance(m, WindowAttention))


def _attention_kernels(model: torch.nn.Module, x: torch.Tensor) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        model(x).sum().backward() if torch.is_grad_enabled() else model(x)
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_auto_attention_path_uses_sdpa_only_where_it_has_a_fused_kernel() -> None:
    model = build_model("CC,CC,CC,CM", "tiny", num_classes=10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # CPU inference: the fused flash kernel
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in _attention_kernels(model, x)
    # CPU training: SDPA would fall back to its composite math kernel for the bias gradient; auto avoids SDPA
    assert not any("scaled_dot_product" in k for k in _attention_kernels(model, x))
    model.set_attention_path("sdpa")
    assert "aten::_scaled_dot_product_attention_math" in _attention_kernels(model, x)


def test_window_attention_matches_a_direct_per_window_computation() -> None:
    torch.manual_seed(1)
    attn = WindowAttention(8, 12, heads=2, dim_head=4, window_size=2).eval()
    x = torch.randn(1, 8, 4, 4)
    out = attn(x)
    # Recompute window (1, 0) from the definition: tokens row-major, bias[a, b] = B[pos[b] - pos[a] + p - 1].
    q, k, v = attn.qkv(x).reshape(3, 2, 4, 4, 4).unbind(0)  # (heads, dh, h, w)
    rows, cols = slice(2, 4), slice(0, 2)
    tok = lambda t: t[:, :, rows, cols].reshape(2, 4, 4).transpose(1, 2)  # (heads, p², dh)  # noqa: E731
    pos = [(a // 2, a % 2) for a in range(4)]
    bias = torch.tensor([[attn.relative_position_bias[pb[0] - pa[0] + 1, pb[1] - pa[1] + 1].item() for pb in pos]
                         for pa in pos])
    weights = ((tok(q) @ tok(k).transpose(1, 2)) / 2.0 + bias).softmax(-1)
    window = (weights @ tok(v)).transpose(1, 2).reshape(8, 2, 2)
    expected = torch.nn.functional.conv2d(window[None], attn.proj.weight, attn.proj.bias)
    assert torch.allclose(out[:, :, rows, cols], expected, atol=1e-5)


def test_relative_position_index_is_shared_table_lookup() -> None:
    idx = relative_position_index(3)
    assert idx.shape == (9, 9)
    assert idx.diagonal().unique().tolist() == [2 * 5 + 2]  # zero offset -> centre of the 5x5 table
    assert idx[0, 8].item() == 4 * 5 + 4  # query (0,0), key (2,2): offset (+2,+2)


def test_block_tags_and_stochastic_depth_schedule() -> None:
    model = build_model(PAPER_CIFAR, "resnet50", num_classes=100, image_size=32, drop_path=0.1)
    infos = model.block_infos
    assert len(infos) == 18 and infos[0].kind == "stem"
    assert [i.kind for i in infos].count("msa") == 4
    assert [i.name for i in infos if i.subsamples] == ["stages.1.0", "stages.2.0", "stages.3.0"]
    assert [info.name for info, _ in model.units()][-1] == "stages.3.3"
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for _, block in list(model.units())[1:]]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates[1] == pytest.approx(0.1 / 16)


def test_drop_path_is_active_in_training_only() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32, drop_path=0.9)
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("base, placement", [("tiny", "CC,CM,CM,CM"), ("resnet50", PAPER_CIFAR)])
def test_zero_init_last_starts_every_block_as_its_shortcut(base: str, placement: str) -> None:
    zeroed = build_model(placement, base, num_classes=10, image_size=32, drop_path=0.0, zero_init_last=True)
    default = build_model(placement, base, num_classes=10, image_size=32, drop_path=0.0)
    x = torch.randn(2, 3, 32, 32)
    kinds = set()
    with torch.no_grad():
        for (info, block), (_, plain) in zip(list(zeroed.units())[1:], list(default.units())[1:], strict=True):
            kinds.add(info.kind)
            size = info.feature_size * (2 if info.subsamples else 1)
            features = torch.randn(2, block.norm1.num_features, size, size)
            pre = block.act1(block.norm1(features))
            skip = features if block.shortcut is None else block.shortcut(pre)
            assert torch.allclose(block(features), skip)
            assert plain.branch(plain.act1(plain.norm1(features))).abs().max() > 0  # the default init is not zero
    assert kinds == {"conv", "msa"}
    assert zeroed(x).shape == (2, 10)


def test_flops_match_a_hand_count_for_a_conv_block() -> None:
    conv = build_model("C,C,C,C", "tiny", num_classes=10, image_size=32)
    two = build_model("CC,C,C,C", "tiny", num_classes=10, image_size=32)
    # The extra identity BasicBlock of stage 1: two 3x3 convs 16->16 on a 32x32 map, 2 FLOPs per multiply-add.
    assert count_flops(two) - count_flops(conv) == 2 * 2 * (16 * 16 * 9) * 32 * 32


def test_flops_count_attention_whichever_kernel_runs() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32)
    fused = count_flops(model)
    model.set_attention_path("math")
    assert count_flops(model) == fused
    assert model.stages[3][1].attn.path == "math"
    model.set_attention_path("sdpa")
    assert count_flops(model) == fused and model.stages[3][1].attn.path == "sdpa"  # counted on math, restored
    with_attention = fused - count_flops(build_model("CC,CC,CC,CC", "tiny", num_classes=10, image_size=32))
    assert with_attention != 0


def test_timm_interface() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32)
    assert model.get_classifier().out_features == 10
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["num_classes"] == 3


def test_channels_last_input_gives_the_same_output() -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


def test_build_errors() -> None:
    with pytest.raises(ConfigError, match="unknown base 'resnet9'"):
        build_model("CC,CC,CC,CC", "resnet9")
    with pytest.raises(PlacementError, match="stage 3 starts with M"):
        build_model("CC,CC,MC,CC", "tiny", image_size=32)
    with pytest.raises(PlacementError, match="not tiled by 7x7"):
        build_model("CC,CM,CC,CC", "tiny", image_size=32, window_size=7)
