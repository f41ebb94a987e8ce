"""Evaluation metrics: top-1/top-5 accuracy, NLL and expected calibration error, and per-example outcomes.

``predict`` runs the model once; ``summarize`` turns its logits into the summary numbers and
``per_example`` into the evidence a paired comparison of two candidates needs (``alternas.train.evidence``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from alternas.models.blocks import eval_mode


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by bin share."""
    conf, pred = probs.max(dim=1)
    correct = pred.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    ece = torch.zeros((), device=probs.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and labels of ``model`` in eval mode over ``batches``, in batch order.

    With ``amp_dtype`` the body runs in that precision but a model with a timm-style ``forward_head`` gets its
    head in fp32: NLL and ECE of bf16 logits (8 bits of mantissa) would be quantised."""
    logits_all, labels_all = [], []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if amp_dtype and hasattr(model, "forward_head"):
                with autocast:
                    features = model.forward_features(x)
                logits_all.append(model.forward_head(features.float()))
            else:
                with autocast:
                    logits_all.append(model(x).float())
            labels_all.append(y)
    return torch.cat(logits_all), torch.cat(labels_all)


def summarize(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (%), top-5 (%), NLL and ECE (15 bins) of ``logits`` against ``labels``."""
    k = min(5, logits.shape[1])
    top5 = logits.topk(k, dim=1).indices.eq(labels.view(-1, 1)).any(dim=1).float().mean()
    return {
        "acc": float(logits.argmax(1).eq(labels).float().mean()) * 100,
        "top5": float(top5) * 100,
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(logits.softmax(1), labels),
    }


def per_example(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct as bool, NLL as float32) for every example, on the CPU."""
    correct = logits.argmax(1).eq(labels)
    nll = F.cross_entropy(logits, labels, reduction="none")
    return correct.cpu(), nll.float().cpu()


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Accuracy (%), top-5 (%), NLL and ECE (15 bins) of ``model`` in eval mode over ``batches``."""
    return summarize(*predict(model, batches, device=device, amp_dtype=amp_dtype, channels_last=channels_last))
