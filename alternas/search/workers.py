"""Several workers of one search on this machine: one process each, sharing the GPUs or the cores fairly.

Each worker is the ordinary command (``alternas buildup`` / ``alternas optuna``) on the study file saved in the
study folder, so N local workers behave exactly like N workers started by hand or on N machines. A worker gets one
visible GPU (round robin over ``CUDA_VISIBLE_DEVICES``), or on a CPU-only machine ``cores // N`` torch threads:
with every worker at torch's default thread count, two workers on two cores slowed one to 15-30 img/s against 470
img/s alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable

import torch

from alternas.data.loader import usable_cpus


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def worker_settings(workers: int) -> list[tuple[dict[str, str], int]]:
    """For each of ``workers`` local workers: its environment overrides and its torch thread count."""
    threads = max(1, usable_cpus() // workers)
    gpus = visible_gpus()
    settings = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        settings.append((env, threads))
    return settings


def launch_workers(args: list[str], workers: int, storage: str | None = None,
                   echo: Callable[[str], None] = print) -> int:
    """Run ``alternas ARGS --threads T`` as ``workers`` processes, each line they print prefixed with its worker,
    and wait for all of them. The storage URL travels in the environment (``ALTERNAS_STORAGE``), not on the
    command line where ``ps`` would show its password. Returns the worst exit status (2 if any worker had a usage
    error). Ctrl-C reaches every worker, since they share the terminal's process group."""
    procs, pumps = [], []
    for i, (env, threads) in enumerate(worker_settings(workers)):
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        if storage:
            full_env["ALTERNAS_STORAGE"] = storage
        proc = subprocess.Popen([sys.executable, "-m", "alternas", *args, "--threads", str(threads)], env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        where = f", GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else ""
        echo(f"[worker {i}] pid {proc.pid}, {threads} torch thread(s){where}")
        pump = threading.Thread(target=_pump, args=(proc, f"[worker {i}] ", echo), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    codes = [proc.wait() for proc in procs]
    for pump in pumps:
        pump.join()
    if 2 in codes:
        return 2
    return max((abs(c) for c in codes), default=0)


def _pump(proc: subprocess.Popen, prefix: str, echo: Callable[[str], None]) -> None:
    for line in proc.stdout:
        echo(prefix + line.rstrip("\n"))
