"""Side-by-side speed measurements (``alternas bench attention layout pipeline streaming hessian fourier``),
interleaved in one process so that a shared, noisy machine affects both arms alike. Not part of the test run."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from alternas.bench.decisions import describe_agreement
from alternas.data.datasets import DataConfig, load_data
from alternas.data.loader import TensorLoader, pil_loader
from alternas.errors import ConfigError
from alternas.models import build_model
from alternas.models.blocks import AttentionPath
from alternas.train.fit import pick_device, training_autocast, training_memory_format


def _interleaved(arms: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each arm's measurement over ``rounds`` alternating rounds (one warm-up round discarded).

    Not ``torch.utils.benchmark``: its ``Timer`` measures one statement in a block of its own (arms measured one
    after the other, so a noisy neighbour hits one arm and not the other), pins torch to one thread unless told
    otherwise, and warms up before every measurement; alternating whole arms is what makes ratios trustworthy on a
    shared machine. ``_seconds`` does the one thing it would add, the accelerator sync around the timed call."""
    for fn in arms.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def _seconds(fn: Callable[[], object], dev: torch.device) -> float:
    """Wall time of ``fn()``, with the GPU's queued work finished before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step as ``fit`` takes it (its mixed precision on this device)."""
    opt.zero_grad(set_to_none=True)
    with training_autocast(x.device):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    opt.step()


def attention_throughput(batch: int = 32, steps: int = 3, rounds: int = 3, device: str | None = None) -> dict:
    """img/s of the paper's CIFAR-100 AlterNet-50 per attention path: training steps with the default ("auto"),
    forced SDPA and the plain math path; inference (eval, no grad) with the default and the plain path."""
    dev = pick_device(device)
    layout = training_memory_format(dev)  # and training_autocast: the layout and precision fit trains in
    model = build_model("CCC,CCCM,CCCCCM,CMCM", "resnet50", num_classes=100, image_size=32).to(dev,
                                                                                              memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=layout)
    y = torch.randint(0, 100, (batch,), device=dev)

    def passes(train: bool) -> None:
        for _ in range(steps):
            if train:
                _train_step(model, opt, x, y)
            else:
                with torch.no_grad(), training_autocast(dev):
                    model(x)

    def arm(path: AttentionPath, train: bool) -> Callable[[], float]:
        def run() -> float:
            model.set_attention_path(path)
            model.train(train)
            return batch * steps / _seconds(lambda: passes(train), dev)
        return run

    train = _interleaved({p: arm(p, True) for p in ("auto", "sdpa", "math")}, rounds)
    infer = _interleaved({p: arm(p, False) for p in ("auto", "math")}, rounds)
    model.set_attention_path("auto")
    return {"device": str(dev), "train_img_per_s": train, "infer_img_per_s": infer,
            "train_auto_over_math": train["auto"] / train["math"],
            "train_sdpa_over_math": train["sdpa"] / train["math"],
            "infer_auto_over_math": infer["auto"] / infer["math"]}


def pipeline_epoch_time(rounds: int = 2, device: str | None = None) -> dict:
    """One training epoch of the tiny base on the built-in data: in-memory tensor pipeline vs a torchvision
    DataLoader with per-sample PIL transforms (crop + flip + ToTensor + Normalize, 2 workers). Also the pipelines
    alone (batches produced, no model), which is what the fast path changes."""
    from torchvision import transforms as T

    dev = pick_device(device)
    data = load_data(DataConfig("shapes"))
    layout = training_memory_format(dev)
    model = build_model("CC,CC,CC,CM", "tiny", num_classes=10, image_size=32).to(dev, memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tensor_batches = TensorLoader(data.train, 128, mean=data.mean, std=data.std, device=dev, shuffle=True,
                                  crop_padding=4, flip=True)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.mean, data.std)])
    pil_batches = pil_loader(data.train, transform, 128, shuffle=True, workers=2, seed=0)

    def epoch(batches, train: bool) -> None:
        for xb, yb in batches:
            xb, yb = xb.to(dev, memory_format=layout), yb.to(dev)
            if train:
                _train_step(model, opt, xb, yb)

    def arm(batches, train: bool) -> Callable[[], float]:
        return lambda: _seconds(lambda: epoch(batches, train), dev)

    trained = _interleaved({"in_memory": arm(tensor_batches, True), "dataloader": arm(pil_batches, True)}, rounds)
    alone = _interleaved({"in_memory": arm(tensor_batches, False), "dataloader": arm(pil_batches, False)}, rounds)
    return {"device": str(dev), "epoch_s": trained, "speedup": trained["dataloader"] / trained["in_memory"],
            "pipeline_s": alone, "pipeline_speedup": alone["dataloader"] / alone["in_memory"],
            "images": len(data.train)}


def streaming_epoch_time(rounds: int = 2, images: int = 1200, size: int = 64, batch: int = 128,
                         device: str | None = None) -> dict:
    """One training epoch of the tiny base on a generated image folder (``images`` JPEGs of the built-in shapes at
    1.25 x ``size``): decoded into memory (tensor pipeline, crop + flip on batches) vs streamed from disk (DataLoader,
    2 workers: decode, resize, centre square, crop + flip per image). Also the pipelines alone, and the one-off
    in-memory decoding the streamed path never pays."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from alternas.data import synthetic
    from alternas.data.augment import make_train_batches
    from alternas.train.recipe import get_recipe

    dev = pick_device(device)
    layout = training_memory_format(dev)
    pixels, labels = synthetic.generate("shapes", images, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        for split, index in (("train", range(images)), ("val", range(min(200, images)))):
            for i in index:
                folder = Path(tmp) / split / str(int(labels[i]))
                folder.mkdir(parents=True, exist_ok=True)
                picture = Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).resize((size * 5 // 4,) * 2)
                picture.save(folder / f"{i}.jpg", quality=90)
        config = DataConfig(f"imagefolder:{tmp}", image_size=size)
        started = time.perf_counter()
        in_memory = load_data(replace(config, stream="never"))
        decode_s = time.perf_counter() - started
        streamed = load_data(replace(config, stream="always"))
        recipe = get_recipe("fast", {"batch_size": batch, "workers": 2})
        model = build_model("CC,CC,CC,CM", "tiny", num_classes=in_memory.num_classes, image_size=size).to(
            dev, memory_format=layout)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pipelines = {name: make_train_batches(data, recipe, dev, 0, 0, 1)
                     for name, data in (("in_memory", in_memory), ("streamed", streamed))}

        def arm(batches, train: bool) -> Callable[[], float]:
            def epoch() -> None:
                for xb, yb in batches:
                    xb, yb = xb.to(dev, memory_format=layout), yb.to(dev)
                    if train:
                        _train_step(model, opt, xb, yb)
            return lambda: _seconds(epoch, dev)

        trained = _interleaved({k: arm(v, True) for k, v in pipelines.items()}, rounds)
        alone = _interleaved({k: arm(v, False) for k, v in pipelines.items()}, rounds)
    return {"device": str(dev), "images": len(in_memory.train), "size": size, "batch": batch, "epoch_s": trained,
            "slowdown": trained["streamed"] / trained["in_memory"], "pipeline_s": alone,
            "pipeline_slowdown": alone["streamed"] / alone["in_memory"], "decode_into_memory_s": decode_s}


def layout_throughput(batch: int = 128, steps: int = 3, rounds: int = 5, device: str | None = None) -> dict:
    """Training img/s in NCHW vs channels_last memory format, for the CPU-sized bases (`fit` trains channels_last
    where it is faster: ``training_memory_format``)."""
    dev = pick_device(device)
    result: dict = {"device": str(dev), "batch": batch}
    for base in ("tiny", "small"):
        arms = {}
        for name, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            torch.manual_seed(0)
            model = build_model("CC,CC,CC,CM", base, num_classes=10, image_size=32).to(dev, memory_format=layout)
            x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=layout)
            y = torch.randint(0, 10, (batch,), device=dev)
            arms[name] = _train_steps(model, x, y, steps, dev)
        img_s = _interleaved(arms, rounds)
        result[base] = {"img_per_s": img_s, "speedup": img_s["channels_last"] / img_s["nchw"]}
    return result


def _train_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, dev: torch.device
                 ) -> Callable[[], float]:
    """A closure timing ``steps`` AdamW training steps on one batch; returns img/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def steps_() -> None:
        for _ in range(steps):
            _train_step(model, opt, x, y)
    return lambda: len(x) * steps / _seconds(steps_, dev)


def _briefly_trained(placement: str, base: str, data, epochs: int, device: torch.device) -> torch.nn.Module:
    """Curvature of a freshly initialised net is atypical; a few in-memory epochs give a realistic one (seeded, so
    every run of the benchmark measures the same model)."""
    torch.manual_seed(0)
    model = build_model(placement, base, num_classes=data.num_classes, image_size=32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = TensorLoader(data.train, 128, mean=data.mean, std=data.std, device=device, shuffle=True,
                           crop_padding=4, flip=True)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches:
            _train_step(model, opt, xb, yb)
    return model.eval()


def hessian_vs_pyhessian(rounds: int = 2, batches: int = 4, batch: int = 64, tol: float = 1e-3,
                         train_epochs: int = 2, device: str | None = None) -> dict:
    """Time to the top (largest-magnitude) Hessian eigenvalue at relative tolerance ``tol``, over ``batches``
    mini-batches as the paper's spectrum loop does: our Lanczos (``hessian_eigenvalues``) vs PyHessian 0.1's power
    iteration, same model, batches and loss (NLL, no L2), both on the double-differentiable attention path.
    Errors are relative to ARPACK's value converged to 1e-10 (another solver than ours)."""
    try:
        from pyhessian import hessian as PyHessian
    except ImportError:
        raise ConfigError("the Hessian benchmark compares against PyHessian 0.1, a peer, not a dependency: "
                          "pip install pyhessian==0.1") from None
    from scipy.sparse.linalg import eigsh

    from alternas.diagnostics.hessian import HessianOperator, hessian_eigenvalues, twice_differentiable

    dev = pick_device(device)
    data = load_data(DataConfig("shapes", subset=4000))
    model = _briefly_trained("CC,CM,CM,CM", "tiny", data, train_epochs, dev)
    loader = iter(TensorLoader(data.val, batch, mean=data.mean, std=data.std, device=dev))
    pairs = [next(loader) for _ in range(batches)]
    references = []
    with twice_differentiable(model):
        for x, y in pairs:
            operator = HessianOperator(model, x, y).as_linear_operator()
            references.append(float(eigsh(operator, k=1, which="LM", tol=1e-10, return_eigenvectors=False)[0]))
    found: dict[str, list[float]] = {"alternas": [], "pyhessian": []}
    seeds = itertools.count()  # a fresh power-iteration start per batch and round

    def ours() -> float:
        found["alternas"] = []
        t0 = time.perf_counter()
        for x, y in pairs:
            found["alternas"].append(hessian_eigenvalues(model, x, y, k=1, which="LM", tol=tol)[0])
        return time.perf_counter() - t0

    def theirs() -> float:
        found["pyhessian"] = []
        elapsed = 0.0
        for x, y in pairs:
            torch.manual_seed(next(seeds))
            model.zero_grad(set_to_none=True)  # PyHessian accumulates into .grad
            with twice_differentiable(model):
                t0 = time.perf_counter()
                top, _ = PyHessian(model, F.cross_entropy, data=(x, y), cuda=dev.type == "cuda").eigenvalues(
                    maxIter=100, tol=tol, top_n=1)
                elapsed += time.perf_counter() - t0
            found["pyhessian"].append(float(top[0]))
        model.zero_grad(set_to_none=True)
        return elapsed

    times = _interleaved({"alternas": ours, "pyhessian": theirs}, rounds)
    errors = {k: [abs(v - r) / abs(r) for v, r in zip(vals, references)] for k, vals in found.items()}
    return {"device": str(dev), "params": sum(p.numel() for p in model.parameters()), "batch": batch,
            "batches": batches, "references": references, "seconds": times,
            "median_error": {k: statistics.median(v) for k, v in errors.items()},
            "max_error": {k: max(v) for k, v in errors.items()},
            "time_ratio": times["alternas"] / times["pyhessian"]}


def fourier_vs_forward(rounds: int = 5, batch: int = 64, device: str | None = None) -> dict:
    """The whole Fourier + variance profile (hooks, one pass, FFT per unit) vs a plain forward of the same batch,
    on the paper's CIFAR-100 AlterNet-50."""
    from alternas.diagnostics.features import feature_profile

    dev = pick_device(device)
    model = build_model("CCC,CCCM,CCCCCM,CMCM", "resnet50", num_classes=100, image_size=32).to(dev).eval()
    x = torch.randn(batch, 3, 32, 32, device=dev)

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        return torch.no_grad()(lambda: _seconds(fn, dev))

    times = _interleaved({"profile": timed(lambda: feature_profile(model, x)), "forward": timed(lambda: model(x))},
                         rounds)
    return {"device": str(dev), "batch": batch, "seconds": times, "ratio": times["profile"] / times["forward"]}


# the speed benchmarks `alternas bench` runs by default: name -> run(rounds, device) with that benchmark's rounds
SPEED_BENCHMARKS: dict[str, Callable[..., dict]] = {
    "attention": lambda rounds, device: attention_throughput(rounds=rounds, device=device),
    "layout": lambda rounds, device: layout_throughput(rounds=rounds + 2, device=device),
    "pipeline": lambda rounds, device: pipeline_epoch_time(rounds=max(1, rounds - 1), device=device),
    "streaming": lambda rounds, device: streaming_epoch_time(rounds=max(1, rounds - 1), device=device),
    "hessian": lambda rounds, device: hessian_vs_pyhessian(rounds=rounds, device=device),
    "fourier": lambda rounds, device: fourier_vs_forward(rounds=rounds + 2, device=device),
}


def describe(name: str, r: dict) -> str:
    """One line of a benchmark's result, as ``alternas bench`` prints it."""
    if name == "decisions":
        return describe_agreement(r)
    if name == "attention":
        tr, inf = r["train_img_per_s"], r["infer_img_per_s"]
        return (f"attention: AlterNet-50 CIFAR-100, 32 px, batch 32 on {r['device']}: train img/s default "
                f"{tr['auto']:.1f}, SDPA forced {tr['sdpa']:.1f}, plain {tr['math']:.1f} -> default/plain "
                f"{r['train_auto_over_math']:.2f}x, SDPA/plain {r['train_sdpa_over_math']:.2f}x; inference "
                f"img/s default {inf['auto']:.1f}, plain {inf['math']:.1f} -> {r['infer_auto_over_math']:.2f}x")
    if name == "layout":
        return f"layout: CC,CC,CC,CM training steps, batch {r['batch']} on {r['device']}: " + "; ".join(
            f"{base} NCHW {r[base]['img_per_s']['nchw']:.0f} img/s, channels_last "
            f"{r[base]['img_per_s']['channels_last']:.0f} img/s -> {r[base]['speedup']:.2f}x"
            for base in ("tiny", "small"))
    if name == "pipeline":
        return (f"pipeline: tiny base, shapes ({r['images']} images) on {r['device']}: one training epoch "
                f"in-memory {r['epoch_s']['in_memory']:.2f} s, DataLoader+PIL {r['epoch_s']['dataloader']:.2f} s "
                f"-> {r['speedup']:.2f}x faster; the pipelines alone (no model) "
                f"{r['pipeline_s']['in_memory']:.3f} s vs {r['pipeline_s']['dataloader']:.3f} s "
                f"-> {r['pipeline_speedup']:.1f}x")
    if name == "streaming":
        return (f"streaming: tiny base, image folder of {r['images']} JPEGs at {r['size']} px on {r['device']}: one "
                f"training epoch in memory {r['epoch_s']['in_memory']:.2f} s, streamed from disk "
                f"{r['epoch_s']['streamed']:.2f} s -> {r['slowdown']:.2f}x; the pipelines alone "
                f"{r['pipeline_s']['in_memory']:.3f} s vs {r['pipeline_s']['streamed']:.3f} s "
                f"-> {r['pipeline_slowdown']:.1f}x; decoding into memory once took {r['decode_into_memory_s']:.2f} s")
    if name == "hessian":
        med, worst = r["median_error"], r["max_error"]
        return (f"hessian: top eigenvalue at tol 1e-3 on {r['batches']} batches of {r['batch']}, tiny AlterNet "
                f"({r['params']:,} params) on {r['device']}: Lanczos {r['seconds']['alternas']:.2f} s "
                f"(rel. error median {med['alternas']:.1e}, max {worst['alternas']:.1e}), PyHessian power "
                f"iteration {r['seconds']['pyhessian']:.2f} s (median {med['pyhessian']:.1e}, max "
                f"{worst['pyhessian']:.1e}) -> time ratio {r['time_ratio']:.2f}x")
    if name == "fourier":
        return (f"fourier: AlterNet-50 CIFAR-100, batch {r['batch']} on {r['device']}: Fourier+variance "
                f"profile {r['seconds']['profile']:.3f} s, forward {r['seconds']['forward']:.3f} s "
                f"-> {r['ratio']:.2f}x a forward pass")
    raise ConfigError(f"no benchmark named {name!r}; choose one of: {', '.join([*SPEED_BENCHMARKS, 'decisions'])}")
