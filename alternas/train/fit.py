"""The training loop every candidate goes through: ``fit(model, data, recipe, out_dir) -> RunResult``.

It picks the device, runs bf16 autocast on CUDA and channels_last on CUDA and the CPU, checkpoints atomically
every epoch, resumes exactly, reports divergence as a status (never an exception that would kill a search), and
runs data-parallel under ``torchrun``. Files in the run folder: ``config.yaml``, ``metrics.csv``, ``metrics.json``,
``checkpoint/``, ``evidence.npz`` (per-example validation outcomes of every epoch, for paired comparisons) and
``model.safetensors`` once finished.
"""

from __future__ import annotations

import atexit
import csv
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from alternas.data.augment import eval_batches, make_train_batches
from alternas.data.datasets import DataSplits
from alternas.errors import ConfigError
from alternas.faults import fault_point
from alternas.fileio import DAMAGED_RECORD_ERRORS, atomic_write, atomic_write_text, load_weights, save_weights
from alternas.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from alternas.train.evidence import Evidence, load_evidence
from alternas.train.metrics import evaluate, per_example, predict, summarize
from alternas.train.recipe import Recipe

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class RunResult:
    """What a training run produced. ``status``: completed | diverged | paused (stopped at ``stop_after``)."""

    status: str
    run_dir: str
    epochs_completed: int
    total_epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    images_per_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Devices whose convolutions run faster on NHWC (channels_last) tensors: cuDNN's tensor cores, and oneDNN on the CPU
# (`alternas bench layout`: CPU training steps of the tiny and small bases 1.18-1.25x faster than NCHW).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def training_memory_format(device: torch.device) -> torch.memory_format:
    """The layout ``fit`` trains in on ``device`` (the benchmarks use it too, to time what the searches run)."""
    return torch.channels_last if device.type in CHANNELS_LAST_DEVICES else torch.contiguous_format


def training_autocast(device: torch.device) -> Any:
    """The mixed precision ``fit`` trains in on ``device``: bf16 autocast on CUDA, none elsewhere (the benchmarks
    use it too, to time what the searches run)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` if given, else CUDA, then MPS, then CPU. Under torchrun a plain ``cuda`` is this rank's GPU."""
    local_gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name:
        device = torch.device(name)
        return local_gpu if device.type == "cuda" and device.index is None else device
    if torch.cuda.is_available():
        return local_gpu
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world) — initialising the process group when started by torchrun (destroyed when the process
    exits; a search calls ``fit`` many times on one group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and DDP bind this rank to its own GPU, not cuda:0
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _write_metrics(run_dir: Path, history: list[dict], summary: dict) -> None:
    if history:
        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)

        atomic_write(run_dir / "metrics.csv", write_csv)
    atomic_write_text(run_dir / "metrics.json", json.dumps({**summary, "history": history}, indent=2))


def _finished_result(run_dir: Path) -> RunResult | None:
    """The result of a run that already ended (completed or diverged), read back from ``metrics.json``."""
    try:
        saved = json.loads((run_dir / "metrics.json").read_text())
        if saved.get("status") in ("completed", "diverged") and "result" in saved:
            return RunResult(**saved["result"])
    except DAMAGED_RECORD_ERRORS:
        pass  # missing or damaged: the checkpoint says where the run stands
    return None


def fit(
    model: torch.nn.Module,
    data: DataSplits,
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    resume: bool = False,
    quiet: bool = False,
    compile_model: bool = False,
    deterministic: bool = False,
    run_config: dict[str, Any] | None = None,
    epoch_callback: EpochCallback | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Train ``model`` on ``data.train`` with ``recipe``, validating on ``data.val`` each epoch.

    ``resume=True`` continues from the last checkpoint in ``out_dir`` (a finished run is returned as is).
    ``epoch_callback(epoch, metrics)`` runs after each epoch's checkpoint is on disk; an exception it raises
    (e.g. Optuna's ``TrialPruned``) propagates. ``init_weights`` (a partial state dict) warm-starts a fresh run.
    ``stop_after=k`` trains only up to epoch ``k`` of the full schedule and returns status ``paused``: a later call
    with ``resume=True`` continues exactly (the build-up's early screening looks at a candidate there).
    """
    run_dir = Path(out_dir)
    dev = pick_device(device)
    rank, world = _distributed(dev)
    is_main = rank == 0
    ckpt_dir = run_dir / "checkpoint"
    finished = _finished_result(run_dir)
    saved = load_checkpoint(ckpt_dir) if run_dir.exists() else None
    if (saved is not None or finished is not None) and not resume:
        raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it or choose "
                          "another --out")
    if finished is not None:
        if finished.status == "diverged":
            return finished
        # completed: the caller diagnoses or exports this model, so give it the trained weights, on the device
        # and in the layout training left it in. Damaged or missing weights: finish again from the last
        # checkpoint (no epoch is retrained).
        trained = load_weights(run_dir / "model.safetensors")
        if trained is not None:
            model.load_state_dict(trained)
            model.to(dev, memory_format=training_memory_format(dev))
            return finished

    seed_everything(seed, deterministic)
    cuda = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda else None
    layout = training_memory_format(dev)
    channels_last = layout == torch.channels_last
    model = model.to(dev, memory_format=layout)
    if init_weights:
        model.load_state_dict(init_weights, strict=False)

    decay = recipe.weight_decay
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=decay, nesterov=recipe.nesterov)
    train_batches = make_train_batches(data, recipe, dev, seed, rank, world)
    val_batches = eval_batches(data, data.val, recipe.eval_batch_size, dev, workers=recipe.workers)
    mixup = None
    if recipe.uses_mixup:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0,
                      label_smoothing=recipe.label_smoothing, num_classes=data.num_classes)

    history: list[dict[str, float]] = []
    start_epoch = 0
    evidence = Evidence.empty(data.val.digest(), len(data.val))
    if saved is not None:
        weights, state = saved
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        train_batches.load_state_dict(state["loader"])
        history = [dict(h) for h in state["history"]]
        start_epoch = state["epoch"] + 1
        saved_evidence = load_evidence(run_dir)
        if saved_evidence is not None and saved_evidence.digest == evidence.digest:
            evidence = saved_evidence.up_to(start_epoch)

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
    if compile_model:
        net = torch.compile(net)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {"recipe": recipe.to_dict(), "seed": seed, "data": data.summary(), **(run_config or {})}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    total = recipe.total_epochs
    last_epoch = total if stop_after is None else min(total, stop_after)
    steps = len(train_batches)
    summary: dict[str, Any] = {"status": "running"}
    autocast = training_autocast(dev)
    started = time.perf_counter() - sum(h["epoch_time"] for h in history)
    status, error = "completed", None
    try:
        for epoch in range(start_epoch, last_epoch):
            if world > 1 and hasattr(train_batches, "sampler") and hasattr(train_batches.sampler, "set_epoch"):
                train_batches.sampler.set_epoch(epoch)
            net.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=dev)
            seen = 0
            # disable=None: a bar only on a terminal (tqdm's convention); a log file gets the epoch lines alone
            bar = tqdm(train_batches, total=steps, desc=f"epoch {epoch + 1}/{total}", leave=False,
                       disable=True if quiet or not is_main else None, dynamic_ncols=True)
            for step, (x, y) in enumerate(bar):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if mixup is not None:
                    if len(x) % 2:  # timm's batch mixing needs an even batch (an odd recipe.batch_size)
                        x, y = x[:-1], y[:-1]
                    x, y = mixup(x, y)
                x = x.contiguous(memory_format=layout)
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr_at(epoch, step, steps)
                with autocast:
                    logits = net(x)
                # Mixup's targets are probabilities with the smoothing already in them
                smoothing = 0.0 if mixup is not None else recipe.label_smoothing
                loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
                optimizer.step()
                fault_point("train_step")
                loss_sum += loss.detach() * len(x)
                seen += len(x)
                if step % 10 == 0 and not bar.disable:
                    bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if world > 1:
                stats = torch.stack([loss_sum, torch.tensor(float(seen), device=dev)])
                dist.all_reduce(stats)
                loss_sum, seen = stats[0], int(stats[1])
                for buffer in model.buffers():  # BatchNorm statistics of the last step differ by rank: take rank 0's
                    dist.broadcast(buffer, 0)
            train_loss = float(loss_sum) / max(seen, 1)
            train_time = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                status, error = "diverged", f"training loss became {train_loss} in epoch {epoch + 1}"
                break
            logits, labels = predict(model, val_batches, device=dev, amp_dtype=amp_dtype, channels_last=channels_last)
            val = summarize(logits, labels)
            evidence = evidence.with_epoch(epoch + 1, *per_example(logits, labels))
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                   "val_acc": val["acc"], "val_top5": val["top5"], "val_nll": val["nll"], "val_ece": val["ece"],
                   "images_per_s": seen / train_time, "epoch_time": time.perf_counter() - t0}
            history.append(row)
            if is_main:
                evidence.save(run_dir)  # before the checkpoint: every checkpointed epoch has its evidence
                save_checkpoint(ckpt_dir, model.state_dict(), {
                    "epoch": epoch, "optimizer": optimizer.state_dict(), "rng": rng_state(), "history": history,
                    "loader": train_batches.state_dict(),
                })
                _write_metrics(run_dir, history, {"status": "running"})
                fault_point("epoch_end")
            if world > 1:
                dist.barrier()
            if not quiet and is_main:
                tqdm.write(f"epoch {epoch + 1}/{total}  loss {train_loss:.4f}  val acc {val['acc']:.2f}%  "
                           f"nll {val['nll']:.3f}  {row['images_per_s']:.0f} img/s")
            if epoch_callback is not None:
                epoch_callback(epoch, row)
    except KeyboardInterrupt:
        if is_main:
            _write_metrics(run_dir, history, {"status": "interrupted"})
        raise

    if status == "completed" and len(history) < total:
        status = "paused"
    last = history[-1] if history else {}
    result = RunResult(
        status=status, run_dir=str(run_dir), epochs_completed=len(history), total_epochs=total, history=history,
        val={k[4:]: v for k, v in last.items() if k.startswith("val_")}, wall_time=time.perf_counter() - started,
        images_per_s=float(np.mean([h["images_per_s"] for h in history])) if history else 0.0, error=error,
    )
    if status == "completed":
        test = eval_batches(data, data.test, recipe.eval_batch_size, dev, workers=recipe.workers)
        result.test = evaluate(model, test, device=dev, amp_dtype=amp_dtype, channels_last=channels_last)
    if is_main:
        summary = {"status": status, "result": result.to_dict()}
        if status == "completed":
            save_weights(run_dir / "model.safetensors", model.state_dict())
        _write_metrics(run_dir, history, summary)
    return result
