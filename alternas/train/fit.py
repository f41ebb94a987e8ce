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

from alternas.data.augment import eval_batches, make_train_batches, mixup_for
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


@dataclass
class _Training:
    """What one training run holds between its steps: the model (and ``net``, the wrapped one that trains), the
    optimizer, the batches, and the record so far (``history``, ``evidence``)."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_batches: Any
    val_batches: Any
    mixup: Any
    recipe: Recipe
    device: torch.device
    run_dir: Path
    rank: int
    world: int
    history: list[dict[str, float]]
    evidence: Evidence
    start_epoch: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None

    @property
    def channels_last(self) -> bool:
        return training_memory_format(self.device) == torch.channels_last


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
    run_dir, dev = Path(out_dir), pick_device(device)
    rank, world = _distributed(dev)
    saved = load_checkpoint(run_dir / "checkpoint") if run_dir.exists() else None
    finished = _finished_run(model, run_dir, dev, resume, saved is not None)
    if finished is not None:
        return finished
    seed_everything(seed, deterministic)
    run = _prepare(model, data, recipe, run_dir, dev, seed, rank, world, init_weights)
    if saved is not None:
        _restore(run, saved)
    run.net = _wrap(model, dev, world, compile_model)
    if run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {"recipe": recipe.to_dict(), "seed": seed, "data": data.summary(), **(run_config or {})}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    last_epoch = recipe.total_epochs if stop_after is None else min(recipe.total_epochs, stop_after)
    started = time.perf_counter() - sum(h["epoch_time"] for h in run.history)
    status, error = "completed", None
    try:
        for epoch in range(run.start_epoch, last_epoch):
            t0 = time.perf_counter()
            train_loss, seen = train_one_epoch(run, epoch, quiet)
            train_time = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                status, error = "diverged", f"training loss became {train_loss} in epoch {epoch + 1}"
                break
            row = _validate(run, epoch, train_loss, seen / train_time, t0)
            _end_epoch(run, epoch, row, quiet)
            if epoch_callback is not None:
                epoch_callback(epoch, row)
    except KeyboardInterrupt:
        if run.is_main:
            _write_metrics(run_dir, run.history, {"status": "interrupted"})
        raise
    if status == "completed" and len(run.history) < recipe.total_epochs:
        status = "paused"
    return _finish(run, data, status, error, time.perf_counter() - started)


def _finished_run(model: torch.nn.Module, run_dir: Path, dev: torch.device, resume: bool,
                  checkpointed: bool) -> RunResult | None:
    """The result of a run in ``run_dir`` that already ended, its trained weights loaded into ``model`` (on the
    device and in the layout training left it in); ``None`` when there is something to train. Damaged or missing
    weights: finish again from the last checkpoint (no epoch is retrained)."""
    finished = _finished_result(run_dir)
    if (checkpointed or finished is not None) and not resume:
        raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to continue it or choose "
                          "another --out")
    if finished is None or finished.status == "diverged":
        return finished
    trained = load_weights(run_dir / "model.safetensors")  # completed: the caller diagnoses or exports this model
    if trained is None:
        return None
    model.load_state_dict(trained)
    model.to(dev, memory_format=training_memory_format(dev))
    return finished


def _prepare(model: torch.nn.Module, data: DataSplits, recipe: Recipe, run_dir: Path, dev: torch.device, seed: int,
             rank: int, world: int, init_weights: dict[str, torch.Tensor] | None) -> _Training:
    """The model on its device and layout (warm-started from ``init_weights``), the optimizer, the batches."""
    model = model.to(dev, memory_format=training_memory_format(dev))
    if init_weights:
        model.load_state_dict(init_weights, strict=False)
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    train_batches = make_train_batches(data, recipe, dev, seed, rank, world)
    val_batches = eval_batches(data, data.val, recipe.eval_batch_size, dev, workers=recipe.workers)
    return _Training(model, model, optimizer, train_batches, val_batches, mixup_for(recipe, data), recipe, dev,
                     run_dir, rank, world, [], Evidence.empty(data.val.digest(), len(data.val)))


def _restore(run: _Training, saved: tuple[dict, dict]) -> None:
    """Continue from a checkpoint exactly: weights, optimizer, random state, data order, history, evidence."""
    weights, state = saved
    run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    run.train_batches.load_state_dict(state["loader"])
    run.history = [dict(h) for h in state["history"]]
    run.start_epoch = state["epoch"] + 1
    saved_evidence = load_evidence(run.run_dir)
    if saved_evidence is not None and saved_evidence.digest == run.evidence.digest:
        run.evidence = saved_evidence.up_to(run.start_epoch)


def _wrap(model: torch.nn.Module, dev: torch.device, world: int, compile_model: bool) -> torch.nn.Module:
    """The module that trains: data-parallel under torchrun, compiled if asked."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return torch.compile(net) if compile_model else net


def train_one_epoch(run: _Training, epoch: int, quiet: bool = False) -> tuple[float, int]:
    """One epoch of training steps: (mean training loss over all ranks, images seen)."""
    recipe, dev, net, optimizer = run.recipe, run.device, run.net, run.optimizer
    batches = run.train_batches
    if run.world > 1 and hasattr(batches, "sampler") and hasattr(batches.sampler, "set_epoch"):
        batches.sampler.set_epoch(epoch)
    net.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=dev)
    seen, steps = 0, len(batches)
    layout, autocast = training_memory_format(dev), training_autocast(dev)
    # Mixup's targets are probabilities with the smoothing already in them
    smoothing = 0.0 if run.mixup is not None else recipe.label_smoothing
    # disable=None: a bar only on a terminal (tqdm's convention); a log file gets the epoch lines alone
    bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{recipe.total_epochs}", leave=False,
               disable=True if quiet or not run.is_main else None, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if run.mixup is not None:
            if len(x) % 2:  # timm's batch mixing needs an even batch (an odd recipe.batch_size)
                x, y = x[:-1], y[:-1]
            x, y = run.mixup(x, y)
        x = x.contiguous(memory_format=layout)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(epoch, step, steps)
        with autocast:
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip_grad:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), recipe.clip_grad)
        optimizer.step()
        fault_point("train_step")
        loss_sum += loss.detach() * len(x)
        seen += len(x)
        if step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    if run.world > 1:
        stats = torch.stack([loss_sum, torch.tensor(float(seen), device=dev)])
        dist.all_reduce(stats)
        loss_sum, seen = stats[0], int(stats[1])
        for buffer in run.model.buffers():  # BatchNorm statistics of the last step differ by rank: take rank 0's
            dist.broadcast(buffer, 0)
    return float(loss_sum) / max(seen, 1), seen


def _validate(run: _Training, epoch: int, train_loss: float, images_per_s: float, t0: float) -> dict[str, float]:
    """Score the validation split, add its per-example outcomes to the evidence, and the epoch's row to history."""
    logits, labels = predict(run.model, run.val_batches, device=run.device, amp_dtype=run.amp_dtype,
                             channels_last=run.channels_last)
    val = summarize(logits, labels)
    run.evidence = run.evidence.with_epoch(epoch + 1, *per_example(logits, labels))
    row = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": train_loss,
           "val_acc": val["acc"], "val_top5": val["top5"], "val_nll": val["nll"], "val_ece": val["ece"],
           "images_per_s": images_per_s, "epoch_time": time.perf_counter() - t0}
    run.history.append(row)
    return row


def _end_epoch(run: _Training, epoch: int, row: dict[str, float], quiet: bool) -> None:
    """Checkpoint (the evidence first: every checkpointed epoch has its evidence), metrics, the epoch's line."""
    if run.is_main:
        run.evidence.save(run.run_dir)
        save_checkpoint(run.run_dir / "checkpoint", run.model.state_dict(), {
            "epoch": epoch, "optimizer": run.optimizer.state_dict(), "rng": rng_state(), "history": run.history,
            "loader": run.train_batches.state_dict(),
        })
        _write_metrics(run.run_dir, run.history, {"status": "running"})
        fault_point("epoch_end")
    if run.world > 1:
        dist.barrier()
    if not quiet and run.is_main:
        tqdm.write(f"epoch {epoch + 1}/{run.recipe.total_epochs}  loss {row['train_loss']:.4f}  val acc "
                   f"{row['val_acc']:.2f}%  nll {row['val_nll']:.3f}  {row['images_per_s']:.0f} img/s")


def _finish(run: _Training, data: DataSplits, status: str, error: str | None, wall_time: float) -> RunResult:
    """The run's result; a completed run is also scored on the test split and its weights saved."""
    history = run.history
    last = history[-1] if history else {}
    result = RunResult(
        status=status, run_dir=str(run.run_dir), epochs_completed=len(history), total_epochs=run.recipe.total_epochs,
        history=history, val={k[4:]: v for k, v in last.items() if k.startswith("val_")}, wall_time=wall_time,
        images_per_s=float(np.mean([h["images_per_s"] for h in history])) if history else 0.0, error=error,
    )
    if status == "completed":
        test = eval_batches(data, data.test, run.recipe.eval_batch_size, run.device, workers=run.recipe.workers)
        result.test = evaluate(run.model, test, device=run.device, amp_dtype=run.amp_dtype,
                               channels_last=run.channels_last)
    if run.is_main:
        if status == "completed":
            save_weights(run.run_dir / "model.safetensors", run.model.state_dict())
        _write_metrics(run.run_dir, history, {"status": status, "result": result.to_dict()})
    return result
