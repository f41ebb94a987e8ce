"""The build-up's shared state in an Optuna study: one trial per evaluation, run by exactly one worker.

An evaluation (a placement trained with a seed, to the end or paused at the screening epoch) is a trial with fixed
parameters (``seed``, ``epochs``, ``num_msa``; the placement in a user attr) in the study ``<name>:buildup`` of the
storage. Its life uses Optuna's own states: WAITING (asked for), RUNNING (claimed by one worker, with heartbeats on
RDB storages), COMPLETE (its result and the per-example evidence decisions read, as user attributes) or FAIL (a
crash, with its result; or a dead, interrupted or cancelled worker, without one). A FAIL is never evidence: the
evaluation is asked for again. Decisions therefore need no shared filesystem: any worker on any machine replays
them from the storage alone.

Claiming is Optuna's compare-and-set from WAITING to RUNNING (what ``study.optimize`` uses for enqueued trials).
Two workers may each ask for the same evaluation before seeing the other's trial; then each claims its own twin,
and after claiming looks again: whoever sees another claimed or finished twin gives its claim up. Of two claims,
the later one's look sees the earlier one, so at most one trains; rarely both give up, and it is asked again.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from alternas.errors import ConfigError
from alternas.search.evaluated import Evaluated, EvaluationRequest
from alternas.search.evaluator import CandidateResult, content_digest, training_settings, warm_recipe
from alternas.search.storage import (
    Heartbeat,
    beats,
    fail_dead_workers,
    mark_worker,
    open_storage,
    same_start,
    trial_id_of,
    worker_attrs,
)
from alternas.search.study import BuildupConfig, StudyConfig
from alternas.search.table import start_placement

SUFFIX = ":buildup"


@dataclass
class Snapshot:
    """The shared evaluations as this worker sees them now."""

    done: dict[str, Evaluated]  # evaluation id -> its finished result
    running: set[str]  # evaluation ids some worker is running


# what a search stored before a key existed ran with
SETTINGS_BEFORE_THEY_WERE_STORED = {"pool_seed_variance": False, "accept_spending": "equal"}


BUILDUP_KEYS = {f.name for f in fields(BuildupConfig)}


def _yaml_value(value: Any) -> str:
    """A stored setting as a study file (or ``--set``) writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def decision_settings(config: StudyConfig) -> dict[str, Any]:
    """What decides the build-up's answers: every worker of one search must agree on these (``max_candidates`` and
    ``budget_hours`` only say when to stop, so a resumed search may change them)."""
    b = config.buildup
    low, high = config.seed_budget
    training = {k: v if k == "window_size" else content_digest(v)
                for k, v in training_settings(config, config.recipe).items()}
    return {"seeds": list(config.seeds), "start": str(start_placement(config)), "min_gain": b.min_gain,
            "confidence": b.confidence, "min_seeds": low, "max_seeds": high, "screen_at": b.screen_at,
            "pool_seed_variance": b.pool_seed_variance, "accept_spending": b.accept_spending, "patience": b.patience,
            "warm_start": b.warm_start, "warm_start_epochs": b.warm_start_epochs, **training}


def encode_correct(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode("ascii")


def decode_correct(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


class SharedEvaluations:
    """The build-up's evaluations of one study in an Optuna storage (``url``, else ``$ALTERNAS_STORAGE``, else the
    study's ``optuna.storage``, else the journal file in its folder)."""

    def __init__(self, config: StudyConfig, url: str | None = None, *, retry_failed: bool = False,
                 log: Callable[[str], None] = print) -> None:
        oc = config.optuna
        self.config, self.retry_failed, self.log = config, retry_failed, log
        self.storage = open_storage(config.output_dir, url, oc.storage, oc.heartbeat_s, oc.grace_period_s)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(study_name=f"{oc.study_name or config.name}{SUFFIX}", storage=self.storage,
                                         load_if_exists=True, direction="maximize")
        self._check_joins(config)
        self.me = worker_attrs()
        self._decoded: dict[int, Evaluated] = {}

    def _check_joins(self, config: StudyConfig) -> None:
        """Refuse, before anything runs, a worker whose decision settings differ from the search it joins (two
        policies would replay different decisions and overwrite each other's trajectory), and on a shared database
        a second study folder on this host under the same study name (its runs would decide for a folder whose
        report and export cannot see them). Other hosts keep their own folders: that is the many-machine mode."""
        name = self.study.study_name
        if self.study.user_attrs.get("decision_settings") is None or not self._trials():
            # a search that evaluated nothing yet decided nothing: take these (two workers starting at once with
            # different settings both write; ``claim`` reads them again, and the one whose settings were overwritten
            # stops at its next claim)
            self.study.set_user_attr("decision_settings", decision_settings(config))
        self._refuse_other_settings()
        if isinstance(self.storage, optuna.storages.JournalStorage):
            return  # the journal file lives in the study folder: one folder per storage by construction
        host, folder = socket.gethostname(), str(Path(config.output_dir).resolve())
        folders = dict(self.study.user_attrs.get("folders", {}))
        if folders.get(host, folder) != folder:
            raise ConfigError(f"the build-up {name!r} in this storage belongs to the study folder {folders[host]} on "
                              f"this host, not {folder}: use that folder, or give this study another `name`")
        if host not in folders:
            self.study.set_user_attr("folders", {**folders, host: folder})

    def _refuse_other_settings(self) -> None:
        """One line naming every decision setting that differs between this worker and the search's stored ones."""
        mine = decision_settings(self.config)
        stored = {**SETTINGS_BEFORE_THEY_WERE_STORED, **self.study.user_attrs.get("decision_settings", mine)}
        ignored = {"accept_spending"} if mine["min_seeds"] == mine["max_seeds"] else set()  # one look: nothing shared
        differing = sorted(k for k in (mine.keys() | stored.keys()) - ignored if mine.get(k) != stored.get(k))
        if differing:
            shown = ", ".join(f"{k} {stored.get(k)!r} (here {mine.get(k)!r})" for k in differing)
            keys = [f"buildup.{k}={_yaml_value(stored.get(k))}" for k in differing if k in BUILDUP_KEYS]
            same = f" ({', '.join(keys)})" if keys else ""
            raise ConfigError(f"the build-up {self.study.study_name!r} in this storage runs with other settings: "
                              f"{shown}; run it with the same settings{same}, or start another study (another "
                              "`name` or --out)")

    # -- reading --------------------------------------------------------------------------------------------------
    def _trials(self, evaluation: str | None = None) -> list[FrozenTrial]:
        trials = self.study.get_trials(deepcopy=False)
        return [t for t in trials if "evaluation" in t.user_attrs
                and (evaluation is None or t.user_attrs["evaluation"] == evaluation)]

    def _mine(self, trial: FrozenTrial) -> bool:
        attrs = trial.user_attrs
        return attrs.get("worker") == self.me["worker"] and bool(
            same_start(attrs.get("worker_started"), self.me["worker_started"]))

    def _counts(self, trial: FrozenTrial) -> bool:
        """Whether a finished trial stands for its evaluation in this worker's view: a COMPLETE one (a crash is a
        FAIL and never evidence: it is asked for again); with ``retry_failed`` a divergence counts only once this
        worker has run it again."""
        result = trial.user_attrs.get("result")
        if result is None or trial.state != TrialState.COMPLETE:
            return False
        return not (self.retry_failed and result["status"] == "diverged") or self._mine(trial)

    def _taken(self, trial: FrozenTrial) -> bool:
        return trial.state == TrialState.RUNNING or self._counts(trial)

    def snapshot(self) -> Snapshot:
        done: dict[str, Evaluated] = {}
        running: set[str] = set()
        for trial in sorted(self._trials(), key=lambda t: t.number):
            evaluation = trial.user_attrs["evaluation"]
            if trial.state == TrialState.RUNNING:
                running.add(evaluation)
            elif self._counts(trial) and evaluation not in done:
                done[evaluation] = self._decode(trial)
        return Snapshot(done, running)

    def _decode(self, trial: FrozenTrial) -> Evaluated:
        if trial.number not in self._decoded:  # finished trials never change: decode each once
            attrs = trial.user_attrs
            n = attrs.get("n_examples", 0)
            self._decoded[trial.number] = Evaluated(
                CandidateResult.from_dict(attrs["result"]),
                {int(epoch): decode_correct(text, n) for epoch, text in attrs.get("correct", {}).items()},
                attrs.get("last_epoch"), attrs.get("val_digest"))
        return self._decoded[trial.number]

    # -- claiming and recording -----------------------------------------------------------------------------------
    def claim(self, request: EvaluationRequest) -> int | None:
        """Make this worker the one that runs ``request``: its trial id, or ``None`` if another worker has it or
        it is finished."""
        twins = self._trials(request.id)
        if any(self._taken(t) for t in twins):
            return None
        if not any(t.state == TrialState.WAITING for t in twins):
            self.study.add_trial(self._waiting_trial(request))
            twins = self._trials(request.id)
        # ``study.ask`` cannot claim a chosen WAITING trial (it pops the oldest one): this uses the storage's public
        # compare-and-set, as ``study.ask`` itself does. Writes through the storage the study was opened on are the
        # study's (its cache re-reads unfinished trials).
        storage = self.storage
        for trial in sorted((t for t in twins if t.state == TrialState.WAITING), key=lambda t: t.number):
            trial_id = self._id(trial)
            try:
                if storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    break
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        else:
            return None
        mark_worker(trial_id, storage)
        if beats(storage):  # a worker killed before its heartbeat thread starts must still go stale, not stay RUNNING
            storage.record_heartbeat(trial_id)
        if any(self._taken(t) for t in self._trials(request.id) if t.number != trial.number):
            self.release(trial_id, "twin")  # another worker claimed a twin first
            return None
        try:  # read again at every claim: a worker that started in the same instant may have stored its own
            self._refuse_other_settings()
        except ConfigError:
            self.release(trial_id, "other settings")
            raise
        return trial_id

    def _id(self, trial: FrozenTrial) -> int:
        return trial_id_of(self.storage, self.study, trial.number)

    def _waiting_trial(self, request: EvaluationRequest) -> FrozenTrial:
        epochs = request.stop_after or (warm_recipe(self.config) if request.parent_key
                                        else self.config.recipe).total_epochs
        fixed = {"seed": request.seed, "epochs": epochs, "num_msa": request.placement.upper().count("M")}
        return optuna.trial.create_trial(  # the placement is a user attr: RDB storages refuse a categorical
            state=TrialState.WAITING,       # parameter whose choices differ between trials
            params=fixed, distributions={name: IntDistribution(v, v) for name, v in fixed.items()},
            user_attrs={"evaluation": request.id, "placement": request.placement, "key": request.key,
                        "parent": request.parent_key})

    def record(self, trial_id: int, evaluated: Evaluated) -> None:
        """Finish a claimed trial with its result: COMPLETE, or FAIL for a crash (kept for the record, asked for
        again)."""
        storage, result = self.storage, evaluated.result
        first = next(iter(evaluated.correct.values()), None)
        attrs = {"result": asdict(result), "n_examples": 0 if first is None else len(first),
                 "correct": {str(e): encode_correct(c) for e, c in evaluated.correct.items()},
                 "last_epoch": evaluated.last_epoch, "val_digest": evaluated.digest}
        state = TrialState.FAIL if result.status == "failed" else TrialState.COMPLETE
        values = None if state == TrialState.FAIL else [result.val_acc if result.val_acc is not None else 0.0]
        try:
            for key, value in attrs.items():
                storage.set_trial_user_attr(trial_id, key, value)
            storage.set_trial_state_values(trial_id, state, values=values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker failed the claim as stale (a heartbeat that could not reach the storage): the work is
            # done all the same, so it is stored as a finished trial of its own rather than lost
            claimed = self.storage.get_trial(trial_id)
            self.study.add_trial(optuna.trial.create_trial(
                state=state, values=values, params=claimed.params, distributions=claimed.distributions,
                user_attrs={**claimed.user_attrs, **worker_attrs(), **attrs}))
            self.log(f"trial {claimed.number} was failed by another worker while this one trained it; its result "
                     "is stored as a new trial")

    def release(self, trial_id: int, why: str) -> None:
        """Give a claimed trial up without a result (interrupted, cancelled, a twin): it will be asked for again."""
        try:
            self.storage.set_trial_user_attr(trial_id, "released", why)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # already failed as stale by another worker

    def heartbeat(self, trial_id: int) -> Heartbeat:
        return Heartbeat(self.storage, trial_id, self.log)

    def fail_dead_workers(self) -> int:
        return fail_dead_workers(self.study, self.storage, self.log, requeue=False)
