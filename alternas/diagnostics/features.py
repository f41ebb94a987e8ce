"""Feature-map diagnostics from one forward pass: Fourier analysis (PAPER.md §6.1) and variance (§7).

Both read the output of every tagged unit (stem + blocks; the logits are excluded) through forward hooks, so the
whole profile costs one forward pass plus an FFT per unit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from alternas.models.alternet import BlockInfo


@dataclass
class UnitRecord:
    """What one unit's output looks like: its tags, normalised depth and the two diagnostics."""

    name: str
    kind: str
    stage: int
    index: int
    subsamples: bool
    depth: float  # i / (L - 1)
    frequencies: list[float]  # normalised 0 .. 1 (×π), the x-axis of the paper's Fourier plot
    delta_log_amplitude: list[float]  # relative log amplitude along the half diagonal, 0 at zero frequency
    delta_high: float  # its value at the highest frequency ("1.0π")
    variance: float  # mean over samples and channels of the unbiased spatial variance

    def to_dict(self) -> dict:
        return asdict(self)


def collect_latents(
    units: Iterable[tuple[BlockInfo, torch.nn.Module]], model: torch.nn.Module, inputs: torch.Tensor
) -> list[tuple[BlockInfo, torch.Tensor]]:
    """Run ``model`` once on ``inputs`` and return each unit's output (tokens (b, n, c) become (b, c, √n, √n))."""
    outputs: list[tuple[BlockInfo, torch.Tensor]] = []
    handles = []
    for info, module in units:
        def hook(_mod, _inp, out, info=info):
            if out.ndim == 3:
                b, n, c = out.shape
                side = int(round(n**0.5))
                out = out.transpose(1, 2).reshape(b, c, side, side)
            outputs.append((info, out.detach().float()))

        handles.append(module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(inputs)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def relative_log_amplitude(latent: torch.Tensor) -> torch.Tensor:
    """Δ log amplitude along the half diagonal of the shifted 2-D spectrum, averaged over batch and channels.

    The paper shifts ``log|fft2|`` by (H//2, W//2), averages and reads ``diag[H//2:]``; those are the coefficients
    (k, k), k = 0..ceil(H/2)-1, of the unshifted spectrum. Only they are computed (``rfft2`` holds them all), which
    keeps the profile cheap: the log of the full spectrum is never formed.
    """
    h, w = latent.shape[-2:]
    if h != w:
        raise ValueError(f"Fourier profile needs square feature maps, got {h}x{w}")
    k = torch.arange(h - h // 2, device=latent.device)
    coeffs = torch.fft.rfft2(latent)[..., k, k]
    diag = torch.log(coeffs.abs() + 1e-6).mean(dim=(0, 1))
    return diag - diag[0]


def feature_profile(model: torch.nn.Module, inputs: torch.Tensor) -> list[UnitRecord]:
    """Fourier and variance records for every unit of ``model`` (which must provide ``units()``)."""
    latents = collect_latents(model.units(), model, inputs)
    last = max(len(latents) - 1, 1)
    records = []
    for i, (info, z) in enumerate(latents):
        delta = relative_log_amplitude(z)
        freqs = torch.linspace(0, 1, len(delta)).tolist()
        records.append(UnitRecord(
            name=info.name, kind=info.kind, stage=info.stage, index=info.index, subsamples=info.subsamples,
            depth=i / last, frequencies=freqs, delta_log_amplitude=delta.tolist(), delta_high=float(delta[-1]),
            variance=float(z.var(dim=(-2, -1)).mean()),
        ))
    return records


def fourier_profile(model: torch.nn.Module, inputs: torch.Tensor) -> list[UnitRecord]:
    """PAPER.md §6.1 per unit: the Δ log-amplitude curve and ``delta_high`` vs normalised depth, with tags."""
    return feature_profile(model, inputs)


def stage_end_delta_high(records: list[UnitRecord]) -> dict[str, float]:
    """``delta_high`` of the last block of each stage, keyed ``c1``..``cN`` (a compact per-candidate score)."""
    out: dict[str, float] = {}
    for r in records:
        if r.stage >= 0:
            out[f"c{r.stage + 1}"] = r.delta_high
    return out
