"""AlterNets as first-class timm models: what timm's own generic model tests check, on CPU-sized nets."""

import pytest
import timm
import torch
from timm.layers import get_notrace_functions
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torchvision.models.feature_extraction import create_feature_extractor

import alternas  # noqa: F401  (registers the timm entrypoints)
from alternas.errors import ConfigError
from alternas.models import build_model
from alternas.models.blocks import WindowAttention
from alternas.models.timm_hub import export_to_timm

ENTRYPOINTS = ["alternet", "alternet18", "alternet34", "alternet50", "alternet101", "alternet152",
               "alternet50_cifar100"]
TINY = dict(base="tiny", placement="CC,CM,CM,CM", img_size=32, num_classes=10)


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("alternet", **{**TINY, **overrides}).eval()


@pytest.mark.parametrize("name", ENTRYPOINTS)
def test_every_entrypoint_builds_without_arguments_with_a_cfg_that_matches_it(name: str) -> None:
    model = timm.create_model(name, device="meta")
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg
    c, h, w = cfg["input_size"]
    x = torch.empty(1, c, h, w, device="meta")
    features = model.forward_features(x)
    assert tuple(features.shape[-2:]) == cfg["pool_size"] and features.shape[1] == model.num_features
    assert model.head_hidden_size == model.num_features
    assert model(x).shape == (1, cfg["num_classes"])
    assert all(p.device.type == "meta" for p in model.parameters())


def test_cfg_follows_the_arguments_not_the_registered_default() -> None:
    model = tiny()
    assert model.default_cfg["input_size"] == (3, 32, 32) and model.default_cfg["pool_size"] == (4, 4)
    assert model.default_cfg["num_classes"] == 10
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    features = timm.create_model("alternet", features_only=True, **TINY)
    assert features.default_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("feature_cls", ["list", "getter"])
def test_features_only_gives_the_stem_and_every_stage(feature_cls: str) -> None:
    model = tiny()
    torch.manual_seed(0)  # the same weights as ``model``
    extractor = timm.create_model("alternet", features_only=True, feature_cls=feature_cls, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = extractor(x)
    assert extractor.feature_info.channels() == [16, 16, 32, 64, 128]
    assert extractor.feature_info.reduction() == [1, 1, 2, 4, 8]
    with torch.no_grad():
        _, expected = model.forward_intermediates(x)
    for out, want, channels, reduction in zip(outs, expected, extractor.feature_info.channels(),
                                              extractor.feature_info.reduction(), strict=True):
        assert out.shape == (2, channels, 32 // reduction, 32 // reduction)
        assert torch.allclose(out, want, atol=1e-6)
    picked = timm.create_model("alternet", features_only=True, out_indices=(2, 4), feature_cls=feature_cls, **TINY)
    assert [o.shape[1] for o in picked(x)] == [32, 128]


def test_forward_intermediates_follow_timms_conventions() -> None:
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [16, 16, 32, 64, 128]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2 and torch.equal(last_two[0], inter[3])
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        assert torch.equal(normed, final) and not torch.equal(inter[-1], final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    kept = model.prune_intermediate_layers([1, 2])
    assert kept == [1, 2] and len(model.stages) == 2 and model.num_features == 32


def test_torchscript_and_fx_give_the_eager_output() -> None:
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(torch.jit.script(model)(x), expected, atol=1e-5)
        assert torch.allclose(torch.fx.symbolic_trace(model)(x), expected, atol=1e-5)
    # FX in training mode, through torchvision's feature extractor as detection/segmentation code uses it
    train = tiny().train()
    extractor = create_feature_extractor(train, return_nodes={"stages.3": "c5", "fc": "logits"},
                                         tracer_kwargs={"autowrap_functions": get_notrace_functions()})
    out = extractor(x)
    assert out["c5"].shape == (2, 128, 4, 4)
    out["logits"].mean().backward()
    assert all(p.grad is not None for p in extractor.parameters())


def test_gradient_checkpointing_keeps_outputs_and_gradients() -> None:
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model = tiny(drop_path_rate=0.0).train()
        model.set_grad_checkpointing(checkpointing)
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
    assert len(inter) == 5


def test_no_weight_decay_names_the_relative_position_tables_and_timms_optimizer_honours_it() -> None:
    model = tiny()
    tables = {name for name, m in model.named_modules() if isinstance(m, WindowAttention)}
    assert model.no_weight_decay() == {f"{t}.relative_position_bias" for t in tables} and len(tables) == 3
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    undecayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[name]) in undecayed for name in model.no_weight_decay())
    assert id(params["stages.3.1.attn.qkv.weight"]) not in undecayed


def test_group_matcher_gives_layer_wise_lr_decay_by_depth() -> None:
    model = tiny()
    groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.5)
    names = {id(p): name for name, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["stem.conv.weight"] < scale["stages.0.0.conv1.weight"] < scale["stages.3.1.attn.qkv.weight"]
    assert scale["fc.weight"] == 1.0
    coarse = model.group_matcher(coarse=True)
    assert coarse["blocks"] == r"^stages\.(\d+)"


def test_norm_and_act_layers_by_name_survive_export(tmp_path) -> None:
    model = tiny(act_layer="silu", attn_act_layer="relu")
    assert isinstance(model.stages[0][0].act1, torch.nn.SiLU) and isinstance(model.final_act, torch.nn.SiLU)
    assert isinstance(model.stages[1][1].act1, torch.nn.ReLU)
    out = export_to_timm(model, tmp_path / "exported")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert isinstance(loaded.stages[0][0].act1, torch.nn.SiLU)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert "act_layer" not in tiny().model_args  # defaults are not written: older exports stay identical
    with pytest.raises(ConfigError, match="by name"):
        _ = tiny(act_layer=torch.nn.SiLU).model_args


def test_standard_initialisation() -> None:
    model = timm.create_model("alternet50_cifar100")
    conv = model.stages[2][3].conv2  # 3x3, 256 -> 256
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.02)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and not model.fc.bias.any()
    table = model.stages[3][3].attn.relative_position_bias
    assert table.std().item() == pytest.approx(0.02, rel=0.5)  # the paper's N(0, 0.02²), 7x7 values
    norm = model.stages[1][0].norm1
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    searched = build_model("CCC,CCCM,CCCCCM,CMCM", "resnet50", num_classes=100, image_size=32)  # torch's defaults
    assert searched.stages[2][3].conv2.weight.std().item() == pytest.approx((1 / (3 * 9 * 256)) ** 0.5, rel=0.02)
    with pytest.raises(ConfigError, match="weight_init"):
        build_model("C,C,C,C", "tiny", image_size=32, weight_init="xavier")


def test_an_exported_folder_gives_features_at_chosen_levels(tmp_path) -> None:
    model = tiny()
    out = export_to_timm(model, tmp_path / "exported")
    extractor = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True, out_indices=(3, 4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, expected = model.forward_intermediates(x)
        got = extractor(x)
    assert len(got) == 2 and torch.allclose(got[0], expected[3], atol=1e-6)
    assert torch.allclose(got[1], expected[4], atol=1e-6)
