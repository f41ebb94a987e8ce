"""One build-up worker: the loop that any number of processes run against one Optuna storage (PAPER.md §3).

``run_buildup`` plans from the shared storage (``alternas.search.planner``: the search replayed from the finished
evaluations every worker sees, plus what-if branches for speculative work), claims the most needed evaluation no
one runs (``alternas.search.evaluations``), trains it through the shared evaluator, records it, and plans again,
until the search is decided. A single worker is the same loop. It writes ``trajectory.json`` as decisions land.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from filelock import FileLock

from alternas.errors import AlternasError
from alternas.fileio import DAMAGED_RECORD_ERRORS
from alternas.search.evaluated import Evaluated, EvaluationRequest, evaluation_id, split_here
from alternas.search.evaluations import SharedEvaluations
from alternas.search.evaluator import SELECTS_ON_TEST, CandidateResult, EvaluationCancelled, Evaluator, mean_over
from alternas.search.planner import BuildupSearch, Plan, Replay, plan_buildup, step_label
from alternas.search.policy import Step
from alternas.search.race import screen_epoch
from alternas.search.study import StudyConfig, StudyFolder

POLL_S = 1.0  # how often an idle worker looks for work while others train what the search needs
ONE_SEED = ("one seed per comparison: seed noise is not counted, so its accept/reject rates are not calibrated "
            "(a null simulation accepted 15-28 % instead of <= 10 %); give seeds: [0, 1, 2] for calibrated decisions")
CRASH_ATTEMPTS = 3  # a run that crashes this often in one worker stops it: a crash is never evidence


class EvaluationCrashed(AlternasError):
    """A run kept crashing (out of memory, a bug): no decision may rest on it, so the search stops for the user to
    fix the cause; every finished evaluation is kept and the run resumes from its checkpoint."""


@dataclass
class BuildupOutcome:
    best: str
    steps: list[Step]
    candidates_evaluated: int
    candidate_epochs: int  # epochs this worker trained
    stopped_by: str  # finished | max_candidates | budget


def run_buildup(
    config: StudyConfig,
    *,
    quiet: bool = False,
    retry_failed: bool = False,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> BuildupOutcome:
    """Run one worker of the build-up search of ``config`` (start it as often as you have GPUs or machines, with one
    ``storage``); it returns when the search is decided, writing the study folder as it goes.

    Every child is raced against the incumbent (the best so far) over the seed pool: ``min_seeds`` first, one
    more while the paired comparison is undecided, up to ``max_seeds`` (then rejected by the seed budget).
    Resuming replays every decision from finished evaluations; an interrupted run resumes from its checkpoint.
    ``retry_failed`` trains diverged candidates again (crashed ones are retried anyway).
    """
    folder = StudyFolder(config.output_dir)
    evaluator = Evaluator(config, folder, quiet=quiet, retry_failed=retry_failed)
    selection_split = evaluator.data.selects_on  # missing data stops here, before the search's storage is touched
    board = SharedEvaluations(config, storage, retry_failed=retry_failed, log=log)  # refuses a differing worker
    folder.save_config(config)  # only once the settings are the search's own
    if selection_split == "test":
        log(SELECTS_ON_TEST)
    if config.seed_budget[1] == 1:
        log(ONE_SEED)
    done = board.snapshot().done.values()
    split_here(evaluator.data.val.digest(), done)
    restored = evaluator.restore_results(e.result for e in done)
    if restored:
        log(f"restored {restored} lost result.json file(s) from the study's storage (nothing retrained)")
    refreshed = evaluator.refresh_diagnostics((e.result for e in done), log)
    if refreshed:
        log(f"measured the diagnostics of {refreshed} finished run(s) again with the study's settings (from their "
            "saved weights, nothing retrained)")
    worker = _Worker(config, evaluator, board, log)
    began = time.perf_counter()
    replay = worker.run(folder, selection_split)
    evaluator.write_table()  # whole even if a killed run left it one row behind its result files
    outcome = BuildupOutcome(replay.best, replay.policy.steps, len(replay.policy.steps), worker.epochs_trained,
                             replay.stopped_by or "finished")
    folder.write_json("buildup.json", {**asdict(outcome), "wall_time": time.perf_counter() - began,
                                       "selection_split": selection_split, "config": config.to_dict()})
    return outcome


class _Worker:
    """One build-up worker: plan from the shared evaluations, claim, train, record, until the search is decided."""

    def __init__(self, config: StudyConfig, evaluator: Evaluator, board: SharedEvaluations,
                 log: Callable[[str], None]) -> None:
        self.config, self.evaluator, self.board, self.log = config, evaluator, board, log
        self.printed: set[tuple] = set()
        keys: dict[tuple, str] = {}
        self.search = BuildupSearch(config, say=self.say, keys=keys)  # prints each decision once
        self.quiet = BuildupSearch(config, keys=keys)  # the same search, asked mid-training: prints nothing
        self.epochs_trained = 0
        self.crashes: dict[str, int] = {}  # evaluation id -> crashes of it in this worker

    def say(self, key: tuple, line: str) -> None:
        if key not in self.printed:
            self.printed.add(key)
            self.log(line)

    def plan(self, search: BuildupSearch) -> tuple[Plan, set[str], dict[str, Evaluated]]:
        """Tell ``search`` what every worker finished, then plan: (the plan, what runs now, what is done)."""
        known = self.board.snapshot()
        for evaluation, evaluated in known.done.items():
            search.tell(evaluation, evaluated)
        return plan_buildup(search), known.running, known.done

    def run(self, folder: StudyFolder, selection_split: str) -> Replay:
        self.board.fail_dead_workers()
        waiting_for: frozenset[str] | None = None
        written: dict | None = None
        while True:
            plan, running, done = self.plan(self.search)
            trajectory = _trajectory(plan.replay, self.config, selection_split, done)
            if trajectory != written:  # an idle worker polls every second: write only what changed
                _publish_trajectory(folder, trajectory)
                written = trajectory
            if plan.replay.stopped_by is not None:
                return plan.replay
            for request, weight in plan.requests:
                if request.id in running or (weight < 1.0 and self.crashes.get(request.id, 0) >= CRASH_ATTEMPTS):
                    continue  # another worker's, or speculative and crashing: left until a decision needs it
                trial = self.board.claim(request)
                if trial is not None:
                    self._evaluate(request, weight, trial, plan.replay.blocked.step, done)
                    waiting_for = None
                    break
            else:
                busy = frozenset(r.id for r, w in plan.requests if w == 1.0 and r.id in running)
                if busy and busy != waiting_for:
                    self.log(f"    waiting for {len(busy)} evaluation(s) other workers are running")
                waiting_for = busy
                time.sleep(POLL_S)
                self.board.fail_dead_workers()

    def _evaluate(self, request: EvaluationRequest, weight: float, trial: int, step: int,
                  done: dict[str, Evaluated]) -> None:
        parent = done[evaluation_id(request.parent_key)].result if request.parent_key else None
        fresh = request.id in self.crashes or not self.evaluator.has_result(request.placement, request.seed, parent)
        if fresh:
            what = "  control (continued)" if parent is not None and parent.placement == request.placement else \
                "  warm start" if parent is not None else ""
            upto = f", up to epoch {request.stop_after}" if request.stop_after else ""
            why = "" if weight == 1.0 else f"  (speculative, p={weight:.2f})"
            self.log(f"{step_label(self.config, step)} training {request.placement}  seed {request.seed}{what}"
                     f"{upto}{why}")

        def still_needed(epoch: int, row: dict) -> None:
            if request not in dict(self.plan(self.quiet)[0].requests):
                raise EvaluationCancelled(f"{request.placement} seed {request.seed} is no longer needed")

        try:
            with self.board.heartbeat(trial):
                result = self.evaluator.evaluate(request.placement, request.seed, parent=parent,
                                                 stop_after=request.stop_after, epoch_callback=still_needed,
                                                 retry_crash=True)
        except EvaluationCancelled:
            self.board.release(trial, "cancelled")
            self.log(f"    {request.placement} seed {request.seed}: no longer needed, stopped (its checkpoint stays)")
            return
        except BaseException:
            self.board.release(trial, "interrupted")
            raise
        self.board.record(trial, Evaluated.from_run(result, [screen_epoch(self.config)]))
        if fresh:
            self.epochs_trained += result.epochs_trained
            if result.status not in ("completed", "paused", "failed"):
                self.log(f"    {result.status}: {result.error}")
        if result.status == "failed":
            self._crashed(request, result, weight)

    def _crashed(self, request: EvaluationRequest, result: CandidateResult, weight: float) -> None:
        """A crash is asked for again, never decided on; a run a decision needs crashing ``CRASH_ATTEMPTS`` times
        stops the search (a speculative one is left alone until a decision needs it)."""
        attempts = self.crashes[request.id] = self.crashes.get(request.id, 0) + 1
        if attempts >= CRASH_ATTEMPTS and weight == 1.0:
            raise EvaluationCrashed(
                f"{request.placement} seed {request.seed} crashed {attempts} times ({result.error}); see "
                f"{result.run_dir}/error.log, fix the cause and run the command again (every finished evaluation "
                "is kept, and this run resumes from its last checkpoint)")
        self.log(f"    crashed ({result.error}); not evidence: trying again ({attempts}/{CRASH_ATTEMPTS - 1} retries)")


def _trajectory(replay: Replay, config: StudyConfig, selection_split: str, done: dict[str, Evaluated]) -> dict:
    """``trajectory.json``: every step with its decision evidence, plus the runs that stand for each placement
    (``keys``: every finished seed, which grows as later comparisons add seeds to an incumbent), and the finished
    evaluations no decision used (speculative, unused)."""
    rows = []
    for step in replay.policy.steps:
        runs = replay.used_runs.get(step.placement, [])
        known = {r.seed: r for r in runs if r.status == "completed"}
        known.update(replay.representative.get(step.placement, {}))
        row = asdict(step)
        row["keys"] = [r.key for _, r in sorted(known.items())]
        row["statuses"] = [r.status for r in runs]
        for metric in ("lambda_max", "nep", "ape", "test_acc", "wall_time"):
            row[metric] = mean_over(runs, metric)
        rows.append(row)
    used = {e.result.key for e in replay.fetched.values()}
    unused = sorted({e.result.key for e in done.values()} - used)
    return {"best": replay.best, "confidence": config.buildup.confidence, "min_gain": config.buildup.min_gain,
            "selection_split": selection_split, "seed_pool": list(config.seeds),
            "seed_budget": list(config.seed_budget), "finished": replay.stopped_by is not None,
            "speculative_unused": unused, "steps": rows}


def _publish_trajectory(folder: StudyFolder, trajectory: dict) -> None:
    """Several workers write ``trajectory.json``: under a lock, and never with fewer steps than it has (a worker
    whose view lags must not take decisions back)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.root / ".trajectory.lock"):
        try:
            current = folder.read_json("trajectory.json")
        except DAMAGED_RECORD_ERRORS:
            current = None
        if current is None or len(current.get("steps", [])) <= len(trajectory["steps"]):
            folder.write_json("trajectory.json", trajectory)
