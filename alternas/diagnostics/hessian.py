"""Hessian curvature of the training loss: extreme eigenvalues by Lanczos, trace by Hutchinson, and the paper's
batch-wise "max eigenvalue spectrum" (PAPER.md §5.1).

The loss is the one the paper prescribes: NLL on *augmented* batches (soft Mixup/CutMix targets allowed) plus the
L2 term ``(wd/2)·‖θ‖²``, with the model in eval mode (BN uses running statistics). Hessian-vector products come
from autograd; attention runs on its math path, which is twice differentiable. Eigenvalues come from scipy's
``eigsh`` (implicitly restarted Lanczos) on a ``LinearOperator`` — not a hand-rolled power iteration.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch.func import functional_call, grad, jvp

HvpMethod = Literal["reverse", "forward"]


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels or soft (Mixup/CutMix) targets; half-precision logits are upcast."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if targets.dtype.is_floating_point:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets)


def training_loss(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weight_decay: float = 0.0
) -> torch.Tensor:
    """NLL + ``weight_decay/2 · Σ‖θ‖²`` over all parameters (the reference decays all)."""
    loss = nll(model(inputs), targets)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad)
    return loss


@contextmanager
def twice_differentiable(model: torch.nn.Module):
    """Eval mode (BN running stats, no drop path) and math-path attention, restored afterwards."""
    from alternas.models.blocks import WindowAttention

    attns = [m for m in model.modules() if isinstance(m, WindowAttention)]
    fused = [m.fused for m in attns]
    was_training = model.training
    model.eval()
    for m in attns:
        m.fused = False
    try:
        yield model
    finally:
        for m, state in zip(attns, fused):
            m.fused = state
        model.train(was_training)


class HessianOperator:
    """Hessian-vector products of ``training_loss`` at the model's current parameters, as flat vectors."""

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weight_decay: float = 0.0,
        method: HvpMethod = "reverse",
    ) -> None:
        self.model, self.inputs, self.targets, self.weight_decay, self.method = (
            model, inputs, targets, weight_decay, method)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.size = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.matvecs = 0
        if method == "reverse":
            loss = training_loss(model, inputs, targets, weight_decay)
            self._grads = torch.autograd.grad(loss, self.params, create_graph=True)
        elif method != "forward":
            raise ValueError(f"unknown Hessian-vector product method {method!r}")

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H @ vector for a flat vector of ``self.size`` entries."""
        self.matvecs += 1
        parts = self._split(vector.to(self.device, self.dtype))
        if self.method == "reverse":
            dot = sum((g * v).sum() for g, v in zip(self._grads, parts))
            out = torch.autograd.grad(dot, self.params, retain_graph=True)
        else:
            buffers = dict(self.model.named_buffers())

            def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
                loss = nll(functional_call(self.model, {**params, **buffers}, (self.inputs,)), self.targets)
                if self.weight_decay:
                    loss = loss + 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in params.values())
                return loss

            primals = {n: p.detach() for n, p in zip(self.names, self.params)}
            tangents = dict(zip(self.names, parts))
            _, out_dict = jvp(grad(loss_of), (primals,), (tangents,))
            out = [out_dict[n] for n in self.names]
        return torch.cat([o.reshape(-1) for o in out]).detach()

    def as_linear_operator(self) -> LinearOperator:
        def matvec(v: np.ndarray) -> np.ndarray:
            flat = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
            return self.hvp(flat).to(torch.float64).cpu().numpy()

        return LinearOperator((self.size, self.size), matvec=matvec, dtype=np.float64)


def hessian_eigenvalues(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    k: int = 1,
    which: Literal["LA", "SA", "LM"] = "LA",
    weight_decay: float = 0.0,
    tol: float = 1e-3,
    maxiter: int | None = None,
    method: HvpMethod = "reverse",
    seed: int = 0,
    max_matvecs: int | None = None,
) -> list[float]:
    """The ``k`` extreme Hessian eigenvalues of the loss on one batch, by Lanczos (``which`` as in ``eigsh``).

    "LA": largest algebraic (sorted descending); "SA": smallest, i.e. most negative (ascending); "LM": largest
    magnitude (descending by |λ|), what the power iteration of PyHessian — and so the paper — returns.
    ``tol`` is eigsh's relative accuracy. ``max_matvecs`` bounds the cost (Hessian-vector products, roughly):
    when it runs out, only the eigenvalues that converged are returned (possibly none).
    """
    with twice_differentiable(model):
        op = HessianOperator(model, inputs, targets, weight_decay, method)
        start = np.random.default_rng(seed).standard_normal(op.size)
        ncv = min(op.size - 1, max(2 * k + 1, 20))
        if max_matvecs is not None:
            maxiter = max(1, max_matvecs // ncv)
        try:
            values = eigsh(op.as_linear_operator(), k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=start,
                           return_eigenvectors=False)
        except ArpackNoConvergence as err:
            values = err.eigenvalues
    values = [float(v) for v in values]
    if which == "SA":
        return sorted(values)
    if which == "LM":
        return sorted(values, key=abs, reverse=True)
    return sorted(values, reverse=True)


def hutchinson_trace(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    samples: int = 20,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Unbiased trace estimate E[vᵀHv] with Rademacher vectors v."""
    gen = torch.Generator().manual_seed(seed)
    with twice_differentiable(model):
        op = HessianOperator(model, inputs, targets, weight_decay)
        total = 0.0
        for _ in range(samples):
            v = (torch.randint(0, 2, (op.size,), generator=gen) * 2 - 1).to(op.dtype)
            total += float(torch.dot(v.to(op.device), op.hvp(v)))
    return total / samples


@dataclass
class SpectrumSummary:
    """The paper's batch-wise max-eigenvalue spectrum and its scalar summaries (lower is flatter)."""

    eigenvalues: list[float]  # top-k by magnitude of every batch, concatenated
    lambda_max: float  # median over batches of each batch's largest eigenvalue
    nep: float  # negative eigenvalue proportion
    ape: float  # average of the positive eigenvalues
    batches: int
    k: int
    unconverged: int = 0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def hessian_spectrum(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_batches: int = 2,
    k: int = 1,
    weight_decay: float = 0.0,
    tol: float = 1e-3,
    device: torch.device | None = None,
    max_matvecs: int | None = 60,
) -> SpectrumSummary:
    """Top-``k`` largest-magnitude eigenvalues per mini-batch over ``n_batches`` batches (the author's loop over the
    augmented training loader), with median λ_max, NEP and APE. A batch whose eigenvalues do not converge within
    ``max_matvecs`` contributes none (``unconverged`` counts them)."""
    values: list[float] = []
    per_batch_max: list[float] = []
    used = unconverged = 0
    for i, (x, y) in enumerate(batches):
        if i >= n_batches:
            break
        if device is not None:
            x, y = x.to(device), y.to(device)
        top = hessian_eigenvalues(model, x, y, k=k, which="LM", weight_decay=weight_decay, tol=tol, seed=i,
                                  max_matvecs=max_matvecs)
        used += 1
        if not top:
            unconverged += 1
            continue
        values += top
        per_batch_max.append(max(top))
    arr = np.asarray(values)
    positive = arr[arr > 0]
    return SpectrumSummary(
        eigenvalues=values,
        lambda_max=float(np.median(per_batch_max)) if per_batch_max else float("nan"),
        nep=float((arr < 0).mean()) if len(arr) else float("nan"),
        ape=float(positive.mean()) if len(positive) else 0.0,
        batches=used,
        k=k,
        unconverged=unconverged,
    )
