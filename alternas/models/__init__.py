"""Models: bases (data), blocks, the AlterNet builder and the timm bridge."""

from alternas.models.alternet import AlterNet, BlockInfo, build_model, count_flops, count_parameters
from alternas.models.bases import Base, get_base, list_bases, register_base

__all__ = [
    "AlterNet", "Base", "BlockInfo", "build_model", "count_flops", "count_parameters", "get_base", "list_bases",
    "register_base",
]
