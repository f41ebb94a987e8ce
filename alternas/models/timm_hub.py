"""The timm bridge: ``alternet*`` entrypoints and export to a folder that ``timm.create_model`` loads.

``import alternas`` registers the entrypoints; ``timm.create_model("local-dir:DIR", pretrained=True)`` then
rebuilds an exported model from ``DIR/config.json`` (its ``model_args``) and loads ``DIR/model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    load_state_dict,
    register_model,
    save_for_hf,
)

from alternas.errors import ConfigError
from alternas.fileio import DAMAGED_FILE_ERRORS
from alternas.models.alternet import CIFAR100_MEAN, CIFAR100_STD, AlterNet, data_cfg

PAPER_CIFAR100_PLACEMENT = "CCC,CCCM,CCCCCM,CMCM"  # PAPER.md §1.4: Alter-ResNet-50 for CIFAR-100, 33.01 M params


def _cfg(**overrides: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "fixed_input_size": True,
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "fc",
        "license": "apache-2.0",
        **overrides,
    }


_cifar = dict(num_classes=100, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, mean=CIFAR100_MEAN,
              std=CIFAR100_STD)
default_cfgs = generate_default_cfgs({
    "alternet": _cfg(),
    "alternet18": _cfg(),
    "alternet34": _cfg(),
    "alternet50": _cfg(),
    "alternet101": _cfg(),
    "alternet152": _cfg(),
    "alternet50_cifar100": _cfg(**_cifar),
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> AlterNet:
    # The registered cfg describes the variant's default input; the arguments may ask for another (img_size=32),
    # and the cfg that the model and timm's feature wrappers carry must say so.
    registered = get_pretrained_cfg(variant)
    in_chans, height, _ = registered.input_size
    input_args = {k: kwargs[k] for k in ("in_chans", "img_size", "stem_pool", "mean", "std") if k in kwargs}
    overlay = data_cfg(kwargs.get("base", "resnet50"), **{"in_chans": in_chans, "img_size": height, **input_args})
    if "num_classes" in kwargs:
        overlay["num_classes"] = kwargs["num_classes"]
    overlay |= kwargs.pop("pretrained_cfg_overlay", None) or {}
    kwargs.setdefault("weight_init", "timm")  # timm's ResNet init for timm users; searches keep torch's defaults
    # stem and stage outputs are the feature levels; FeatureListNet finds them inside the Sequentials
    return build_model_with_cfg(AlterNet, variant, pretrained, pretrained_cfg_overlay=overlay,
                                feature_cfg={"flatten_sequential": True}, **kwargs)


@register_model
def alternet(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """Generic AlterNet: ``placement=`` and ``base=`` (e.g. ``placement="CC,CM,CM,CM", base="resnet18"``).

    Without them it is the ImageNet AlterNet-50 (``resnet50`` base, the reference placement ``CCC,CCCM,CMCMCM,CMCM``),
    like ``alternet50``.
    """
    return _create("alternet", pretrained, **kwargs)


@register_model
def alternet18(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """Reference ``dnn_18``: ResNet-18 base, MSA counts (0, 1, 1, 1)."""
    return _create("alternet18", pretrained, base="resnet18", **kwargs)


@register_model
def alternet34(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """Reference ``dnn_34``: ResNet-34 base (3, 4, 6, 4), MSA counts (0, 1, 3, 2)."""
    return _create("alternet34", pretrained, base="resnet34", **kwargs)


@register_model
def alternet50(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """Reference ``dnn_50`` (the ImageNet AlterNet-50): (3, 4, 6, 4) blocks, MSA counts (0, 1, 3, 2)."""
    return _create("alternet50", pretrained, base="resnet50", **kwargs)


@register_model
def alternet101(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """Reference ``dnn_101``: (3, 4, 23, 4) blocks, MSA counts (0, 1, 3, 2)."""
    return _create("alternet101", pretrained, base="resnet101", **kwargs)


@register_model
def alternet152(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """Reference ``dnn_152``: (3, 8, 36, 4) blocks, MSA counts (0, 1, 3, 2)."""
    return _create("alternet152", pretrained, base="resnet152", **kwargs)


@register_model
def alternet50_cifar100(pretrained: bool = False, **kwargs: Any) -> AlterNet:
    """The paper's CIFAR-100 Alter-ResNet-50 (``CCC,CCCM,CCCCCM,CMCM``, 4x4 windows, 33.01 M parameters)."""
    kwargs.setdefault("placement", PAPER_CIFAR100_PLACEMENT)
    kwargs.setdefault("window_size", 4)
    return _create("alternet50_cifar100", pretrained, base="resnet50", **kwargs)


# -- export / load ---------------------------------------------------------------------------------------------------
def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights safely (timm's reader: safetensors, or a torch checkpoint with ``weights_only=True``, unwrapped
    from a ``state_dict``/``model`` entry and DDP's ``module.`` prefix), checking the fit ourselves: timm's
    ``load_checkpoint`` reports a mismatch as PyTorch's multi-line key listing, not one line a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = load_state_dict(str(path), use_ema=False)
    except (*DAMAGED_FILE_ERRORS, AttributeError) as err:  # AttributeError: a pickle that holds no mapping
        raise ConfigError(f"checkpoint {path} is damaged or not a weights file ({type(err).__name__}); "
                          "re-run the candidate's search to rewrite it, or give another file") from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds no state dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ConfigError(
            f"checkpoint {path} does not fit this architecture: {len(missing)} missing, {len(unexpected)} "
            f"unexpected and {len(wrong)} mis-shaped tensors (first: {first}); check --placement/--base/--num-classes"
        )
    model.load_state_dict(state)


def model_from_run(run_dir: str | Path) -> AlterNet:
    """Rebuild a trained model from a run folder (``config.yaml`` model arguments + ``model.safetensors``)."""
    from alternas.train.run import read_run_config

    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not (run_dir / "config.yaml").is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir} is not a finished run (needs config.yaml and model.safetensors)")
    config = read_run_config(run_dir)
    try:
        model = AlterNet(**dict(config["model"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{run_dir / 'config.yaml'} is damaged ({type(err).__name__}: {err}); re-run the "
                          "candidate's search to rewrite it") from None
    load_weights(model, weights)
    return model.eval()


def export_to_timm(model: AlterNet, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``timm.create_model("local-dir:OUT")`` loads."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export target {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"export folder {out} is not empty; pass --force to overwrite it or choose another --out")
    cfg = {**model.pretrained_cfg, "architecture": "alternet"}
    model.pretrained_cfg = cfg
    save_for_hf(model, str(out), model_args=model.model_args, safe_serialization=True)
    return out
