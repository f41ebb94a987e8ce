"""The one candidate evaluator every search calls: build -> train -> evaluate -> diagnose -> cost.

A candidate is keyed by a content hash of (canonical placement, base, window, data, recipe, seed, warm-start
parent). Its folder ``candidates/<key>/`` holds the run and ``result.json``; a candidate with a final result is
never trained again, whichever search asks, and an interrupted one resumes from its last epoch checkpoint.

What is final: ``completed`` and ``diverged`` (deterministic for the seed; ``retry_failed`` re-runs a divergence).
A crash (``failed``: out of memory, a dead worker, a bug) is recorded but retried by the next run. A user error
(``AlternasError``: missing data, an unbuildable placement) stops the search and caches nothing.

Why one module over the ~400-line guide: a candidate's life (key, cache, lock, train, diagnose, record) is one
transaction over one folder, and its steps share that folder's locking and write-once rules.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock, Timeout
from optuna import TrialPruned
from safetensors.torch import load_file

from alternas.data.datasets import DataConfig, DataSplits, load_data
from alternas.diagnostics.corruptions import corruption_source
from alternas.diagnostics.run import diagnose
from alternas.errors import AlternasError
from alternas.faults import fault_point
from alternas.fileio import DAMAGED_RECORD_ERRORS, atomic_write, atomic_write_text
from alternas.models import count_flops, count_parameters
from alternas.models.bases import get_base
from alternas.placement import Placement
from alternas.search.study import StudyConfig, StudyFolder
from alternas.train.checkpoint import rng_state, set_rng_state
from alternas.train.fit import EpochCallback, fit, pick_device
from alternas.train.recipe import Recipe
from alternas.train.run import model_for, run_config

FINAL_STATUSES = ("completed", "diverged")  # "failed" is a crash: recorded, and retried by the next run
SELECTS_ON_TEST = ("data.val_fraction is 0: candidates are trained on every training image and compared on the "
                   "test split (the paper's protocol), so their test accuracy is no longer an unbiased estimate")


class EvaluationCancelled(Exception):  # noqa: N818 (a stop on purpose, not an error)
    """Raised by an epoch callback to stop a run nobody needs any more: nothing is cached and its checkpoint stays,
    so the run resumes if it is ever needed again."""


@dataclass
class CandidateResult:
    """One row of the results table."""

    key: str
    placement: str
    num_msa: int
    seed: int
    base: str
    epochs: int
    subset: float | None
    status: str  # completed | diverged (final); failed (a crash, retried next run); paused (stopped on purpose)
    val_acc: float | None = None
    val_nll: float | None = None
    val_ece: float | None = None
    test_acc: float | None = None
    lambda_max: float | None = None
    nep: float | None = None
    ape: float | None = None
    robustness: float | None = None  # mean accuracy (%) on corrupted images
    robustness_source: str | None = None  # which: released CIFAR-C files or generated corruptions (never mixed)
    delta_high: dict[str, float] = field(default_factory=dict)
    params: int = 0
    flops: int = 0
    images_per_s: float = 0.0
    wall_time: float = 0.0
    epochs_trained: int = 0  # epochs this candidate actually trained (the cost a warm start saves)
    parent: str | None = None  # key of the warm-start parent
    run_dir: str = ""
    error: str | None = None
    diagnostics: str | None = None  # fingerprint of the diagnostics settings the numbers above were measured with

    def to_row(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "delta_high"}
        row.update({f"delta_high_{stage}": value for stage, value in self.delta_high.items()})
        return row

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def mean_over(runs: Iterable[CandidateResult], attr: str) -> float | None:
    """The mean of ``attr`` over the runs that have it (``None`` if none do): a placement's figure over its seeds."""
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.fmean(values) if values else None


def score_over(runs: Iterable[CandidateResult]) -> tuple[float | None, float | None]:
    """(mean, sample SD) of the validation accuracy of the completed ``runs``: a placement's score over its seeds."""
    scores = [r.val_acc for r in runs if r.status == "completed" and r.val_acc is not None]
    if not scores:
        return None, None
    return statistics.fmean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0


def _read_result(path: Path) -> CandidateResult | None:
    """A candidate's ``result.json``; ``None`` when missing or unreadable (a damaged file means: evaluate again)."""
    try:
        return CandidateResult.from_dict(json.loads(path.read_text()))
    except DAMAGED_RECORD_ERRORS:
        return None


FINISHED_RUN_FILES = ("model.safetensors", "evidence.npz", "metrics.json")  # what a finished run leaves


def read_results(candidates: Path, damaged: list[Path] | None = None) -> dict[str, CandidateResult]:
    """Every readable ``candidates/<key>/result.json`` by key: the one reader of result files. A damaged file is left
    out (its candidate counts as not evaluated, and the evaluator evaluates it again) and added to ``damaged``."""
    if not candidates.is_dir():
        return {}
    results = {}
    for path in sorted(candidates.glob("*/result.json")):
        result = _read_result(path)
        if result is not None:
            results[path.parent.name] = result
        elif damaged is not None:
            damaged.append(path)
    return results


def epoch_diagnostics_dir(run_dir: str | Path, epoch: int) -> Path:
    """Where a candidate's diagnostics at 1-based ``epoch`` of its training go (``diagnostics.at_epochs``)."""
    return Path(run_dir) / "diagnostics" / f"epoch-{epoch:03d}"


def candidate_key(placement: Placement, config: StudyConfig, recipe: Recipe, seed: int,
                  parent: str | None = None) -> str:
    """Content hash of everything that determines a candidate's training outcome."""
    payload = {"placement": str(placement), **training_settings(config, recipe), "seed": seed, "parent": parent}
    return content_digest(payload)


def training_settings(config: StudyConfig, recipe: Recipe) -> dict[str, Any]:
    """What trains every candidate of a study alike (base, window, data as it trains, recipe): part of each cache
    key, and what the build-up's workers must agree on."""
    data = config.data.to_dict()
    data.pop("root", None)  # where the files live does not change the result
    data.pop("label_breaking")  # only where it changes what trains (keeps the keys of studies from before it)
    if left_out := [aug for aug in config.data.breaks_labels if recipe.applies(aug)]:
        data["label_breaking"] = left_out
    for knob in ("crop_pct", "stream", "max_in_memory_gb"):  # what they resolve to, where it changes the outcome
        data.pop(knob)
    if config.data.reads_files:
        data["eval_crop_pct"] = config.data.eval_crop_pct
        if config.data.streams():  # transforms on the original images: another experiment than pre-cropped ones
            data["streamed"] = True
    return {"base": base_architecture(config.base), "window_size": config.window_size, "data": data,
            "recipe": recipe.to_dict()}


def warm_recipe(config: StudyConfig) -> Recipe:
    """What a warm-started child (and its control) trains: the study's recipe, shorter and without warmup."""
    epochs = config.buildup.warm_start_epochs or max(1, config.recipe.epochs // 2)
    return replace(config.recipe, epochs=epochs, warmup_epochs=0)


def base_architecture(spec: str) -> dict[str, Any]:
    """What a base spec builds, whatever its spelling: ``resnet50`` and ``resnet50@heads_mult=1,dim_head=64`` (the
    Optuna space's spelling of the same net) are one architecture, hence one cache key."""
    base = get_base(spec)
    return {k: v for k, v in asdict(base).items() if k not in ("name", "description", "paper_msa_counts")}


def diagnostics_fingerprint(config: StudyConfig) -> str:
    """Names the settings a candidate's diagnostics were measured with: a result measured with others is
    re-diagnosed from its saved weights (no retraining) instead of being reported as if comparable."""
    settings = config.diagnostics.to_dict()
    settings.pop("at_epochs")  # measured during training, not on the final weights
    if not settings["corruptions"]:  # off: the fingerprint of studies from before these keys existed
        for key in ("corruptions", "corruption_images", "severities"):
            settings.pop(key)
    return content_digest(settings)


def content_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class Evaluator:
    """Evaluates placements for one study, caching results in its folder."""

    def __init__(self, config: StudyConfig, folder: StudyFolder | None = None, quiet: bool = False,
                 retry_failed: bool = False, load: Callable[[DataConfig], DataSplits] = load_data) -> None:
        self.config = config
        self.folder = folder or StudyFolder(config.output_dir)
        self.quiet = quiet
        self.retry_failed = retry_failed  # train diverged candidates again, once per evaluator
        self._load = load  # a caller that builds many evaluators on one dataset passes a caching loader
        self._data: DataSplits | None = None
        self._crashed: dict[str, CandidateResult] = {}  # crashes of this run: not retried until the next one
        self._retried: set[str] = set()

    @property
    def data(self) -> DataSplits:
        if self._data is None:
            self._data = self._load(self.config.data)
        return self._data

    def result_path(self, key: str) -> Path:
        return self.folder.candidates / key / "result.json"

    def cached(self, key: str) -> CandidateResult | None:
        """The result ``evaluate`` answers without training: a final one, or a crash earlier in this run."""
        if key in self._crashed:
            return self._crashed[key]
        result = _read_result(self.result_path(key))
        if result is not None and (result.status == "completed" or
                                   (result.status == "diverged" and not self._retrying(key))):
            return result
        return None

    def _retrying(self, key: str) -> bool:
        return self.retry_failed and key not in self._retried

    def key_for(self, placement: str | Placement, seed: int, parent: CandidateResult | None = None) -> str:
        """The cache key ``evaluate`` uses for these arguments."""
        recipe = self.warm_recipe() if parent else self.config.recipe
        return candidate_key(Placement.parse(placement), self.config, recipe, seed, parent.key if parent else None)

    def has_result(self, placement: str | Placement, seed: int, parent: CandidateResult | None = None) -> bool:
        """Whether ``evaluate`` would answer from the cache (nothing to train)."""
        return self.cached(self.key_for(placement, seed, parent)) is not None

    def warm_recipe(self) -> Recipe:
        return warm_recipe(self.config)

    def evaluate(
        self,
        placement: str | Placement,
        seed: int,
        *,
        parent: CandidateResult | None = None,
        epoch_callback: EpochCallback | None = None,
        stop_after: int | None = None,
        retry_crash: bool = False,
    ) -> CandidateResult:
        """Train and score ``placement`` with ``seed`` (or return the cached result).

        With ``parent`` (a finished candidate), the model starts from the parent's weights except for blocks whose
        type changed, and trains the shorter warm-start recipe. ``stop_after=k`` trains only up to epoch ``k`` and
        returns status ``paused`` (not cached: a later call resumes from the epoch-``k`` checkpoint).
        ``retry_crash`` trains (resumes) a candidate that already crashed in this run again: the build-up never
        takes a crash as evidence and bounds the attempts itself.
        """
        placement = Placement.parse(placement)
        recipe = self.warm_recipe() if parent else self.config.recipe
        key = self.key_for(placement, seed, parent)
        if retry_crash:
            self._crashed.pop(key, None)
        hit = self.cached(key)
        if hit is not None and self._diagnosed(hit):
            return hit
        with self._candidate_lock(key):  # another worker may be training this very candidate: wait for it
            hit = self.cached(key)
            if hit is not None:
                return hit if self._diagnosed(hit) else self._rediagnose(hit, recipe)
            if self._retrying(key):
                self._retried.add(key)
                stored = _read_result(self.result_path(key))
                if stored is not None and stored.status == "diverged":  # start it again from scratch (a crash
                    shutil.rmtree(self.folder.candidates / key)         # resumes from its checkpoint instead)
            return self._train_and_score(placement, seed, recipe, key, parent, epoch_callback, stop_after)

    def _candidate_lock(self, key: str) -> FileLock:
        locks = self.folder.candidates / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(locks / key)

    def _train_and_score(self, placement: Placement, seed: int, recipe: Recipe, key: str,
                         parent: CandidateResult | None, epoch_callback: EpochCallback | None,
                         stop_after: int | None = None) -> CandidateResult:
        cfg = self.config
        run_dir = self.folder.candidates / key
        base = dict(key=key, placement=str(placement), num_msa=placement.num_msa, seed=seed, base=cfg.base,
                    epochs=recipe.total_epochs, subset=cfg.data.subset, run_dir=str(run_dir),
                    parent=parent.key if parent else None)
        started = time.perf_counter()
        try:
            data = self.data
            model = model_for(placement, cfg.base, data, recipe, cfg.window_size, seed=seed)
            params, flops = count_parameters(model), count_flops(model)
            init = self._inherited_weights(model, parent) if parent else None
            run = fit(model, data, recipe, run_dir, seed=seed, device=cfg.device, resume=True, quiet=self.quiet,
                      run_config=run_config(model, cfg.data.to_dict()),
                      epoch_callback=self._with_epoch_diagnostics(model, recipe, run_dir, placement, epoch_callback),
                      init_weights=init, stop_after=stop_after)
            result = CandidateResult(
                **base, status=run.status, val_acc=run.val.get("acc"), val_nll=run.val.get("nll"),
                val_ece=run.val.get("ece"), test_acc=run.test.get("acc"), params=params, flops=flops,
                images_per_s=run.images_per_s, wall_time=run.wall_time, epochs_trained=run.epochs_completed,
                error=run.error,
            )
            if run.status == "paused":
                return result
            if run.status == "completed":
                self._diagnose(model, recipe, result)
        except (KeyboardInterrupt, TrialPruned, EvaluationCancelled, AlternasError):
            raise  # stop (Ctrl-C), pruned or no longer needed, or a user error: nothing to cache
        except Exception as err:  # a crash is recorded and the search goes on; the next run retries it
            result = CandidateResult(**base, status="failed", wall_time=time.perf_counter() - started,
                                     error=self._crash_message(err, recipe))
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "error.log", traceback.format_exc())
            self._crashed[key] = result
        self._write_result(result)
        return result

    def _with_epoch_diagnostics(self, model: torch.nn.Module, recipe: Recipe, run_dir: Path, placement: Placement,
                                callback: EpochCallback | None) -> EpochCallback | None:
        """``callback`` preceded by the study's diagnostics at ``diagnostics.at_epochs`` (the paper's Hessian spectra
        are at the end of warmup), written to ``diagnostics/epoch-NNN/``. Training's random state is put back
        afterwards (Mixup in the Hessian loss draws from the global generators), so the run trains the same."""
        epochs = set(self.config.diagnostics.epochs_for(recipe))
        if not epochs:
            return callback

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            out_dir = epoch_diagnostics_dir(run_dir, epoch + 1)
            if epoch + 1 in epochs and not (out_dir / "diagnostics.json").is_file():
                state = rng_state()
                try:
                    diagnose(model, self.data, recipe, self.config.diagnostics, out_dir=out_dir,
                             label=f"{placement} at epoch {epoch + 1}")
                finally:
                    set_rng_state(state)
            if callback is not None:
                callback(epoch, row)

        return on_epoch

    def _diagnosed(self, result: CandidateResult) -> bool:
        """Whether ``result`` carries diagnostics measured with this study's settings (or needs none), its robustness
        on the corrupted images this machine's data gives (released files downloaded since, or another albumentations,
        would leave a study scored on two sources)."""
        if result.status != "completed":
            return True
        if result.diagnostics != diagnostics_fingerprint(self.config):
            return False
        return not self.config.diagnostics.corruptions or result.robustness_source == self._corruption_source

    @functools.cached_property
    def _corruption_source(self) -> str:
        return corruption_source(self.config.data.name, self.config.data.files_root)

    def _diagnose(self, model: torch.nn.Module, recipe: Recipe, result: CandidateResult) -> None:
        """Measure the study's diagnostics on the trained ``model`` into ``result``."""
        cfg = self.config
        result.lambda_max = result.nep = result.ape = result.robustness = result.robustness_source = None
        result.delta_high = {}
        if cfg.diagnostics.hessian or cfg.diagnostics.fourier or cfg.diagnostics.corruptions:
            fault_point("diagnostics")
            t0 = time.perf_counter()
            model.to(pick_device(cfg.device))
            diag = diagnose(model, self.data, recipe, cfg.diagnostics, out_dir=Path(result.run_dir) / "diagnostics",
                            label=result.placement)
            result.lambda_max, result.nep, result.ape = diag.get("lambda_max"), diag.get("nep"), diag.get("ape")
            result.robustness = diag.get("robustness")
            result.robustness_source = (diag.get("corruptions") or {}).get("source")
            result.delta_high = diag.get("delta_high", {})
            result.wall_time += time.perf_counter() - t0
        result.diagnostics = diagnostics_fingerprint(cfg)

    def _rediagnose(self, result: CandidateResult, recipe: Recipe, table: bool = True) -> CandidateResult:
        """A finished candidate measured with other diagnostics settings: measure again from its weights (fit reads
        them back, or finishes from the last checkpoint if they are damaged). ``table``: rebuild results.csv too."""
        cfg = self.config
        model = model_for(result.placement, cfg.base, self.data, recipe, cfg.window_size, seed=result.seed)
        fit(model, self.data, recipe, result.run_dir, seed=result.seed, device=cfg.device, resume=True, quiet=True)
        self._diagnose(model, recipe, result)
        self._write_result(result, table)
        return result

    def _crash_message(self, err: Exception, recipe: Recipe) -> str:
        if isinstance(err, torch.OutOfMemoryError):
            return (f"out of memory on {pick_device(self.config.device)}: lower recipe.batch_size "
                    f"({recipe.batch_size}), recipe.eval_batch_size ({recipe.eval_batch_size}) or "
                    f"diagnostics.hessian_batch_size ({self.config.diagnostics.hessian_batch_size}); "
                    "the next run retries it")
        return f"{type(err).__name__}: {err}"

    def _inherited_weights(self, model: torch.nn.Module, parent: CandidateResult) -> dict[str, torch.Tensor]:
        """The parent's trained tensors for every block whose type did not change (same name and shape)."""
        parent_weights = load_file(str(Path(parent.run_dir) / "model.safetensors"))
        old, new = Placement.parse(parent.placement), Placement.parse(str(model.placement))
        changed = {f"stages.{s}.{i}." for s, stage in enumerate(new.stages) for i, letter in enumerate(stage)
                   if s >= old.num_stages or i >= len(old.stages[s]) or old.stages[s][i] != letter}
        own = model.state_dict()
        return {k: v for k, v in parent_weights.items()
                if k in own and own[k].shape == v.shape and not any(k.startswith(c) for c in changed)}

    def _write_result(self, result: CandidateResult, table: bool = True) -> None:
        atomic_write_text(self.result_path(result.key), json.dumps(asdict(result), indent=1), durable=True)
        if table:
            self.write_table()

    def all_results(self) -> list[CandidateResult]:
        return list(read_results(self.folder.candidates).values())

    def restore_results(self, recorded: Iterable[CandidateResult]) -> int:
        """Write back the ``result.json`` of runs the search's storage records as finished whose file is lost or
        damaged (a user's ``rm``, a disk that lost a file) while their run folder is still there: the record is the
        result, so nothing is trained again and export, claims and reports see the run. Returns how many."""
        def here(r: CandidateResult) -> bool:  # this folder holds the finished run, not just a checkpoint
            run = self.folder.candidates / r.key
            return r.status == "diverged" and run.is_dir() or all((run / f).is_file() for f in FINISHED_RUN_FILES)

        lost = [r for r in recorded if r.status in ("completed", "diverged") and here(r)
                and _read_result(self.result_path(r.key)) is None]
        for result in lost:  # run_dir as on this machine: the record may come from another worker's folder
            restored = replace(result, run_dir=str(self.folder.candidates / result.key))
            atomic_write_text(self.result_path(result.key), json.dumps(asdict(restored), indent=1), durable=True)
        if lost:
            self.write_table()
        return len(lost)

    def refresh_diagnostics(self, recorded: Iterable[CandidateResult], log: Callable[[str], None]) -> int:
        """Measure again, from their saved weights, the finished runs of this folder whose diagnostics were taken with
        other settings than the study's now (a search resumed with ``corruptions`` turned on, say): a search reads
        finished evaluations from its storage without asking the evaluator, so without this its report and claims
        would mix runs measured two ways. A run another worker is measuring is left to it. Returns how many this
        worker measured again (none is retrained)."""
        stale = [r for r in (self.cached(r.key) for r in recorded if r.status == "completed")
                 if r is not None and not self._diagnosed(r)]
        count = 0
        for hit in stale:
            lock = self._candidate_lock(hit.key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # another worker holds it: measuring it, or training it
            try:
                hit = self.cached(hit.key)
                if hit is not None and not self._diagnosed(hit):
                    log(f"measuring the diagnostics of {hit.placement} seed {hit.seed} again with the study's "
                        f"settings ({count + 1} of up to {len(stale)}; from its saved weights, nothing retrained)")
                    self._rediagnose(hit, self.warm_recipe() if hit.parent else self.config.recipe, table=False)
                    count += 1
            finally:
                lock.release()
        if count:
            self.write_table()
        return count

    def write_table(self) -> Path:
        """``results.csv``: one row per candidate, rebuilt from the per-candidate files under a lock, so a worker
        that read the folder before another one's result landed cannot overwrite the table without that row. No
        candidate yet: an empty file (what readers take for "nothing evaluated")."""
        self.folder.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder.root / ".results.lock"):
            rows = [r.to_row() for r in self.all_results()]
            return atomic_write(self.folder.root / "results.csv",
                                lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False) if rows else tmp.write_text(""))
