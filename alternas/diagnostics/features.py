"""Feature-map diagnostics from one forward pass: Fourier analysis (PAPER.md §6.1) and variance (§7).

Both read the output of every tagged unit (stem + blocks; the logits are excluded) through forward hooks, so the
whole profile costs one forward pass plus an FFT per unit.

Frequencies are the ones measured: the half-diagonal point (k, k) of an H×H map is 2k/H (×π) along each axis, so the
last point is 0.94π on a 32×32 map but 0.5π on a 4×4 one. The paper labels every unit's last point "1.0π"; here the
high-frequency score of a unit (``delta_high``) is read at one frequency every compared unit resolves (``common``,
the default), or, on the paper's protocol (``paper``), at each unit's own last point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from alternas.models.alternet import BlockInfo
from alternas.models.blocks import eval_mode


@dataclass
class UnitRecord:
    """What one unit's output looks like: its tags, normalised depth and the two diagnostics."""

    name: str
    kind: str
    stage: int
    index: int
    subsamples: bool
    depth: float  # i / (L - 1)
    size: int  # the feature map is size × size
    frequencies: list[float]  # measured, ×π along each axis: 2k/size for the half-diagonal points (k, k)
    delta_log_amplitude: list[float]  # relative log amplitude along the half diagonal, 0 at zero frequency
    delta_high: float  # Δ log amplitude at ``high_frequency``
    high_frequency: float  # where delta_high is read (×π): the common frequency, or this unit's last point (paper)
    delta_paper: float  # Δ at this unit's last point, the paper's "1.0π" (PAPER.md §6.1)
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
        with eval_mode(model), torch.no_grad():
            model(inputs)
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


def measured_frequencies(size: int) -> list[float]:
    """The half-diagonal frequencies (×π, per axis) ``relative_log_amplitude`` reads on a size × size map."""
    return [2 * k / size for k in range(size - size // 2)]


FourierScore = Literal["common", "paper"]


def feature_profile(model: torch.nn.Module, inputs: torch.Tensor, score: FourierScore = "common"
                    ) -> list[UnitRecord]:
    """Fourier and variance records for every unit of ``model`` (which must provide ``units()``).

    ``score="common"`` reads every unit's ``delta_high`` at the highest frequency the coarsest unit resolves
    (linear interpolation on finer maps), so scores compare across stages; ``"paper"`` at each unit's last point.
    """
    latents = collect_latents(model.units(), model, inputs)
    last = max(len(latents) - 1, 1)
    curves = [(z.shape[-1], relative_log_amplitude(z).tolist()) for _, z in latents]
    common = min(measured_frequencies(size)[-1] for size, _ in curves) if curves else 0.0
    records = []
    for i, ((info, z), (size, delta)) in enumerate(zip(latents, curves)):
        freqs = measured_frequencies(size)
        at = freqs[-1] if score == "paper" else common
        records.append(UnitRecord(
            name=info.name, kind=info.kind, stage=info.stage, index=info.index, subsamples=info.subsamples,
            depth=i / last, size=size, frequencies=freqs, delta_log_amplitude=delta,
            delta_high=float(np.interp(at, freqs, delta)), high_frequency=at, delta_paper=delta[-1],
            variance=float(z.var(dim=(-2, -1)).mean()),
        ))
    return records


def fourier_profile(model: torch.nn.Module, inputs: torch.Tensor, score: FourierScore = "common"
                    ) -> list[UnitRecord]:
    """PAPER.md §6.1 per unit: the Δ log-amplitude curve and ``delta_high`` vs normalised depth, with tags."""
    return feature_profile(model, inputs, score)


def stage_end_delta_high(records: list[UnitRecord]) -> dict[str, float]:
    """``delta_high`` of the last block of each stage, keyed ``c1``..``cN`` (a compact per-candidate score; a unit's
    ``high_frequency`` says where it was read)."""
    out: dict[str, float] = {}
    for r in records:
        if r.stage >= 0:
            out[f"c{r.stage + 1}"] = r.delta_high
    return out
