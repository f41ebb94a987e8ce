"""The AlterNet module: a pre-activation ResNet whose blocks are Conv or MSA as a placement says.

Topology (PAPER.md §1.1): stem -> stages -> BN -> ReLU -> global average pool -> linear. The model speaks timm
(``forward_features``/``forward_head``/``reset_classifier``/``pretrained_cfg``) and exposes its blocks in forward
order with tags (``units()``), which the diagnostics hook.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from alternas.models.bases import Base, get_base
from alternas.models.blocks import CONV_BLOCKS, AttentionPath, MSABlock, WindowAttention, attention_path
from alternas.placement import Placement, feature_sizes, validate_for_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
SMALL_IMAGE_MAX = 64  # images up to this size get the CIFAR stem (no pooling) and 4x4 windows


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
    """A ResNet base with Conv or MSA blocks placed as ``placement`` says."""

    def __init__(
        self,
        placement: str | Placement,
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
    ) -> None:
        super().__init__()
        self.placement = Placement.parse(placement)
        self.base = get_base(base)
        self.img_size = _as_size(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.window_size = window_size or default_window_size(self.img_size)
        self.stem_pool = self.img_size > SMALL_IMAGE_MAX if stem_pool is None else stem_pool
        self.drop_path_rate = drop_path_rate
        validate_for_model(
            self.placement,
            num_stages=self.base.num_stages,
            image_size=self.img_size,
            window_size=self.window_size,
            stem_pool=self.stem_pool,
        )
        small = self.img_size <= SMALL_IMAGE_MAX
        self.mean = tuple(mean or (CIFAR100_MEAN if small else IMAGENET_MEAN))
        self.std = tuple(std or (CIFAR100_STD if small else IMAGENET_STD))

        b = self.base
        sizes = feature_sizes(self.img_size, b.num_stages, self.stem_pool)
        stem_layers: dict[str, nn.Module] = {}
        if self.stem_pool:
            stem_layers["conv"] = nn.Conv2d(in_chans, b.stem_width, 7, stride=2, padding=3, bias=False)
            stem_layers["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            stem_layers["conv"] = nn.Conv2d(in_chans, b.stem_width, 3, stride=1, padding=1, bias=False)
        self.stem = nn.Sequential(OrderedDict(stem_layers))
        infos = [BlockInfo("stem", -1, 0, "stem", self.stem_pool, in_chans, b.stem_width, sizes[0])]

        # Linear stochastic-depth schedule over all blocks of all stages: 0 for the first, drop_path for the last.
        total = sum(self.placement.depths)
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        conv_cls = CONV_BLOCKS[b.block]
        channels, j = b.stem_width, 0
        stages = []
        for s, letters in enumerate(self.placement.stages):
            blocks = []
            for i, letter in enumerate(letters):
                stride = 2 if (s > 0 and i == 0) else 1
                if letter == "M":
                    block: nn.Module = MSABlock(
                        channels, b.widths[s], expansion=b.expansion, heads=b.heads[s], dim_head=b.dim_head,
                        window_size=self.window_size, stride=stride, drop_path=rates[j],
                    )
                else:
                    block = conv_cls(channels, b.widths[s], stride=stride, drop_path=rates[j])
                out = b.widths[s] * b.expansion
                infos.append(BlockInfo(
                    f"stages.{s}.{i}", s, i, "msa" if letter == "M" else "conv", stride != 1, channels, out,
                    sizes[s], b.heads[s] if letter == "M" else 0, self.window_size if letter == "M" else 0,
                ))
                blocks.append(block)
                channels, j = out, j + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.block_infos: tuple[BlockInfo, ...] = tuple(infos)

        self.num_features = channels
        self.final_norm = nn.BatchNorm2d(channels)
        self.final_act = nn.ReLU()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = self._default_cfg()
        if zero_init_last:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    # -- timm interface ------------------------------------------------------------------------------------------
    def _default_cfg(self) -> dict[str, Any]:
        return {
            "architecture": "alternet",
            "input_size": (self.in_chans, self.img_size, self.img_size),
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0 if self.img_size <= SMALL_IMAGE_MAX else 0.875,
            "mean": self.mean,
            "std": self.std,
            "num_classes": self.num_classes,
            "first_conv": "stem.conv",
            "classifier": "fc",
        }

    @property
    def model_args(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (JSON-serialisable; what an export stores)."""
        return {
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

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- introspection for diagnostics ---------------------------------------------------------------------------
    def units(self) -> Iterator[tuple[BlockInfo, nn.Module]]:
        """The stem and every block, in forward order, with their tags (the paper's ``blocks`` list minus the
        classifier)."""
        modules = [self.stem] + [block for stage in self.stages for block in stage]
        return zip(self.block_infos, modules, strict=True)

    def set_attention_path(self, path: AttentionPath) -> None:
        """Run every MSA on ``path``: "auto" (SDPA where it has a fused kernel), "sdpa" or "math"."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.path = path


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
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, model.in_chans, model.img_size, model.img_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), attention_path(model, "math"), counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())
