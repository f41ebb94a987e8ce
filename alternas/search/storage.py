"""Optuna storages shared by workers: opening one, naming a worker, keeping its trials alive, failing dead ones.

Both searches keep their shared state in an Optuna storage: an RDB (PostgreSQL, MySQL, SQLite) for workers on
many machines, or by default a journal file in the study folder. A worker killed mid-trial is found two ways: on
an RDB storage by Optuna's heartbeat (``fail_stale_trials``, any host), and on the journal file (no heartbeats) by
its process id when it ran on this host.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from alternas.errors import ConfigError

JOURNAL = "optuna.journal"


def redact(url: str) -> str:
    """A storage URL safe to print: the password (and any token in the query) replaced by ***."""
    url = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
    return re.sub(r"(?i)(password|token|secret)=[^&]+", r"\1=***", url)


def storage_url(url: str | None = None, configured: str | None = None) -> str | None:
    """Which storage URL applies: ``url`` (a flag) / ``$ALTERNAS_STORAGE`` / ``configured`` (the study file's
    ``optuna.storage``); ``None`` means the journal file in the study folder."""
    return url or os.environ.get("ALTERNAS_STORAGE") or configured


def open_storage(folder: Path, url: str | None = None, configured: str | None = None, heartbeat_s: int = 30,
                 grace_period_s: int = 90) -> Any:
    """The Optuna storage ``storage_url`` names, else the journal file in the study ``folder``."""
    url = storage_url(url, configured)
    if not url:
        folder.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    if url.startswith(("sqlite", "postgresql", "mysql", "oracle", "mssql")):
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback
        for attempt in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return SteadyRDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_period_s,
                                            heartbeat_stale_trial_callback=retry(max_retry=3))
            except ImportError as err:
                raise ConfigError(f"cannot open Optuna storage {redact(url)}: {err} (pip install "
                                  "'alternas[postgres]' for PostgreSQL)") from None
            except Exception as err:  # connection refused, bad credentials, or workers creating the schema at once
                if attempt == 3 or "UniqueViolation" not in repr(err) and "already exists" not in str(err):
                    raise ConfigError(f"cannot open Optuna storage {redact(url)}: {type(err).__name__}: "
                                      f"{redact(str(err)).splitlines()[0]}") from None
                time.sleep(0.5 + attempt)
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise ConfigError(f"unsupported Optuna storage {redact(url)} (scheme {scheme!r}); give a database URL "
                      "(sqlite:///PATH, postgresql://USER@HOST/DB, mysql://...) or none for the study's journal file")


def worker_attrs() -> dict[str, Any]:
    """What a trial records of the process that runs it, so that a restarted worker on this host can tell it died."""
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "worker_started": process_start(os.getpid())}


def mark_worker(trial_id: int, storage: Any) -> None:
    """``worker_attrs`` on a trial claimed outside ``study.optimize`` (the build-up's compare-and-set claim)."""
    for key, value in worker_attrs().items():
        storage.set_trial_user_attr(trial_id, key, value)


def trial_id_of(storage: Any, study: optuna.Study, number: int) -> int:
    """The storage's id of ``study``'s trial ``number``, through the storage's public API (a ``FrozenTrial``'s own
    ``_trial_id`` is private). ``storage`` is the one the study was opened on: writes through it are the study's."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def beats(storage: Any) -> bool:
    """Whether ``storage`` keeps heartbeats (an RDB storage opened with an interval; the journal file does not)."""
    return isinstance(storage, optuna.storages.RDBStorage) and bool(storage.get_heartbeat_interval())


def fail_dead_workers(study: optuna.Study, storage: Any, log: Callable[[str], None], requeue: bool = True) -> int:
    """Fail the RUNNING trials whose worker is gone: stale heartbeats on an RDB storage (any host), and on the
    journal file (no heartbeats) trials started on this host by a process that no longer exists. With ``requeue``
    a failed trial is enqueued again with the same parameters (the Optuna search; the build-up asks again by
    itself). ``storage`` is the one ``study`` was opened on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats (the journal file)
    if beats(storage):
        return 0  # liveness is the heartbeat's job: a pid says nothing of a container that shares the host name
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or alive(int(pid), trial.user_attrs.get("worker_started")):
            continue
        # ``study.tell`` refuses a trial this process did not start: the storage's own compare-and-set fails it, as
        # Optuna's ``fail_stale_trials`` does
        try:
            storage.set_trial_state_values(trial_id_of(storage, study, trial.number), state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker starting at the same time failed it first
        if requeue:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        failed += 1
        log(f"{'re-queued' if requeue else 'failed'} trial {trial.number} {trial.user_attrs.get('placement', '')} "
            f"(its worker pid {pid} died)")
    return failed


def alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` exists and, when its start time was recorded, is still that process (pids are
    reused: a new process with a dead worker's pid must not keep its trial RUNNING forever)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return same_start(started, process_start(pid)) is not False


START_TOLERANCE_S = 2.0  # psutil derives a start time from the boot time, which a step of the system clock moves


def process_start(pid: int) -> str | None:
    """When ``pid`` started (psutil's creation time, seconds since the epoch, as text); ``None`` where unknown."""
    try:
        return repr(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def same_start(recorded: str | None, now: str | None) -> bool | None:
    """Whether two start times (``process_start``) name one process, to ``START_TOLERANCE_S``; ``None`` when either
    is unknown, or was recorded by an older alternas as clock ticks since boot (a whole number: not comparable)."""
    if recorded is None or now is None or "." not in recorded or "." not in now:
        return None
    try:
        return abs(float(recorded) - float(now)) <= START_TOLERANCE_S
    except ValueError:
        return None


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {redact(str(err)).splitlines()[0] if str(err) else ''}"


class SteadyRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose heartbeats outlive a transient database error (a dropped connection, a restart, a
    lock held too long). ``study.optimize`` beats from a thread of Optuna's own that has no exception handling: one
    error would end it, and after the grace period another worker would fail the live trial and train it twice.
    Here a failed beat is said once per failing spell on stderr and the thread's next beat tries again."""

    _failing: bool = False

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.record_heartbeat_or_raise(trial_id)
        except Exception as err:  # noqa: BLE001 - any storage error: the next beat retries
            if not self._failing:
                print(f"alternas: heartbeat of trial {trial_id} failed ({_first_line(err)}); the next beat retries",
                      file=sys.stderr, flush=True)
            self._failing = True
        else:
            if self._failing:
                print(f"alternas: heartbeat of trial {trial_id} recovered", file=sys.stderr, flush=True)
            self._failing = False

    def record_heartbeat_or_raise(self, trial_id: int) -> None:
        """One beat, its error raised (alternas' own ``Heartbeat`` retries sooner than Optuna's thread does)."""
        super().record_heartbeat(trial_id)


class Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds while training runs outside ``study.optimize`` (which
    would do it itself), so that an RDB storage fails the trial only when its worker is really gone."""

    def __init__(self, storage: Any, trial_id: int, log: Callable[[str], None] = print) -> None:
        self.storage, self.trial_id, self.log = storage, trial_id, log
        self.interval = storage.get_heartbeat_interval() if beats(storage) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval:  # the thread's first beat is at once, and an error there is retried like any other
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        """Beat every ``interval``; a storage error (a dropped connection, a database restart) is retried sooner,
        with backoff, and said once: a dead heartbeat thread would let other workers fail a live trial."""
        wait, failing = 0.0, False
        while not self._stop.wait(wait):
            try:
                getattr(self.storage, "record_heartbeat_or_raise", self.storage.record_heartbeat)(self.trial_id)
            except Exception as err:  # noqa: BLE001 - any storage error: keep beating
                if not failing:
                    self.log(f"heartbeat of trial {self.trial_id} failed ({_first_line(err)}); retrying")
                failing, wait = True, min(self.interval, 1.0 if not failing else wait * 2)
            else:
                if failing:
                    self.log(f"heartbeat of trial {self.trial_id} recovered")
                failing, wait = False, self.interval

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
