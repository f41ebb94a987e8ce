"""Accuracy under interventions: band-limited noise (PAPER.md §6.2) and the lesion study (§7)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from alternas.data.loader import TensorLoader

NoiseBand = Literal["measured", "paper"]
NoiseEnergy = Literal["equal", "paper"]


def band_mask(size: int, freq: float, half_width: float, device: torch.device | None = None) -> torch.Tensor:
    """The reference's square annulus in the *shifted* spectrum: sq(2·⌊(f+s)·H/2π⌋) − sq(2·⌊(f−s)·H/2π⌋).

    ``freq`` and ``half_width`` are angular frequencies in radians (0.1π … 0.9π). On small images its bands are one
    or two bins wide, the lowest holds the zero frequency (the mean), and some are empty.
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


def measured_band_mask(size: int, freq: float, half_width: float, device: torch.device | None = None
                       ) -> torch.Tensor:
    """The FFT bins (unshifted) whose L∞ frequency max(|f_x|, |f_y|) lies in [freq − s, freq + s), never the zero
    frequency: the reference's square annulus read off the frequencies the grid really has. Symmetric under
    k → −k, so noise filtered by it stays real."""
    f = torch.fft.fftfreq(size, device=device).abs() * 2 * math.pi
    linf = torch.maximum(f.view(-1, 1), f.view(1, -1))
    return ((linf >= freq - half_width - 1e-9) & (linf < freq + half_width - 1e-9) & (linf > 0)).float()


def band_limited_noise(
    x: torch.Tensor, freq: float, half_width: float, eps: float, gen: torch.Generator,
    band: NoiseBand = "paper", rms: float | None = None,
) -> torch.Tensor:
    """``x`` plus ``eps·sign(N(0,1))`` noise kept only in the band (amplitude masked, phase kept), as FreqAttack.

    ``band="paper"`` is the reference's mask; ``"measured"`` the bins really in the band (``measured_band_mask``).
    With ``rms`` the filtered noise of each image is rescaled to that root-mean-square, so every band adds the same
    energy whatever its number of bins.
    """
    size = x.shape[-1]
    delta = eps * torch.sign(torch.randn(x.shape, generator=gen)).to(x.device)
    if band == "measured":
        filtered = torch.fft.ifft2(torch.fft.fft2(delta) * measured_band_mask(size, freq, half_width, x.device)).real
    else:
        spectrum = torch.fft.fftshift(torch.fft.fft2(delta), dim=(-2, -1))
        masked = torch.polar(spectrum.abs() * band_mask(size, freq, half_width, x.device), spectrum.angle())
        filtered = torch.fft.ifft2(torch.fft.ifftshift(masked, dim=(-2, -1))).real
    if rms is not None:
        own = filtered.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
        filtered = filtered * (rms / own.clamp_min(1e-12))
    return x + filtered


def band_bins(size: int, freq: float, half_width: float, band: NoiseBand) -> int:
    """How many FFT bins a band's mask keeps (of size², per channel)."""
    mask = measured_band_mask if band == "measured" else band_mask
    return int(mask(size, freq, half_width).sum())


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
    band: NoiseBand = "measured",
    energy: NoiseEnergy = "equal",
) -> dict:
    """Δaccuracy (percentage points) under noise at each frequency (in units of π) vs clean accuracy.

    Defaults: eps 0.7 (the author's example, on normalised inputs) and a band 0.1π wide (half-width 0.05π, so
    the nine bands tile 0.05π–0.95π). On a small image a band holds a handful of bins and their count rises with
    frequency, so ``energy="equal"`` gives every band the same noise energy: the RMS that the reference's sign
    noise keeps in a continuous 0.5π band, eps·√(4·0.5·s) (``"paper"``: whatever the bins keep). ``bins`` and
    ``rms`` record, per band, how many FFT bins it has and the noise it added. A band with no bin is NaN.
    """
    size = loader.images.shape[-1]
    target = eps * math.sqrt(4 * 0.5 * half_width) if energy == "equal" else None
    clean = _accuracy(model, loader)
    deltas, bins, rms = [], [], []
    for f in frequencies:
        bins.append(band_bins(size, f * math.pi, half_width * math.pi, band))
        if bins[-1] == 0:
            deltas.append(float("nan"))
            rms.append(0.0)
            continue
        gen = torch.Generator().manual_seed(seed)  # the same noise draws for every band
        noise_rms: list[float] = []

        def perturb(x: torch.Tensor, f: float = f, gen: torch.Generator = gen, noise_rms: list = noise_rms
                    ) -> torch.Tensor:
            noisy = band_limited_noise(x, f * math.pi, half_width * math.pi, eps, gen, band, target)
            noise_rms.append(float((noisy - x).pow(2).mean().sqrt()))
            return noisy

        deltas.append(_accuracy(model, loader, perturb) - clean)
        rms.append(sum(noise_rms) / len(noise_rms))
    return {"clean_acc": clean, "frequencies": list(frequencies), "delta_acc": deltas, "eps": eps,
            "band_half_width": half_width, "band": band, "energy": energy, "bins": bins, "rms": rms,
            "images": len(loader.labels), "image_size": size}


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
