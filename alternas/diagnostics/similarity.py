"""Representation similarity between units: mini-batch linear CKA (PAPER.md §7; Nguyen, Raghu & Kornblith 2021).

Linear CKA compares two layers' representations of the same images through their Gram matrices, so it is
invariant to rotations and isotropic scaling of either. The mini-batch form sums the *unbiased* HSIC estimator
(Song et al. 2012) over batches before normalising, so it converges to the full-data CKA as batches accrue
instead of depending on one batch's size; in a multi-stage net it shows one bright block per stage.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from alternas.diagnostics.features import collect_latents


def unbiased_hsic(grams: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator between every pair of (U, n, n) Gram matrices: a (U, U) matrix (n ≥ 4)."""
    n = grams.shape[-1]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs batches of at least 4 examples, got {n}")
    k = grams.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    sums = k.sum(dim=(-2, -1))  # 1ᵀK̃1
    rows = k.sum(dim=-1)  # K̃1
    trace = torch.einsum("aij,bij->ab", k, k)  # tr(K̃_a K̃_b), both symmetric
    cross = rows @ rows.T  # 1ᵀK̃_a K̃_b 1
    return (trace + sums[:, None] * sums[None, :] / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


@torch.no_grad()
def minibatch_cka(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> dict:
    """Linear CKA between the outputs of every pair of ``model.units()`` over ``batches`` of inputs.

    Returns ``names``, ``kinds``, ``stages`` of the units, the symmetric ``matrix`` (1 on the diagonal) and how many
    ``batches`` and ``examples`` it rests on.
    """
    total: torch.Tensor | None = None
    infos: list = []
    batches_used = examples = 0
    for x in batches:
        latents = collect_latents(model.units(), model, x)
        infos = [info for info, _ in latents]
        feats = [z.flatten(1).double() for _, z in latents]
        grams = torch.stack([f @ f.T for f in feats])
        hsic = unbiased_hsic(grams)
        total = hsic if total is None else total + hsic
        batches_used += 1
        examples += len(x)
    if total is None:
        raise ValueError("minibatch_cka needs at least one batch")
    norms = total.diagonal().clamp_min(1e-30).sqrt()
    matrix = (total / (norms[:, None] * norms[None, :])).clamp(-1, 1)
    return {"names": [i.name for i in infos], "kinds": [i.kind for i in infos], "stages": [i.stage for i in infos],
            "matrix": matrix.tolist(), "batches": batches_used, "examples": examples}
