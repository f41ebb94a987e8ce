"""Writers of small datasets in real on-disk formats (for tests of the real readers), and process helpers."""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from click.testing import CliRunner


def write_cifar(root: Path, name: str, n_train: int = 60, n_test: int = 20, seed: int = 0, tarball: bool = False
                ) -> np.ndarray:
    """CIFAR python-pickle layout (``cifar-10-batches-py`` or ``cifar-100-python``); returns the train labels."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    train_labels = rng.integers(0, classes, n_train)

    def dump(fname: str, labels: np.ndarray) -> None:
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / fname, "wb") as fh:
            pickle.dump({"data": data, label_key: labels.tolist(), "batch_label": fname}, fh)

    if name == "cifar10":
        for i, chunk in enumerate(np.array_split(train_labels, 5), start=1):
            dump(f"data_batch_{i}", chunk)
        dump("test_batch", rng.integers(0, classes, n_test))
        meta = {"label_names": [f"class{i}" for i in range(classes)]}
        meta_name = "batches.meta"
    else:
        dump("train", train_labels)
        dump("test", rng.integers(0, classes, n_test))
        meta = {"fine_label_names": [f"class{i}" for i in range(classes)], "coarse_label_names": []}
        meta_name = "meta"
    with open(folder / meta_name, "wb") as fh:
        pickle.dump(meta, fh)
    if tarball:
        archive = root / f"{folder.name.replace('-batches-py', '-python')}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        shutil.rmtree(folder)
    return train_labels


def postgres_url() -> str:
    """The PostgreSQL server of the tests (``.ci/postgres.sh`` starts one); skip without it, fail on CI."""
    import pytest

    url = os.environ.get("ALTERNAS_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide ALTERNAS_TEST_POSTGRES (.ci/postgres.sh starts the server)")
        pytest.skip("no PostgreSQL server: set ALTERNAS_TEST_POSTGRES=postgresql://... (see .ci/postgres.sh)")
    return url


def small_study(tmp_path: Path, **overrides) -> dict:
    """A study mapping that trains in seconds on the CPU (tiny base, 300 shapes images, 1 epoch); a dict override
    updates its section, anything else replaces the key."""
    raw = {
        "name": "t", "base": "tiny", "seeds": [0], "output": str(tmp_path / "study"),
        "data": {"name": "shapes", "subset": 300, "val_fraction": 0.2},
        "recipe": {"name": "fast", "epochs": 1, "warmup_epochs": 0, "batch_size": 64},
        # the top Hessian eigenvalue to 2 % (not 0.1 %): a quarter of a small study's time, the same code path
        "diagnostics": {"hessian": True, "hessian_batches": 1, "hessian_batch_size": 8, "hessian_tol": 0.02,
                        "fourier_images": 16},
        "buildup": {"min_gain": 0.0, "max_candidates": 3},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def write_imagefolder(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 48),
                      ext: str = "png", val_per_class: int | None = None) -> None:
    """torchvision's ImageFolder layout, ``train/`` and ``val/``; class c is drawn brighter than c - 1."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class or per_class)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(count):
                arr = np.full((size[1], size[0], 3), 40 + 80 * c, dtype=np.uint8)
                arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img_{i}.{ext}")


def interrupt_after_first_epoch(epoch: int, _: dict) -> None:
    """A ``fit`` epoch callback: Ctrl-C as the first epoch ends (its checkpoint written)."""
    if epoch == 0:
        raise KeyboardInterrupt


def kill_mid_candidate(proc: subprocess.Popen | AlternasProcess, candidates: Path, after_finished: int = 0,
                       timeout: float = 300) -> tuple[Path, list[dict]]:
    """SIGKILL ``proc``'s process group once a candidate has an epoch checkpoint but no result yet (and at least
    ``after_finished`` candidates are done); returns that candidate's folder and the epochs it had recorded."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(candidates.glob("*/result.json"))) >= after_finished:
            for state in candidates.glob("*/checkpoint/state.pt"):
                victim = state.parent.parent
                if not (victim / "result.json").exists() and (victim / "metrics.json").exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return victim, json.loads((victim / "metrics.json").read_text())["history"]
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before it was killed mid-candidate")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the process never reached an unfinished candidate's first checkpoint")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real ``alternas`` command run in this process by click's runner: the same entry point, exit code,
    stdout and stderr as ``python -m alternas``, without a new interpreter importing torch and timm each time
    (~10 s on a 2-core machine). An exception that escaped the CLI is put into stderr as the traceback a user
    would have seen. Tests that need a process of its own (kills, concurrent workers) use `AlternasProcess`;
    torchrun and the installed console script use ``subprocess``."""
    from alternas.cli import main

    result = CliRunner().invoke(main, list(args), env=env, prog_name="alternas")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["alternas", *args], result.exit_code, result.stdout, stderr)


# A server process that imported alternas and what its commands import (torch, timm, optuna, pandas, plotly) once;
# every `AlternasProcess` is forked from it.
_PRELOADED = multiprocessing.get_context("forkserver")
_PRELOADED.set_forkserver_preload(["alternas.cli", "alternas.search", "alternas.search.optuna_search",
                                   "alternas.report", "alternas.train.run", "alternas.diagnostics.run"])
_STARTED: set[AlternasProcess] = set()  # started by this test and not yet cleaned up (killed, folder removed)


def _alternas_child(args: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    """What ``python -m alternas ARGS`` does, in a process forked from the preloaded server."""
    for fd, path in ((1, out_path), (2, err_path)):  # first: whatever fails below is in the test's output
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115 (the process's stdout)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    multiprocessing.set_start_method(None, force=True)  # the platform's default, as in a fresh interpreter
    os.setpgrp()  # a process group of its own (not a new session): killpg reaches it and the workers it starts
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    from alternas.cli import main

    try:
        main(args=args, prog_name="alternas")
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends its children with os._exit, which skips them


class AlternasProcess:
    """``python -m alternas ARGS`` as a real process of its own (its pid, exit code, SIGKILL, process group, the
    workers it starts), with ``subprocess.Popen``'s ``pid``/``poll``/``wait``/``communicate``/``returncode``.

    It is forked from a server that imported alternas once: a fresh interpreter spends ~10 s importing torch, timm
    and torchvision on a 2-core machine, which was most of the time of the kill and worker tests. What a fork does
    not give: a fresh hash seed per process (the worker tests still compare against fresh `--workers`
    interpreters), and the installed console script (``test_cli_arch.py``, ``test_terminal_output.py`` run it)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 merge_stderr: bool = False) -> None:
        self.args = ["alternas", *args]
        self._folder = tempfile.mkdtemp(prefix="alternas-process-")
        self._out = os.path.join(self._folder, "stdout")
        self._err = self._out if merge_stderr else os.path.join(self._folder, "stderr")
        self._merged = merge_stderr
        self._process = _PRELOADED.Process(target=_alternas_child, args=(
            [*args], {**os.environ, **(env or {})}, str(cwd or os.getcwd()), self._out, self._err))
        self._process.start()
        self.pid = self._process.pid
        _STARTED.add(self)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        """Wait for the end; (stdout, stderr), stderr None when it went into stdout."""
        self.wait(timeout)
        out = self._read(self._out)
        err = None if self._merged else self._read(self._err)
        self._clean_up()
        return out, err

    def kill(self) -> None:
        """SIGKILL its process group (its workers too) if it still runs, wait for it, and drop its output. A process
        that ended is not signalled: its pid may already belong to another test's process (pid_max is 32768)."""
        if self._process.exitcode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:  # not yet its own group leader
                self._process.kill()
            self._process.join()
        self._clean_up()

    def _clean_up(self) -> None:
        _STARTED.discard(self)
        shutil.rmtree(self._folder, ignore_errors=True)

    @staticmethod
    def _read(path: str) -> str:
        return Path(path).read_text(encoding="utf-8") if os.path.exists(path) else ""


def end_test_processes() -> None:
    """Kill every `AlternasProcess` a test left running (a failed assertion, a pytest timeout): it would keep
    training, and multiprocessing would make pytest wait for it at exit. Also remove the output folders of those a
    test only waited for."""
    for process in list(_STARTED):
        process.kill()


def run_alternas(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, alternas, *args], capture_output=True, text=True)`` in an `AlternasProcess`."""
    process = AlternasProcess(args, env, cwd)
    try:
        out, err = process.communicate(timeout)
    except BaseException:  # a timeout, a pytest timeout, Ctrl-C: never leave it running
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err or "")


def write_idx(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gz: bool = False
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The MNIST family's four idx files in ``root`` (big-endian magic 0x00000803 with dims N, 28, 28 for images,
    0x00000801 with N for labels; gzipped as distributed with ``gz``); returns {"train"|"test": (images, labels)}.
    Labels cycle through the 10 classes in a seeded order."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        image_file = struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes()
        label_file = struct.pack(">II", 0x801, n) + labels.tobytes()
        for stem, payload in ((f"{prefix}-images-idx3-ubyte", image_file), (f"{prefix}-labels-idx1-ubyte", label_file)):
            if gz:
                with gzip.open(root / f"{stem}.gz", "wb") as fh:
                    fh.write(payload)
            else:
                (root / stem).write_bytes(payload)
        written[split] = (images, labels)
    return written
