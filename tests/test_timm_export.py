import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import alternas  # noqa: F401  (registers the timm entrypoints)
from alternas.errors import ConfigError
from alternas.models import build_model, count_parameters
from alternas.models.timm_hub import export_to_timm
from tests.helpers import run_cli


def test_timm_lists_and_builds_the_presets() -> None:
    names = timm.list_models("alternet*")
    for name in ["alternet", "alternet18", "alternet34", "alternet50", "alternet101", "alternet152",
                 "alternet50_cifar100"]:
        assert name in names
    model = timm.create_model("alternet50_cifar100")
    assert count_parameters(model) == 33_012_840
    assert str(model.placement) == "CCC,CCCM,CCCCCM,CMCM"
    assert str(timm.create_model("alternet50", num_classes=10).placement) == "CCC,CCCM,CMCMCM,CMCM"
    generic = timm.create_model("alternet", placement="CC,CM,CM,CM", base="tiny", num_classes=5, img_size=32)
    assert generic(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_export_round_trip_through_timm_local_dir(tmp_path) -> None:
    source = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    with torch.no_grad():  # make BN statistics non-trivial so that a missed buffer would show
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    out = export_to_timm(source, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "alternet"
    assert config["model_args"]["placement"] == "CC,CM,CM,CM" and config["model_args"]["base"] == "tiny"
    assert (out / "model.safetensors").is_file()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - source(x)).abs().max().item() <= 1e-6


def test_export_refuses_to_overwrite(tmp_path) -> None:
    model = build_model("CC,CC,CC,CC", "tiny", num_classes=2, image_size=32)
    export_to_timm(model, tmp_path)
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        export_to_timm(model, tmp_path)
    export_to_timm(model, tmp_path, force=True)


def test_cli_export_with_checkpoint_loads_in_a_fresh_timm_process(tmp_path) -> None:
    model = build_model("CC,CM,CM,CM", "tiny", num_classes=10, image_size=32).eval()
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    out = tmp_path / "exp"
    res = run_cli("export", "--base", "tiny", "--placement", "CC,CM,CM,CM", "--num-classes", "10", "--image-size",
                  "32", "--checkpoint", str(tmp_path / "weights.safetensors"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    torch.save(torch.randn(2, 3, 32, 32), tmp_path / "x.pt")
    check = (
        "import alternas, timm, torch; m = timm.create_model('local-dir:{out}', pretrained=True).eval(); "
        "x = torch.load('{x}', weights_only=True); torch.save(m(x).detach(), '{y}')"
    ).format(out=out, x=tmp_path / "x.pt", y=tmp_path / "y.pt")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=300)
    with torch.no_grad():
        expected = model(torch.load(tmp_path / "x.pt", weights_only=True))
    assert torch.allclose(torch.load(tmp_path / "y.pt", weights_only=True), expected, atol=1e-6)
    res = run_cli("export", "--base", "tiny", "--placement", "CC,CM,CM,CM", "--num-classes", "3", "--image-size",
                  "32", "--checkpoint", str(tmp_path / "weights.safetensors"), "--out", str(tmp_path / "e2"))
    assert res.returncode == 2 and "does not fit this architecture" in res.stderr


def test_load_weights_reads_wrapped_checkpoints_and_refuses_others_in_one_line(tmp_path) -> None:
    from alternas.models.timm_hub import load_weights

    source = build_model("CC,CM,CM,CM", "tiny", num_classes=4, image_size=32)
    ddp = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    torch.save(ddp, tmp_path / "ddp.pth")
    target = build_model("CC,CM,CM,CM", "tiny", num_classes=4, image_size=32)
    load_weights(target, tmp_path / "ddp.pth")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name in ("junk.pth", "tensor.pth"):
        with pytest.raises(ConfigError, match="damaged or not a weights file") as err:
            load_weights(target, tmp_path / name)
        assert "\n" not in str(err.value)
