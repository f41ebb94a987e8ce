"""2-D loss landscape with the reference's "filter normalisation" (PAPER.md §5.2), at a bounded cost."""

from __future__ import annotations

import re

import torch

from alternas.diagnostics.hessian import training_loss
from alternas.models.blocks import eval_mode

_IGNORED = re.compile(r"pos_embed|relative_position")


def random_direction(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0,1) per state-dict entry, rescaled by ‖w‖/‖d‖ along dim 0 (the reference's quirk, not Li et al.'s
    per-filter norm); entries with ndim < 2 (biases, BN) and position biases stay unperturbed."""
    direction = {}
    for name, w in model.state_dict().items():
        if w.ndim < 2 or _IGNORED.search(name) or not w.is_floating_point():
            direction[name] = torch.zeros_like(w, dtype=torch.float32 if not w.is_floating_point() else w.dtype)
            continue
        d = torch.randn(w.shape, generator=gen).to(w)
        direction[name] = d * w.norm(dim=0, keepdim=True) / (d.norm(dim=0, keepdim=True) + 1e-7)
    return direction


@torch.no_grad()
def loss_landscape(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    grid: int = 9,
    span: float = 1.0,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> dict:
    """Loss ``NLL + wd·Σ‖W‖`` (unsquared, as the reference plots) on ``batches`` over a grid² plane around the
    weights; ``grid`` and the number of batches bound the cost (grid² × batches forward passes)."""
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = random_direction(model, gen), random_direction(model, gen)
    origin = {k: v.clone() for k, v in model.state_dict().items()}
    coords = torch.linspace(-span, span, grid).tolist()
    loss = [[0.0] * grid for _ in range(grid)]
    with eval_mode(model):
        try:
            for i, a in enumerate(coords):
                for j, b in enumerate(coords):
                    model.load_state_dict({k: (v + a * d1[k] + b * d2[k]) if v.is_floating_point() else v
                                           for k, v in origin.items()})
                    nll = sum(float(training_loss(model, x, y)) for x, y in batches) / len(batches)
                    l2 = sum(float(p.norm()) for p in model.parameters())
                    loss[i][j] = nll + weight_decay * l2
        finally:
            model.load_state_dict(origin)
    return {"x": coords, "y": coords, "loss": loss, "weight_decay": weight_decay, "batches": len(batches)}
