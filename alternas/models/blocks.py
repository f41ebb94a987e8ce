"""The building blocks of an AlterNet, exactly as PAPER.md §1.2-1.3 describes the reference code.

All blocks are pre-activation: BN and the activation come before each conv, and the projection shortcut (when a
block changes shape) takes the pre-activated input. Stochastic depth drops the residual branch per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function
from torch import nn

LayerType = Callable[..., nn.Module]


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class _PreActResidual(nn.Module):
    """Shared pre-activation wiring: ``out = drop_path(branch(act(bn(x)))) + skip``.

    With a projection shortcut the skip is computed from the pre-activated input; with an identity shortcut it
    is the raw input (PAPER.md §1.2).
    """

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int, drop_path: float, norm_layer: LayerType,
                 act_layer: LayerType) -> None:
        super().__init__()
        self.norm1 = norm_layer(c_in)
        self.act1 = act_layer()
        self.shortcut = _conv1x1(c_in, c_out, stride) if stride != 1 or c_in != c_out else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_layer(self) -> nn.Module:
        """The layer that ends the residual branch."""
        raise NotImplementedError

    def zero_init_last(self) -> None:
        """Zero the branch's last layer, so the block starts as its shortcut (timm's ``zero_init_last``).

        A net of such blocks starts close to a shallow one and leaves the chance-level plateau sooner; short
        trainings then depend far less on the seed.
        """
        last = self.last_layer()
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return self.drop_path(self.branch(pre)) + skip


class BasicBlock(_PreActResidual):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, drop_path: float = 0.0,
                 norm_layer: LayerType = nn.BatchNorm2d, act_layer: LayerType = nn.ReLU) -> None:
        super().__init__(c_in, planes * self.expansion, stride, drop_path, norm_layer, act_layer)
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.norm2 = norm_layer(planes)
        self.act2 = act_layer()
        self.conv2 = _conv3x3(planes, planes * self.expansion)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act2(self.norm2(self.conv1(x))))

    def last_layer(self) -> nn.Module:
        return self.conv2


class Bottleneck(_PreActResidual):
    """1x1 reduce, 3x3 (carrying the stride, ResNet v1.5 style), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, drop_path: float = 0.0,
                 norm_layer: LayerType = nn.BatchNorm2d, act_layer: LayerType = nn.ReLU) -> None:
        super().__init__(c_in, planes * self.expansion, stride, drop_path, norm_layer, act_layer)
        self.conv1 = _conv1x1(c_in, planes)
        self.norm2 = norm_layer(planes)
        self.act2 = act_layer()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.norm3 = norm_layer(planes)
        self.act3 = act_layer()
        self.conv3 = _conv1x1(planes, planes * self.expansion)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.norm2(self.conv1(x)))
        return self.conv3(self.act3(self.norm3(self.conv2(x))))

    def last_layer(self) -> nn.Module:
        return self.conv3


def relative_position_index(window_size: int) -> torch.Tensor:
    """Flat index into the (2p-1)x(2p-1) bias table for every (query, key) pair of a p x p window.

    Positions are row-major; for query a and key b the offset is pos[b] - pos[a] shifted by p-1 (PAPER.md §1.3).
    """
    p = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")).flatten(1).T  # (p², 2)
    rel = coords[None, :, :] - coords[:, None, :] + (p - 1)  # [a, b] = pos[b] - pos[a] + p - 1
    return rel[..., 0] * (2 * p - 1) + rel[..., 1]


AttentionPath = Literal["auto", "sdpa", "math"]


def _sdpa_is_fused(q: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether SDPA runs a fused kernel here (see ``WindowAttention``): anywhere but in CPU training of the bias."""
    return q.device.type != "cpu" or not (torch.is_grad_enabled() and bias.requires_grad)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, its own mode restored afterwards, even on an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def attention_path(model: nn.Module, path: AttentionPath) -> Iterator[nn.Module]:
    """Run every MSA of ``model`` on ``path`` inside the block, restoring each one's own path afterwards."""
    attns = [m for m in model.modules() if isinstance(m, WindowAttention)]
    before = [m.path for m in attns]
    for m in attns:
        m.path = path
    try:
        yield model
    finally:
        for m, state in zip(attns, before):
            m.path = state


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping p x p windows (no shift), no FFN.

    One learnable relative-position bias table per block, shared by all heads and windows. Queries, keys and
    values come from one fused 1x1 conv (the reference's ``to_q`` and ``to_kv`` with k=1, same parameter count);
    the output projection is a 1x1 conv with bias.

    ``path`` picks the kernel. ``"auto"`` (default) runs ``scaled_dot_product_attention`` wherever PyTorch has a
    fused kernel for it: on CUDA, and on the CPU when no gradient flows to the bias (inference, diagnostics).
    PyTorch's CPU flash kernel cannot return the gradient of an additive mask, so in CPU training SDPA falls back
    to its composite math kernel, no faster than the plain path (``alternas bench attention`` measures both);
    there "auto" takes the plain path. ``"sdpa"`` always calls SDPA; ``"math"`` always runs the plain
    math, which is twice differentiable (Hessian-vector products need that).
    """

    def __init__(self, c_in: int, c_out: int, heads: int, dim_head: int, window_size: int) -> None:
        super().__init__()
        self.heads, self.dim_head, self.window_size = heads, dim_head, window_size
        inner = heads * dim_head
        self.qkv = _conv1x1(c_in, 3 * inner)
        self.proj = nn.Conv2d(inner, c_out, kernel_size=1, bias=True)
        self.relative_position_bias = nn.Parameter(torch.empty(2 * window_size - 1, 2 * window_size - 1))
        nn.init.normal_(self.relative_position_bias, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.path: AttentionPath = "auto"

    def position_bias(self) -> torch.Tensor:
        """The (p², p²) additive bias on the attention logits."""
        return self.relative_position_bias.flatten()[self.relative_position_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p, nh, dh = self.window_size, self.heads, self.dim_head
        n1, n2 = h // p, w // p
        # (b, 3·heads·dh, h, w) -> (3, b·windows, heads, p², dh); channel order is (heads, dh) as in the reference.
        qkv = self.qkv(x).reshape(b, 3, nh, dh, n1, p, n2, p)
        q, k, v = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, b * n1 * n2, nh, p * p, dh).unbind(0)
        out = attend(q, k, v, self.position_bias().to(q.dtype), self.path)
        out = out.reshape(b, n1, n2, nh, p, p, dh).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, nh * dh, h, w)
        return self.proj(out)


@register_notrace_function  # FX keeps this one call: the kernel choice below looks at the device and grad mode
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, path: str) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v on the kernel ``path`` picks (see ``WindowAttention``)."""
    if path == "sdpa" or path == "auto" and _sdpa_is_fused(q, bias):
        # fused kernels want the head dim contiguous; from an NCHW conv output it is strided by h·w
        return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=bias)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
    return logits.softmax(dim=-1) @ v


torch.fx.wrap("attend")  # plain ``torch.fx.symbolic_trace`` too, not only timm's tracer


class MSABlock(_PreActResidual):
    """The reference ``AttentionBlockB``: GELU(BN(x)) -> 1x1 conv -> BN -> window MSA, residual.

    ``width = c_in // expansion``; the attention maps it to ``planes * expansion`` channels. There is no FFN:
    the neighbouring Conv blocks play that role (PAPER.md §1.3).
    """

    def __init__(
        self,
        c_in: int,
        planes: int,
        *,
        expansion: int,
        heads: int,
        dim_head: int,
        window_size: int,
        stride: int = 1,
        drop_path: float = 0.0,
        norm_layer: LayerType = nn.BatchNorm2d,
        act_layer: LayerType = nn.GELU,
    ) -> None:
        if stride != 1:
            raise ValueError("an MSA block cannot subsample; the first block of a strided stage must be Conv")
        self.expansion = expansion
        super().__init__(c_in, planes * expansion, stride, drop_path, norm_layer, act_layer)
        width = c_in // expansion
        self.conv = _conv1x1(c_in, width)
        self.norm2 = norm_layer(width)
        self.attn = WindowAttention(width, planes * expansion, heads, dim_head, window_size)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm2(self.conv(x)))

    def last_layer(self) -> nn.Module:
        return self.attn.proj


CONV_BLOCKS: dict[str, type[_PreActResidual]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
