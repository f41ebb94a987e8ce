"""Accuracy under interventions: band-limited noise (PAPER.md §6.2) and the lesion study (§7)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from alternas.data.loader import TensorLoader


def band_mask(size: int, freq: float, half_width: float, device: torch.device | None = None) -> torch.Tensor:
    """The reference's square annulus in the *shifted* spectrum: sq(2·⌊(f+s)·H/2π⌋) − sq(2·⌊(f−s)·H/2π⌋).

    ``freq`` and ``half_width`` are angular frequencies in radians (0.1π … 0.9π).
    """
    def square(n: int) -> torch.Tensor:
        mask = torch.zeros(size, size, device=device)
        n = max(0, min(n, size))
        lo = size // 2 - n // 2
        mask[lo : lo + n, lo : lo + n] = 1.0
        return mask

    outer = int((freq + half_width) * size / (2 * math.pi))
    inner = int((freq - half_width) * size / (2 * math.pi))
    return square(2 * outer) - square(2 * max(inner, 0))


def band_limited_noise(
    x: torch.Tensor, freq: float, half_width: float, eps: float, gen: torch.Generator
) -> torch.Tensor:
    """``x`` plus ``eps·sign(N(0,1))`` noise kept only in the band (amplitude masked, phase kept), as FreqAttack."""
    size = x.shape[-1]
    delta = eps * torch.sign(torch.randn(x.shape, generator=gen)).to(x.device)
    spectrum = torch.roll(torch.fft.fft2(delta), shifts=(size // 2, size // 2), dims=(-2, -1))
    masked = torch.polar(spectrum.abs() * band_mask(size, freq, half_width, x.device), spectrum.angle())
    filtered = torch.fft.ifft2(torch.roll(masked, shifts=(-(size // 2), -(size // 2)), dims=(-2, -1))).real
    return x + filtered


@torch.no_grad()
def _accuracy(model: torch.nn.Module, loader: TensorLoader, transform: Callable | None = None) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        if transform is not None:
            x = transform(x)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def noise_robustness(
    model: torch.nn.Module,
    loader: TensorLoader,
    frequencies: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10)),
    eps: float = 0.7,
    half_width: float = 0.05,
    seed: int = 0,
) -> dict:
    """Δaccuracy (percentage points) under noise at each frequency (in units of π) vs clean accuracy.

    Defaults: eps 0.7 (the author's example, on normalised inputs) and a band 0.1π wide (half-width 0.05π, so
    the nine bands tile 0.05π–0.95π).
    """
    clean = _accuracy(model, loader)
    deltas = []
    for f in frequencies:
        gen = torch.Generator().manual_seed(seed)  # the same noise draws for every band

        def perturb(x: torch.Tensor, f: float = f, gen: torch.Generator = gen) -> torch.Tensor:
            return band_limited_noise(x, f * math.pi, half_width * math.pi, eps, gen)

        acc = _accuracy(model, loader, perturb)
        deltas.append(acc - clean)
    return {"clean_acc": clean, "frequencies": list(frequencies), "delta_acc": deltas, "eps": eps,
            "band_half_width": half_width}


def lesion_study(model: torch.nn.Module, loader: TensorLoader) -> list[dict]:
    """Accuracy drop when one block's residual branch is replaced by the identity (subsampling blocks are kept)."""
    clean = _accuracy(model, loader)
    rows = []
    for info, block in model.units():
        if info.kind == "stem" or info.subsamples or info.in_channels != info.out_channels:
            continue
        handle = block.register_forward_hook(lambda _m, inputs, _out: inputs[0])
        try:
            acc = _accuracy(model, loader)
        finally:
            handle.remove()
        rows.append({"name": info.name, "kind": info.kind, "stage": info.stage, "index": info.index,
                     "delta_acc": acc - clean})
    return rows
