"""Hessian curvature of the training loss: extreme eigenvalues by Lanczos, trace by Hutchinson, and the paper's
batch-wise "max eigenvalue spectrum" (PAPER.md §5.1).

The loss is the one the paper prescribes: NLL on *augmented* batches (soft Mixup/CutMix targets allowed) plus the
L2 term ``(wd/2)·‖θ‖²``, with the model in eval mode (BN uses running statistics). Hessian-vector products come
from autograd; attention runs on its math path, which is twice differentiable. Eigenvalues come from Lanczos
with full reorthogonalisation that stops on the Ritz residuals (see ``lanczos``: LAPACK solves the small
tridiagonal problems) — not a power iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator
from torch.func import functional_call, grad, jvp

HvpMethod = Literal["reverse", "forward"]


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels or soft (Mixup/CutMix) targets; half-precision logits are upcast."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets)  # class indices, or probabilities (soft targets)


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
    """Eval mode (BN running stats, no drop path), math-path attention and IEEE fp32 arithmetic, restored
    afterwards."""
    from alternas.models.blocks import attention_path, eval_mode

    with eval_mode(model), attention_path(model, "math"), ieee_fp32():
        yield model


@contextmanager
def ieee_fp32():
    """No TF32 in matmuls and convolutions (cuDNN convolutions use it by default on Ampere and later): its ~1e-3
    relative error per product is as large as the Lanczos tolerance, so eigenvalues would be noise-limited."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


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

    def gradient(self) -> torch.Tensor:
        """The loss gradient as a flat vector (a good Lanczos start: see ``hessian_eigenvalues``)."""
        if self.method == "reverse":
            grads = self._grads
        else:
            grads = torch.autograd.grad(training_loss(self.model, self.inputs, self.targets, self.weight_decay),
                                        self.params)
        return torch.cat([g.reshape(-1) for g in grads]).detach()

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        # Not torch's parameters_to_vector / vector_to_parameters: the latter overwrites the parameters (these are
        # views used as grad_outputs and tangents), the former needs ``view(-1)``, which channels_last grads refuse.
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H @ vector for a flat vector of ``self.size`` entries."""
        self.matvecs += 1
        parts = self._split(vector.to(self.device, self.dtype))
        if self.method == "reverse":
            out = torch.autograd.grad(self._grads, self.params, grad_outputs=parts, retain_graph=True)
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


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    k: int = 1,
    which: Literal["LA", "SA", "LM"] = "LA",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
) -> tuple[list[float], bool]:
    """Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    After every product the Ritz values of the tridiagonal matrix come from LAPACK (``eigh_tridiagonal``) together
    with their residual norms ``r = |β_j·s_j|``, available at no extra product. The iteration stops as soon as the
    ``k`` wanted Ritz values θ each have an error bound ≤ ``tol``·|θ|: the bound is min(r, r²/gap) (Parlett, *The
    Symmetric Eigenvalue Problem*, §11.7), the gap estimated from the other Ritz values. ARPACK (``eigsh``) checks
    only after filling its whole Krylov space (at least ``ncv`` products, several times more than one
    well-separated extreme eigenvalue needs); a power iteration needs many more where the top of the spectrum is
    crowded, and its stopping rule (a small change between iterations) bounds nothing.
    Returns the converged wanted values and whether all ``k`` converged within ``max_matvecs``.
    """
    n = start.numel()
    limit = min(n, max_matvecs or n)
    basis = torch.empty(min(limit, 8), n, dtype=start.dtype, device=start.device)  # grows by doubling
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    wanted: list[float] = []
    for j in range(limit):
        w = matvec(basis[j])
        active = basis[: j + 1]
        coeffs = active @ w
        alphas.append(float(coeffs[j]))
        w = w - coeffs @ active
        w = w - (active @ w) @ active  # twice is enough (Kahan–Parlett)
        beta = float(w.norm())
        if j:
            values, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas))
        else:
            values, vectors = np.array(alphas), np.ones((1, 1))
        order = {"LA": np.argsort(-values), "SA": np.argsort(values), "LM": np.argsort(-np.abs(values))}[which][:k]
        residuals = beta * np.abs(vectors[-1, order])
        errors = residuals  # |λ - θ| ≤ r, and ≤ r²/gap (gap to the rest of the spectrum, estimated by Ritz values)
        if len(values) > 1:
            gaps = np.array([np.abs(np.delete(values, i) - values[i]).min() for i in order])
            errors = np.minimum(residuals, residuals**2 / np.maximum(gaps, 1e-300))
        converged = errors <= tol * np.abs(values[order])
        wanted = [float(v) for v, ok in zip(values[order], converged) if ok]
        exhausted = beta <= 1e-10 * max(np.abs(values).max(), 1e-30)  # invariant subspace: the values are exact
        if (len(order) == k and converged.all()) or exhausted:
            return [float(v) for v in values[order]], len(order) == k
        if j + 1 == basis.shape[0] and j + 1 < limit:
            basis = torch.cat([basis, torch.empty_like(basis[: min(basis.shape[0], limit - j - 1)])])
        if j + 1 < limit:
            betas.append(beta)
            basis[j + 1] = w / beta
    return wanted, False


def hessian_eigenvalues(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    k: int = 1,
    which: Literal["LA", "SA", "LM"] = "LA",
    weight_decay: float = 0.0,
    tol: float = 1e-3,
    method: HvpMethod = "reverse",
    start: Literal["gradient", "random"] = "gradient",
    seed: int = 0,
    max_matvecs: int | None = None,
) -> list[float]:
    """The ``k`` extreme Hessian eigenvalues of the loss on one batch, by Lanczos (``which`` as in ``eigsh``).

    "LA": largest algebraic (sorted descending); "SA": smallest, i.e. most negative (ascending); "LM": largest
    magnitude (descending by |λ|), what the power iteration of PyHessian — and so the paper — returns.
    ``tol``: relative error bound of each value (see ``lanczos``). The Krylov space starts from the loss gradient
    (``start="gradient"``), which lies mostly in the top eigenspace of a trained net's Hessian (Gur-Ari et al.
    2018), so the top eigenvalue converges in a few products; ``"random"`` starts from a seeded Gaussian vector.
    ``max_matvecs`` bounds the cost (Hessian-vector products): when it runs out, only the eigenvalues that
    converged are returned (possibly none).
    """
    with twice_differentiable(model):
        op = HessianOperator(model, inputs, targets, weight_decay, method)
        vector = op.gradient() if start == "gradient" else None
        if vector is None or not torch.isfinite(vector).all() or float(vector.norm()) == 0.0:
            gen = torch.Generator().manual_seed(seed)
            vector = torch.randn(op.size, generator=gen, dtype=torch.float64).to(op.device, op.dtype)
        values, _ = lanczos(op.hvp, vector, k=k, which=which, tol=tol, max_matvecs=max_matvecs)
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
    counts: dict[str, int] | None = None  # how many values each statistic rests on

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def hessian_spectrum(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_batches: int | None = 2,
    k: int = 1,
    weight_decay: float = 0.0,
    tol: float = 1e-3,
    device: torch.device | None = None,
    max_matvecs: int | None = 60,
) -> SpectrumSummary:
    """Top-``k`` largest-magnitude eigenvalues per mini-batch over ``n_batches`` batches (None: all of them, the
    author's loop over the augmented training loader), with median λ_max, NEP and APE and the number of values
    each rests on (``counts``: batches for λ_max, eigenvalues for NEP, positive ones for APE). A batch whose
    eigenvalues do not converge within ``max_matvecs`` contributes none (``unconverged`` counts them)."""
    values: list[float] = []
    per_batch_max: list[float] = []
    used = unconverged = 0
    for i, (x, y) in enumerate(batches):
        if n_batches is not None and i >= n_batches:
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
        counts={"lambda_max": len(per_batch_max), "nep": len(values), "ape": len(positive)},
    )
