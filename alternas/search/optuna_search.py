"""The Optuna search over placements: space -> trial parameters -> placement -> the shared evaluator.

Storage: a journal file in the study folder by default (no server), or any Optuna storage URL so that workers on
many machines share one study. ``trials`` is the study's total over all workers. A worker killed mid-trial loses
nothing: on an RDB storage Optuna's heartbeat fails the stale trial and ``RetryHeartbeatStaleTrialCallback``
re-queues it; on the journal file a restarted worker re-queues the RUNNING trials of dead workers on its host.
Either way the retried candidate resumes from its last epoch checkpoint. A seed whose run crashed (out of memory, a
dead loader) fails its trial without a score and queues the placement again; a seed that diverged (its own,
deterministic outcome) prunes it: a placement is never scored on the seeds that happened to finish.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import optuna
from optuna.trial import TrialState

from alternas.data.augment import check_full_batch
from alternas.data.datasets import DataSplits, load_data
from alternas.errors import AlternasError, ConfigError, PlacementError
from alternas.placement import Placement
from alternas.search.evaluator import SELECTS_ON_TEST, CandidateResult, Evaluator, mean_over
from alternas.search.spaces import InvalidCandidate, SearchSpace, default_space_path, load_space
from alternas.search.storage import JOURNAL, beats, fail_dead_workers, open_storage, worker_attrs
from alternas.search.study import Pruner, Sampler, StudyConfig, StudyFolder

# objective name -> (result attribute, direction)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "acc": ("val_acc", "maximize"),
    "nll": ("val_nll", "minimize"),
    "ece": ("val_ece", "minimize"),
    "lambda_max": ("lambda_max", "minimize"),
    "nep": ("nep", "minimize"),
    "ape": ("ape", "minimize"),
    "robustness": ("robustness", "maximize"),
    "params": ("params", "minimize"),
    "flops": ("flops", "minimize"),
}
HESSIAN_OBJECTIVES = ("lambda_max", "nep", "ape")
CRASH_RETRIES = 3  # attempts at a placement whose runs crash (out of memory, ...); also the extra trials a run has
SAMPLERS = get_args(Sampler)
PRUNERS = get_args(Pruner)


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The sampler ``alternas optuna --sampler name`` searches with; ``alternas bench search`` replays the same one."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def _pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")


def _known_placements(config: StudyConfig, space: SearchSpace) -> list[tuple[str, Placement]]:
    """The base, the paper's AlterNet for that base and the build-up result (if the folder has one)."""
    from alternas.models.bases import get_base

    base = get_base(space.base)
    known = [("base", Placement.all_conv(base.depths))]
    if base.paper_msa_counts:
        known.append(("paper", Placement.from_counts(base.depths, base.paper_msa_counts)))
    trajectory = StudyFolder(config.output_dir).read_json("trajectory.json")
    if trajectory and trajectory.get("best"):
        known.append(("buildup", Placement.parse(trajectory["best"])))
    return known


def run_optuna(
    config: StudyConfig,
    *,
    trials: int | None = None,
    storage: str | None = None,
    quiet: bool = False,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run this worker's share of the study's ``trials`` (shared with other workers through the storage);
    ``retry_failed`` trains diverged candidates again."""
    oc = config.optuna
    trials = trials or oc.trials
    names = list(oc.objectives)
    for name in names:
        if name not in OBJECTIVES:
            raise ConfigError(f"unknown objective {name!r}; choose from: {', '.join(OBJECTIVES)}")
        if name in HESSIAN_OBJECTIVES and not config.diagnostics.hessian:
            raise ConfigError(f"objective {name!r} needs the Hessian diagnostics, but diagnostics.hessian is false; "
                              "turn it on or choose another objective")
        if name == "robustness" and not config.diagnostics.corruptions:
            raise ConfigError("objective 'robustness' needs diagnostics.corruptions: true (accuracy on corrupted "
                              "images); turn it on or choose another objective")
    space = load_space(oc.space or default_space_path(config.base))
    if space.base.split("@")[0] != config.base.split("@")[0]:
        raise ConfigError(f"{space.source} is a space over base {space.base!r} but the study's base is "
                          f"{config.base!r}; pass --base {space.base} or another --space")
    # the data is loaded (a missing dataset is one line) before the storage holds any trial of this run
    data = load_data(config.data)
    check_full_batch(data, config.recipe)
    multi = len(names) > 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = [OBJECTIVES[n][1] for n in names]
    opened = open_storage(config.output_dir, storage, oc.storage, oc.heartbeat_s, oc.grace_period_s)
    study = optuna.create_study(
        study_name=oc.study_name or config.name, storage=opened, load_if_exists=True,
        directions=directions, sampler=make_sampler(oc.sampler, oc.seed, space),
        pruner=None if multi else _pruner(oc.pruner, config.recipe.total_epochs),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)
    StudyFolder(config.output_dir).save_config(config)
    study.set_user_attr("selection_split", "test" if config.data.val_fraction == 0 else "val")
    if config.data.val_fraction == 0:
        log(SELECTS_ON_TEST)
    fail_dead_workers(study, opened, log)  # failed and re-queued now, so that they do not count as running below
    for label, placement in _known_placements(config, space):
        params = space.encode(placement)
        if params is None:
            log(f"not enqueued: the {label} placement {placement} is outside {space.source}")
        else:  # skipped when any trial (this run's or a resumed study's, in any state) already has these params
            study.enqueue_trial(params, user_attrs={"enqueued": label}, skip_if_exists=True)
    objective = _Objective(config, space, names, multi, quiet, log, data, retry_failed)
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def run_remaining() -> None:
        remaining = trials - len(study.get_trials(deepcopy=False, states=counted))
        if remaining > 0:  # a finished study is only reported: optimize would run one more trial before the callback
            # a crashed trial fails without counting and is queued again: room for CRASH_RETRIES of them in this run
            study.optimize(objective, n_trials=remaining + CRASH_RETRIES, catch=(),
                           callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted)])
            if objective.stopped_by is not None:
                optuna.logging.set_verbosity(optuna.logging.WARNING)
                raise objective.stopped_by

    running_at_start = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    run_remaining()
    if beats(opened) and running_at_start:
        _settle(study, opened, running_at_start, oc.grace_period_s + oc.heartbeat_s, min(oc.heartbeat_s, 5),
                run_remaining, log)
    Evaluator(config).write_table()  # whole even if a killed worker left it one row behind its result files
    return study


def _settle(study: optuna.Study, storage: Any, unsettled: set[int], wait_s: float, poll_s: float,
            run_remaining: Callable[[], None], log: Callable[[str], None]) -> None:
    """Wait until each trial that was RUNNING when this worker started has finished or been retried, running any
    retry here. A trial whose worker died moments before this one started is not yet stale on a heartbeat storage:
    it counts as running toward the study's total, so without the wait this worker would finish the study one
    trial short and leave that trial RUNNING until some later worker looks. A live worker's trial ends by itself;
    after ``wait_s`` (the grace period and a heartbeat) nothing still running can be a dead worker's."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        fail_dead_workers(study, storage, log)  # a stale trial fails and the heartbeat's callback queues its retry
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        for number in sorted(n for n in unsettled if states[n] == TrialState.FAIL):
            log(f"trial {number} stopped beating (its worker died): retried here")
        unsettled = {n for n in unsettled if states[n] == TrialState.RUNNING}
        run_remaining()
        if not unsettled or time.monotonic() > deadline:
            return
        if not said:
            log(f"waiting up to {wait_s:.0f} s for trial(s) {', '.join(map(str, sorted(unsettled)))}, running when "
                "this worker started: finished by their worker, or retried here if their heartbeat goes stale")
            said = True
        time.sleep(poll_s)


class _Objective:
    """One trial: sample -> evaluate every seed -> report epochs for pruning -> record everything."""

    def __init__(self, config: StudyConfig, space: SearchSpace, names: list[str], multi: bool, quiet: bool,
                 log: Callable[[str], None], data: DataSplits, retry_failed: bool = False) -> None:
        self.config, self.space, self.names, self.multi, self.log = config, space, names, multi, log
        self.quiet, self.retry_failed = quiet, retry_failed
        self.gate_epoch = max(1, config.recipe.total_epochs // 3)
        self.data = data  # trials vary the base and window, never the data: decoded once, before the first trial
        self.stopped_by: AlternasError | None = None  # a user error met inside a trial: the run stops on it

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        """The trial's score; a user error (an unreadable image, a value only training can check) fails the trial
        without Optuna's logged traceback and stops the study, and ``run_optuna`` says it in one line."""
        try:
            return self._run(trial)
        except AlternasError as err:
            trial.set_user_attr("error", str(err))
            self.stopped_by = err
            trial.study.stop()
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # not "Trial N failed with value nan" as well
            return [math.nan] * len(self.names) if self.multi else math.nan

    def _run(self, trial: optuna.Trial) -> float | list[float]:
        for key, value in worker_attrs().items():
            trial.set_user_attr(key, value)
        try:
            placement, base, window = self.space.sample(trial)
        except InvalidCandidate as err:
            trial.set_user_attr("invalid", str(err))
            self.log(f"[trial {trial.number}] invalid: {err} (pruned)")
            raise optuna.TrialPruned(f"invalid placement: {err}") from None
        cfg = replace(self.config, base=base, window_size=window or self.config.window_size)
        evaluator = Evaluator(cfg, StudyFolder(self.config.output_dir), quiet=self.quiet,
                              retry_failed=self.retry_failed, load=lambda _: self.data)
        trial.set_user_attr("placement", str(placement))
        trial.set_user_attr("base", base)
        self.log(f"[trial {trial.number}] {placement} ({placement.describe()}) on {base}")
        runs: list[CandidateResult] = []
        for i, seed in enumerate(cfg.seeds):
            callback = self._pruning_callback(trial) if i == 0 else None
            try:
                runs.append(evaluator.evaluate(placement, seed, epoch_callback=callback))
            except PlacementError as err:  # e.g. a sampled window that does not tile a stage: this trial only
                trial.set_user_attr("invalid", str(err))
                self.log(f"[trial {trial.number}] invalid: {err} (pruned)")
                raise optuna.TrialPruned(f"invalid placement: {err}") from None
        self._record(trial, runs)
        crashed = [r for r in runs if r.status == "failed"]
        if crashed:  # a crash is never the placement's outcome: no score, and the placement is asked for again
            attempt = int(trial.user_attrs.get("attempt", 1))
            said = f"[trial {trial.number}] seed {crashed[0].seed} crashed ({crashed[0].error}): the trial fails"
            if attempt < CRASH_RETRIES:
                trial.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "attempt": attempt + 1})
                self.log(f"{said} without a score and its placement is queued again (it resumes from its checkpoint)")
            else:
                self.log(f"{said}; it crashed {attempt} times in a row and is not queued again: see "
                         f"{Path(crashed[0].run_dir) / 'error.log'}")
            return [math.nan] * len(self.names) if self.multi else math.nan
        unfinished = [r for r in runs if r.status != "completed"]
        if unfinished:  # as in the build-up: a seed that diverged fails the placement, never a score on the rest
            first = unfinished[0]
            self.log(f"[trial {trial.number}] {len(unfinished)} of {len(runs)} seeds did not complete (seed "
                     f"{first.seed}: {first.status}) (pruned)")
            raise optuna.TrialPruned(f"{len(unfinished)} of {len(runs)} seeds ended {first.status}: {first.error}")
        values = [statistics.fmean(getattr(r, OBJECTIVES[n][0]) for r in runs) for n in self.names]
        self.log(f"    {', '.join(f'{n} {v:.4g}' for n, v in zip(self.names, values))}")
        return values if self.multi else values[0]

    def _pruning_callback(self, trial: optuna.Trial) -> Callable[[int, dict], None]:
        """Single objective: report val acc per epoch to the pruner. Multi-objective (no Optuna pruning): a
        low-fidelity gate — stop at 1/3 of the epochs if val acc is below the median of finished trials there."""
        def report(epoch: int, row: dict[str, float]) -> None:
            acc = row["val_acc"]
            if not self.multi:
                trial.report(acc, epoch + 1)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at_epoch", epoch + 1)
                    raise optuna.TrialPruned(f"pruned at epoch {epoch + 1} (val acc {acc:.2f})")
            elif epoch + 1 == self.gate_epoch:
                trial.set_user_attr("gate_acc", acc)
                earlier = [t.user_attrs["gate_acc"] for t in trial.study.get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE,)) if "gate_acc" in t.user_attrs]
                if len(earlier) >= 3 and acc < statistics.median(earlier):
                    trial.set_user_attr("pruned_at_epoch", epoch + 1)
                    raise optuna.TrialPruned(f"below the median gate accuracy at epoch {epoch + 1}")

        return report

    def _record(self, trial: optuna.Trial, runs: list[CandidateResult]) -> None:
        done = [r for r in runs if r.status == "completed"]
        for attr in ("val_acc", "val_nll", "val_ece", "test_acc", "lambda_max", "nep", "ape", "robustness",
                     "images_per_s"):
            trial.set_user_attr(attr, mean_over(done, attr))
        trial.set_user_attr("params", runs[0].params)
        trial.set_user_attr("flops", runs[0].flops)
        trial.set_user_attr("delta_high", done[0].delta_high if done else {})
        trial.set_user_attr("run_dirs", [r.run_dir for r in runs])
        trial.set_user_attr("keys", [r.key for r in runs])
        trial.set_user_attr("seeds", [r.seed for r in runs])
        trial.set_user_attr("statuses", [r.status for r in runs])


def load_optuna_study(config: StudyConfig, storage: str | None = None) -> optuna.Study:
    name = config.optuna.study_name or config.name
    try:
        opened = open_storage(config.output_dir, storage, config.optuna.storage)
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        raise ConfigError(f"no Optuna study named {name!r} in this storage; run `alternas optuna` first") from None


def has_optuna(folder: Path) -> bool:
    return (folder / JOURNAL).is_file()
