"""Side-by-side speed measurements (``alternas bench``), interleaved in one process so that a shared, noisy
machine affects both arms alike. Not part of the test run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from alternas.data.datasets import DataConfig, load_data
from alternas.data.loader import TensorLoader, pil_loader
from alternas.models import build_model
from alternas.train.fit import pick_device


def _interleaved(arms: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each arm's measurement over ``rounds`` alternating rounds (one warm-up round discarded)."""
    for fn in arms.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def attention_throughput(batch: int = 32, steps: int = 3, rounds: int = 3, device: str | None = None) -> dict:
    """Training img/s of the paper's CIFAR-100 AlterNet-50 with SDPA vs the plain matmul/softmax attention."""
    dev = pick_device(device)
    model = build_model("CCC,CCCM,CCCCCM,CMCM", "resnet50", num_classes=100, image_size=32).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32, device=dev), torch.randint(0, 100, (batch,), device=dev)

    def arm(fused: bool) -> Callable[[], float]:
        def run() -> float:
            model.set_fused_attention(fused)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return batch * steps / (time.perf_counter() - t0)
        return run

    rates = _interleaved({"sdpa": arm(True), "math": arm(False)}, rounds)
    return {"device": str(dev), "img_per_s": rates, "sdpa_over_math": rates["sdpa"] / rates["math"]}


def pipeline_epoch_time(rounds: int = 2, device: str | None = None) -> dict:
    """One training epoch of the tiny base on the built-in data: in-memory tensor pipeline vs a torchvision
    DataLoader with per-sample PIL transforms (crop + flip + ToTensor + Normalize, 2 workers)."""
    from torchvision import transforms as T

    dev = pick_device(device)
    data = load_data(DataConfig("shapes"))
    model = build_model("CC,CC,CC,CM", "tiny", num_classes=10, image_size=32).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tensor_batches = TensorLoader(data.train, 128, mean=data.mean, std=data.std, device=dev, shuffle=True,
                                  crop_padding=4, flip=True)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.mean, data.std)])
    pil_batches = pil_loader(data.train, transform, 128, shuffle=True, workers=2, seed=0)

    def arm(batches) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            for xb, yb in batches:
                xb, yb = xb.to(dev), yb.to(dev)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            return time.perf_counter() - t0
        return run

    times = _interleaved({"in_memory": arm(tensor_batches), "dataloader": arm(pil_batches)}, rounds)
    return {"device": str(dev), "epoch_s": times, "speedup": times["dataloader"] / times["in_memory"],
            "images": len(data.train)}
