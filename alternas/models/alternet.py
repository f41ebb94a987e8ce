"""The AlterNet module: a pre-activation ResNet whose blocks are Conv or MSA as a placement says.

Topology (PAPER.md §1.1): stem -> stages -> BN -> ReLU -> global average pool -> linear. The model speaks timm
(``forward_features``/``forward_head``/``reset_classifier``/``pretrained_cfg``) and exposes its blocks in forward
order with tags (``units()``), which the diagnostics hook.

Why one module over the ~400-line guide: the model and the timm interface it must speak (features, heads, grad
checkpointing, ``forward_intermediates``, TorchScript/FX-friendly annotations) belong to one class; the
blocks are in ``blocks.py`` and the bases in ``bases.py``.

One private import: timm (1.0.31) exports ``feature_take_indices`` only from ``timm.models._features``, where its own
models import it, and no upstream issue asks to export it (searched); a timm release that moves it fails
``tests/test_timm_models.py`` first.
"""

# No ``from __future__ import annotations`` here: FX copies ``forward``'s annotations into the code it generates,
# and TorchScript cannot read them back as strings.
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, get_act_layer, get_norm_layer
from timm.models import checkpoint_seq, named_apply
from timm.models._features import feature_take_indices  # private: see the module docstring
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alternas.data.datasets import CIFAR_STATS
from alternas.errors import ConfigError
from alternas.models.bases import Base, get_base
from alternas.models.blocks import (
    CONV_BLOCKS,
    AttentionPath,
    LayerType,
    MSABlock,
    WindowAttention,
    attention_path,
    eval_mode,
)
from alternas.placement import Placement, feature_sizes, validate_for_model

CIFAR100_MEAN, CIFAR100_STD = CIFAR_STATS["cifar100"]
SMALL_IMAGE_MAX = 64  # images up to this size get the CIFAR stem (no pooling) and 4x4 windows


def default_stem_pool(image_size: int) -> bool:
    """ImageNet-sized inputs get the 7x7/2 conv + max-pool stem; CIFAR-sized ones a 3x3/1 conv (PAPER.md §1.1)."""
    return image_size > SMALL_IMAGE_MAX


def default_window_size(image_size: int) -> int:
    """4 for CIFAR-sized inputs (the only size >1 tiling 16/8/4 maps), 7 for ImageNet-sized (PAPER.md §1.4)."""
    return 4 if image_size <= SMALL_IMAGE_MAX else 7


@dataclass(frozen=True)
class BlockInfo:
    """Tags of one unit of the network, in forward order; the stem is unit 0."""

    name: str  # module path, e.g. "stages.3.1"
    stage: int  # 0-based stage; -1 for the stem
    index: int  # 0-based index within the stage
    kind: Literal["stem", "conv", "msa"]
    subsamples: bool  # changes the spatial size (stem with pooling, first block of stages 2..)
    in_channels: int
    out_channels: int
    feature_size: int  # spatial size of the output map
    heads: int = 0
    window_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_size(img_size: int | tuple[int, int] | list[int]) -> int:
    """timm passes ``img_size`` as (H, W); AlterNet windows need square maps."""
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    if h != w:
        raise ValueError(f"AlterNet needs square images, got img_size={tuple(img_size)}")
    return int(h)


class AlterNet(nn.Module):
    """A ResNet base with Conv or MSA blocks placed as ``placement`` says.

    ``placement=None`` takes the base's reference placement (the reference code's ``num_blocks2`` on its depths),
    so that every timm entrypoint builds without arguments. ``norm_layer``/``act_layer`` (names or classes, as in
    timm's byobnet) replace BN and ReLU everywhere; ``attn_act_layer`` is the MSA blocks' GELU.
    """

    __jit_unused_properties__ = ["default_cfg", "model_args"]  # plain Python, not part of the scripted model

    def __init__(
        self,
        placement: str | Placement | None = None,
        base: str | Base = "resnet50",
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        window_size: int | None = None,
        drop_path_rate: float = 0.1,
        stem_pool: bool | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        zero_init_last: bool = False,
        global_pool: str = "avg",
        weight_init: Literal["torch", "timm"] = "torch",
        norm_layer: str | LayerType = "batchnorm2d",
        act_layer: str | LayerType = "relu",
        attn_act_layer: str | LayerType = "gelu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base = get_base(base)
        if placement is None:
            placement = reference_placement(self.base)
        self.placement = Placement.parse(placement)
        self.img_size = _as_size(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.window_size = window_size or default_window_size(self.img_size)
        self.stem_pool = default_stem_pool(self.img_size) if stem_pool is None else stem_pool
        self.drop_path_rate = drop_path_rate
        self.grad_checkpointing = False
        validate_for_model(
            self.placement,
            num_stages=self.base.num_stages,
            image_size=self.img_size,
            window_size=self.window_size,
            stem_pool=self.stem_pool,
        )
        input_cfg = data_cfg(self.base, self.img_size, in_chans, self.stem_pool, mean, std)
        self.mean, self.std = input_cfg["mean"], input_cfg["std"]
        self._layer_names = {k: v for k, v in (("norm_layer", norm_layer), ("act_layer", act_layer),
                                               ("attn_act_layer", attn_act_layer)) if isinstance(v, str)}
        norm, act, attn_act = get_norm_layer(norm_layer), get_act_layer(act_layer), get_act_layer(attn_act_layer)

        sizes = feature_sizes(self.img_size, self.base.num_stages, self.stem_pool)
        self.stem, stem_info, stem_feature = self._make_stem(in_chans, sizes[0])
        self.stages, channels, infos, features = self._make_stages(sizes, norm, act, attn_act)
        self.block_infos: tuple[BlockInfo, ...] = (stem_info, *infos)
        self.feature_info = [stem_feature, *features]

        self.num_features = self.head_hidden_size = channels
        self.final_norm = norm(channels)
        self.final_act = act()
        self.global_pool, self.fc = create_classifier(channels, num_classes, pool_type=global_pool)
        self.pretrained_cfg = {"architecture": "alternet", **input_cfg, "num_classes": num_classes}
        if weight_init == "timm":
            self.init_weights()
        elif weight_init != "torch":
            raise ConfigError(f"weight_init must be 'torch' or 'timm', got {weight_init!r}")
        if zero_init_last:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _make_stem(self, in_chans: int, size: int) -> tuple[nn.Sequential, BlockInfo, dict[str, Any]]:
        """A 7x7 stride-2 conv and a max pool (ImageNet-sized inputs), else one 3x3 conv (CIFAR-sized); with its
        ``BlockInfo`` and ``feature_info`` entry."""
        width = self.base.stem_width
        layers: dict[str, nn.Module] = {}
        if self.stem_pool:
            layers["conv"] = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
            layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            layers["conv"] = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        info = BlockInfo("stem", -1, 0, "stem", self.stem_pool, in_chans, width, size)
        # module paths as timm's FeatureListNet sees them with flatten_sequential (the stem is a Sequential)
        feature = dict(num_chs=width, reduction=self.img_size // size, module=f"stem.{next(reversed(layers))}")
        return nn.Sequential(OrderedDict(layers)), info, feature

    def _make_stages(self, sizes: list[int], norm: LayerType, act: LayerType, attn_act: LayerType
                     ) -> tuple[nn.Sequential, int, list[BlockInfo], list[dict[str, Any]]]:
        """The stages, block by block as the placement says: (the stages, the channels they end with, each block's
        ``BlockInfo``, each stage's ``feature_info`` entry)."""
        b = self.base
        # Linear stochastic-depth schedule over all blocks of all stages: 0 for the first, drop_path for the last.
        total = sum(self.placement.depths)
        rates = iter([self.drop_path_rate * j / max(total - 1, 1) for j in range(total)])
        channels, stages, infos, features = b.stem_width, [], [], []
        for s, letters in enumerate(self.placement.stages):
            blocks = []
            for i, letter in enumerate(letters):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(self._make_block(letter, s, channels, stride, next(rates), norm, act, attn_act))
                out = b.widths[s] * b.expansion
                msa = letter == "M"
                infos.append(BlockInfo(
                    f"stages.{s}.{i}", s, i, "msa" if msa else "conv", stride != 1, channels, out, sizes[s],
                    b.heads[s] if msa else 0, self.window_size if msa else 0,
                ))
                channels = out
            stages.append(nn.Sequential(*blocks))
            features.append(dict(num_chs=channels, reduction=self.img_size // sizes[s], module=f"stages.{s}"))
        return nn.Sequential(*stages), channels, infos, features

    def _make_block(self, letter: str, stage: int, channels: int, stride: int, drop_path: float, norm: LayerType,
                    act: LayerType, attn_act: LayerType) -> nn.Module:
        """An MSA block (rule 3: the base gives later stages more heads) or the base's Conv block."""
        b = self.base
        if letter == "M":
            return MSABlock(channels, b.widths[stage], expansion=b.expansion, heads=b.heads[stage],
                            dim_head=b.dim_head, window_size=self.window_size, stride=stride, drop_path=drop_path,
                            norm_layer=norm, act_layer=attn_act)
        return CONV_BLOCKS[b.block](channels, b.widths[stage], stride=stride, drop_path=drop_path, norm_layer=norm,
                                    act_layer=act)

    def init_weights(self) -> None:
        """timm's ResNet initialisation: He-normal convs (fan-out), unit BN, small normal classifier; the
        relative-position tables keep their N(0, 0.02²) (PAPER.md §1.3). The timm entrypoints use it
        (``weight_init="timm"``); alternas' own searches keep PyTorch's layer defaults (``"torch"``), which the
        quickstart's 5-epoch proxy needs: with this init its start net fell from 99.6 % to 90.6 % validation
        accuracy and the seed spread of a comparison grew from 0.7 to 10 pp."""
        named_apply(_init_module, self)

    # -- timm interface ------------------------------------------------------------------------------------------
    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for ``pretrained_cfg``: one dict, so the two can never disagree."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @property
    def model_args(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (JSON-serialisable; what an export stores)."""
        if len(self._layer_names) < 3:
            raise ConfigError("this AlterNet was built with norm/act layers given as classes; give them by name "
                              "(e.g. norm_layer='batchnorm2d', act_layer='silu') so that it can be rebuilt")
        args = {
            "placement": str(self.placement),
            "base": self.base.name,
            "num_classes": self.num_classes,
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "window_size": self.window_size,
            "stem_pool": self.stem_pool,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        # non-default layers only, so configs written before these arguments existed stay identical
        defaults = {"norm_layer": "batchnorm2d", "act_layer": "relu", "attn_act_layer": "gelu"}
        return args | {k: v for k, v in self._layer_names.items() if v != defaults[k]}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay: the stem, then each stage (coarse) or block."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(\d+)", None), (r"^final_norm", (99999,))]}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative-position tables: biases, not weights (timm's optimizer factory reads this)."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        like = next(self.parameters())  # the new head lives where the model does
        global_pool, fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)
        self.global_pool = global_pool.train(self.training)
        self.fc = fc.to(device=like.device, dtype=like.dtype).train(self.training)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's and each stage's output (timm's convention: index 0 is the stem, ``indices`` an int takes
        the last n); ``norm`` applies the final BN-ReLU to the last stage's, as ``forward_features`` does."""
        if output_fmt != "NCHW":
            raise ValueError(f"AlterNet intermediates are NCHW, not {output_fmt}")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        last = len(self.stages)
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = self._run_stage(stage, x)
            if feat_idx in take_indices:
                intermediates.append(self.final_act(self.final_norm(x)) if norm and feat_idx == last else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last:
            x = self.final_act(self.final_norm(x))
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the taken intermediates do not need (timm's ``features_only`` with ``feature_cls='getter'``)."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_norm or prune_end:
            self.final_norm, self.final_act = nn.Identity(), nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- introspection for diagnostics ---------------------------------------------------------------------------
    @torch.jit.ignore
    def units(self) -> Iterator[tuple[BlockInfo, nn.Module]]:
        """The stem and every block, in forward order, with their tags (the paper's ``blocks`` list minus the
        classifier)."""
        modules = [self.stem] + [block for stage in self.stages for block in stage]
        return zip(self.block_infos, modules, strict=True)

    @torch.jit.ignore
    def set_attention_path(self, path: AttentionPath) -> None:
        """Run every MSA on ``path``: "auto" (SDPA where it has a fused kernel), "sdpa" or "math"."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.path = path


def data_cfg(
    base: str | Base,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    stem_pool: bool | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """The timm pretrained-cfg entries that follow from an AlterNet's input (what ``timm.data.resolve_data_config``
    and timm's feature wrappers read): known before the model is built, so the registry and the model agree."""
    size = _as_size(img_size)
    small = size <= SMALL_IMAGE_MAX
    pool = default_stem_pool(size) if stem_pool is None else stem_pool
    final = feature_sizes(size, get_base(base).num_stages, pool)[-1]
    return {
        "input_size": (in_chans, size, size),
        "fixed_input_size": True,
        "pool_size": (final, final),
        "interpolation": "bicubic",
        "crop_pct": 1.0 if small else 0.875,
        "mean": tuple(mean or (CIFAR100_MEAN if small else IMAGENET_DEFAULT_MEAN)),
        "std": tuple(std or (CIFAR100_STD if small else IMAGENET_DEFAULT_STD)),
        "first_conv": "stem.conv",
        "classifier": "fc",
    }


def _init_module(module: nn.Module, name: str = "") -> None:
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0, 0.01)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def reference_placement(base: str | Base) -> str:
    """The reference code's default for ``base``: its ``num_blocks2`` MSA counts on the base's AlterNet depths
    (all Conv where the base names none)."""
    b = get_base(base)
    counts = b.paper_msa_counts or (0,) * b.num_stages
    return str(Placement.from_counts(b.depths, counts))


def build_model(
    placement: str | Placement,
    base: str | Base = "resnet50",
    num_classes: int = 1000,
    image_size: int = 224,
    window_size: int | None = None,
    drop_path: float = 0.1,
    **overrides: Any,
) -> AlterNet:
    """Build the AlterNet that ``placement`` describes on ``base`` (PAPER.md §1).

    ``overrides`` go to :class:`AlterNet` (``in_chans``, ``stem_pool``, ``mean``, ``std``, ``zero_init_last``). Raises
    ``PlacementError``/``ConfigError`` with an actionable message for a placement the base cannot take.
    """
    return AlterNet(
        placement, base, num_classes=num_classes, img_size=image_size, window_size=window_size,
        drop_path_rate=drop_path, **overrides,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: AlterNet) -> int:
    """Forward FLOPs for one image (a multiply-add counts 2), counted by ``FlopCounterMode``.

    Attention is counted on the math path: not every backend's fused SDPA kernel is known to the counter.
    """
    param = next(model.parameters())
    x = torch.zeros(1, model.in_chans, model.img_size, model.img_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), eval_mode(model), attention_path(model, "math"), counter:
        model(x)
    return int(counter.get_total_flops())
