"""Base networks: the ResNets that AlterNets are built from, as data.

A base fixes everything but the placement: block type, default depths, stage widths and the MSA shape per stage
(build-up rule 3: later stages get more heads, hence wider attention). Adding a base is adding one entry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from alternas.errors import ConfigError

BlockType = Literal["basic", "bottleneck"]


@dataclass(frozen=True)
class Base:
    """Shape of a pre-activation ResNet family member (PAPER.md §1.4).

    ``depths`` are the reference AlterNet depths (4 blocks in the last stage for 34/50/101/152, as in the paper's
    build-up); ``paper_msa_counts`` is the reference code's default ``num_blocks2`` for that constructor.
    """

    name: str
    block: BlockType
    depths: tuple[int, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    dim_head: int = 64
    stem_width: int = 64
    paper_msa_counts: tuple[int, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.depths)
        if not (len(self.widths) == len(self.heads) == n) or (
            self.paper_msa_counts is not None and len(self.paper_msa_counts) != n
        ):
            raise ConfigError(f"base {self.name!r}: depths, widths, heads (and paper_msa_counts) need {n} entries")

    @property
    def expansion(self) -> int:
        """Output channels of a block per unit of stage width: 1 for Basic, 4 for Bottleneck blocks."""
        return 4 if self.block == "bottleneck" else 1

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def num_features(self) -> int:
        return self.widths[-1] * self.expansion

    def to_dict(self) -> dict:
        return asdict(self)


_BASES: dict[str, Base] = {}


def register_base(base: Base, *, overwrite: bool = False) -> Base:
    """Make ``base`` available by name to ``build_model``, the CLI and the searches."""
    if base.name in _BASES and not overwrite:
        raise ConfigError(f"a base named {base.name!r} is already registered")
    _BASES[base.name] = base
    return base


_VARIANT_KEYS = ("heads_mult", "dim_head")


def get_base(name: str | Base) -> Base:
    """A registered base by name; ``"resnet50@heads_mult=2,dim_head=32"`` derives a variant with other MSA
    hyper-parameters (the searches use this, and the spec string rebuilds it anywhere, timm export included)."""
    if isinstance(name, Base):
        return name
    root, _, variant = name.partition("@")
    try:
        base = _BASES[root]
    except KeyError:
        raise ConfigError(f"unknown base {root!r}; choose one of: {', '.join(list_bases())}") from None
    if not variant:
        return base
    changes = {}
    for item in variant.split(","):
        key, _, value = item.partition("=")
        if key not in _VARIANT_KEYS:
            raise ConfigError(f"base variant {name!r}: unknown key {key!r}; use {' or '.join(_VARIANT_KEYS)}")
        try:
            changes[key] = float(value) if key == "heads_mult" else int(value)
        except ValueError:
            raise ConfigError(f"base variant {name!r}: {key} needs a number, got {value!r}") from None
    heads = tuple(max(1, round(h * changes.get("heads_mult", 1))) for h in base.heads)
    return replace(base, name=name, heads=heads, dim_head=changes.get("dim_head", base.dim_head))


def list_bases() -> list[str]:
    return list(_BASES)


_PAPER_COUNTS = (0, 1, 3, 2)  # the reference code's (ImageNet) default; the CIFAR-100 paper model is (0, 1, 1, 2)

register_base(Base("resnet18", "basic", (2, 2, 2, 2), paper_msa_counts=(0, 1, 1, 1),
                   description="pre-act ResNet-18 (BasicBlock)"))
register_base(Base("resnet34", "basic", (3, 4, 6, 4), paper_msa_counts=_PAPER_COUNTS,
                   description="pre-act ResNet-34 (BasicBlock), 4 blocks in the last stage as in AlterNet"))
register_base(Base("resnet50", "bottleneck", (3, 4, 6, 4), paper_msa_counts=_PAPER_COUNTS,
                   description="pre-act ResNet-50 (Bottleneck), 4 blocks in the last stage as in AlterNet"))
register_base(Base("resnet101", "bottleneck", (3, 4, 23, 4), paper_msa_counts=_PAPER_COUNTS,
                   description="pre-act ResNet-101 (Bottleneck), 4 blocks in the last stage as in AlterNet"))
register_base(Base("resnet152", "bottleneck", (3, 8, 36, 4), paper_msa_counts=_PAPER_COUNTS,
                   description="pre-act ResNet-152 (Bottleneck), 4 blocks in the last stage as in AlterNet"))
# CPU-sized bases: 2 blocks per stage so every stage can end in an MSA; rule 3 kept (heads double per stage).
register_base(Base("tiny", "basic", (2, 2, 2, 2), widths=(16, 32, 64, 128), heads=(1, 2, 4, 8), dim_head=16,
                   stem_width=16, paper_msa_counts=(0, 1, 1, 1),
                   description="CPU-sized pre-act ResNet (16-128 channels, ~0.5M params) for tests and quickstart"))
register_base(Base("small", "basic", (2, 2, 2, 2), widths=(32, 64, 128, 256), heads=(2, 4, 8, 16), dim_head=32,
                   stem_width=32, paper_msa_counts=(0, 1, 1, 1),
                   description="laptop-sized pre-act ResNet (32-256 channels)"))
