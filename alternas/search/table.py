"""Tabular benchmarks: every placement of a space trained with every seed, kept as ground truth for searches.

``alternas table`` runs the one evaluator (its cache, resume and per-candidate locks) over placements x seeds and
writes a compact folder that any search can be replayed from (``alternas.search.replay``):

* ``table.csv``: one row per (placement, seed, epoch) with the validation outcome, plus the run's status, cost
  and cache key;
* ``evidence.npz``: the per-example validation correctness of every row (bit-packed, in row order), what paired
  decisions are made of;
* ``table.json``: the seeds, placements, epochs, validation size and split digest;
* ``study.yaml``: the study it was computed with (``alternas table --study that-file`` recomputes or resumes it).

The table itself is a cache too: a (placement, seed) whose rows it holds is never trained again, so a table
computed in parts, on several machines or sessions, resumes from the committed folder alone. Workers on one
machine (or sharing the study folder) take (placement, seed) runs that no other worker holds the lock of.
"""

from __future__ import annotations

import io
import itertools
import json
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from alternas.errors import AlternasError, ConfigError
from alternas.fileio import DAMAGED_RECORD_ERRORS, atomic_write, atomic_write_text
from alternas.models.bases import get_base
from alternas.placement import Placement
from alternas.search.spaces import InvalidCandidate, SearchSpace
from alternas.search.study import StudyConfig, StudyFolder
from alternas.train.evidence import load_evidence

TABLE_CSV, TABLE_EVIDENCE, TABLE_META = "table.csv", "evidence.npz", "table.json"
COLUMNS = ["placement", "seed", "epoch", "val_acc", "status", "epochs", "wall_time", "key"]


def reachable_placements(start: Placement) -> list[Placement]:
    """Every placement the build-up can propose from ``start``: the closure of ``start`` under rule 1's move (one
    more MSA alternately from a stage's end) in any stage, fewest MSAs first."""
    seen = {start}
    frontier = [start]
    while frontier:
        frontier = [child for p in frontier for s in range(p.num_stages)
                    if (child := p.add_msa(s)) is not None and child not in seen]
        seen.update(frontier)
    return sorted(seen, key=lambda p: (p.num_msa, str(p)))


def table_placements(config: StudyConfig, space: SearchSpace | None = None) -> list[Placement]:
    """What a table of ``config`` covers: every placement of ``space``, else every placement the build-up can reach
    from the study's start."""
    if space is not None:
        if get_base(space.base).name != get_base(config.base).name:
            raise ConfigError(f"{space.source} is a space over {space.base}, the study's base is {config.base}")
        return space_placements(space)
    return reachable_placements(start_placement(config))


def start_placement(config: StudyConfig) -> Placement:
    """Where the study's build-up starts: ``buildup.start``, else the base's all-Conv net."""
    b = config.buildup
    return Placement.parse(b.start) if b.start else Placement.all_conv(get_base(config.base).depths)


def space_placements(space: SearchSpace) -> list[Placement]:
    """Every distinct placement of ``space`` (its grid, invalid combinations left out). A table is keyed by
    placement on the study's base, so a space that also searches MSA shapes is refused."""
    if any(len(choices) > 1 for choices in space.msa.values()):
        raise ConfigError(f"{space.source}: a table covers placements on one base; give the msa section one "
                          "choice per key")
    grid = {k: v for k, v in space.grid().items() if not k.startswith("msa_")}
    names = list(grid)
    found: dict[str, Placement] = {}
    for values in itertools.product(*(grid[n] for n in names)):
        try:
            placement = space.sample(_FixedChoices(dict(zip(names, values))))[0]
        except InvalidCandidate:
            continue
        found.setdefault(str(placement), placement)
    return sorted(found.values(), key=lambda p: (p.num_msa, str(p)))


class _FixedChoices:
    """The part of an Optuna trial ``SearchSpace.sample`` uses, answering from fixed values."""

    def __init__(self, values: dict) -> None:
        self.values = values

    def suggest_categorical(self, name: str, choices: list) -> object:
        return self.values.get(name, choices[0])

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self.values.get(name, low)


@dataclass
class Table:
    """A tabular benchmark: per (placement, seed) the validation correctness after every epoch."""

    seeds: list[int]
    placements: list[str]
    total_epochs: int
    n_examples: int
    digest: str
    rows: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))
    correct: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (E, N) bool, rows by epoch 1..E
    space: dict | None = None  # the search space the placements came from (None: the build-up's reachable set)
    _status: dict[tuple[str, int], str] | None = field(default=None, repr=False)  # from rows, rebuilt on change

    @property
    def complete(self) -> bool:
        return all((p, s) in self.runs for p in self.placements for s in self.seeds)

    @property
    def runs(self) -> set[tuple[str, int]]:
        """The (placement, seed) pairs the table holds a final outcome of."""
        return set(self._statuses())

    def status(self, placement: str, seed: int) -> str:
        """``completed`` or ``diverged``; ``missing`` when the table lacks the run."""
        return self._statuses().get((placement, seed), "missing")

    def _statuses(self) -> dict[tuple[str, int], str]:
        if self._status is None:
            last = self.rows.drop_duplicates(["placement", "seed"], keep="last")
            self._status = {(p, int(s)): str(st) for p, s, st in last[["placement", "seed", "status"]]
                            .itertuples(index=False)}
        return self._status

    def accuracy(self, placement: str, seeds: Iterable[int], epoch: int | None = None) -> float:
        """Mean validation accuracy (%) of ``placement`` over ``seeds`` after ``epoch`` (default: the last); a
        diverged run counts as 0 % (it left no model), as the build-up counts it as a failure."""
        scores = [self.correct_at(placement, s, epoch).mean() * 100 if (placement, s) in self.correct else 0.0
                  for s in seeds]
        return float(np.mean(scores))

    def correct_at(self, placement: str, seed: int, epoch: int | None = None) -> np.ndarray:
        arr = self.correct[(placement, seed)]
        return arr[(epoch or len(arr)) - 1]

    def add(self, result, correct: np.ndarray) -> None:
        """The outcome of one finished run: ``correct`` (epochs, examples) for a completed run, empty otherwise."""
        epochs = range(1, len(correct) + 1) if len(correct) else [result.epochs]
        new = pd.DataFrame([{"placement": result.placement, "seed": result.seed, "epoch": e,
                             "val_acc": float(correct[e - 1].mean() * 100) if len(correct) else np.nan,
                             "status": result.status, "epochs": result.epochs_trained,
                             "wall_time": result.wall_time, "key": result.key} for e in epochs])
        keep = ~((self.rows.placement == result.placement) & (self.rows.seed == result.seed))
        self.rows = pd.concat([self.rows[keep], new], ignore_index=True) if keep.any() else new
        self._status = None
        if len(correct):
            self.correct[(result.placement, result.seed)] = correct.astype(bool)

    def merge(self, other: Table) -> None:
        """Take ``other``'s runs this table lacks (another worker's)."""
        for placement, seed in other.runs - self.runs:
            part = other.rows[(other.rows.placement == placement) & (other.rows.seed == seed)]
            self.rows = pd.concat([self.rows, part], ignore_index=True) if len(self.rows) else part.copy()
            self._status = None
            if (placement, seed) in other.correct:
                self.correct[(placement, seed)] = other.correct[(placement, seed)]

    # -- files ----------------------------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """``evidence.npz`` holds the whole table (written atomically first: a kill leaves the old or the new one);
        ``table.csv`` and ``table.json`` are views of it for people and other tools."""
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self.rows.sort_values(["placement", "seed", "epoch"], key=_placement_order(self.placements))
        rows = rows.reset_index(drop=True)
        packed = np.zeros((len(rows), (self.n_examples + 7) // 8), dtype=np.uint8)
        for i, (placement, seed, epoch) in enumerate(rows[["placement", "seed", "epoch"]].itertuples(index=False)):
            if (placement, int(seed)) in self.correct:
                packed[i] = np.packbits(self.correct_at(placement, int(seed), int(epoch)))
        columns = {f"row_{c}": rows[c].to_numpy(dtype=_DTYPES[c]) for c in COLUMNS}

        def write_evidence(tmp: Path) -> None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, correct=packed, n=np.array(self.n_examples), digest=np.array(self.digest),
                                seeds=np.array(self.seeds, dtype=np.int64), placements=np.array(self.placements),
                                total_epochs=np.array(self.total_epochs), space=np.array(json.dumps(self.space)),
                                **columns)
            tmp.write_bytes(buffer.getvalue())

        atomic_write(out_dir / TABLE_EVIDENCE, write_evidence)
        atomic_write(out_dir / TABLE_CSV, lambda tmp: rows[COLUMNS].to_csv(tmp, index=False, float_format="%.4f"))
        meta = {"seeds": self.seeds, "placements": self.placements, "total_epochs": self.total_epochs,
                "n_examples": self.n_examples, "digest": self.digest, "space": self.space,
                "runs": len(self.runs), "complete": self.complete}
        atomic_write_text(out_dir / TABLE_META, json.dumps(meta, indent=1))

    @classmethod
    def load(cls, out_dir: str | Path) -> Table:
        """Read a table folder (its ``evidence.npz``); one line naming the folder when it is missing or damaged."""
        out_dir = Path(out_dir)
        if not (out_dir / TABLE_EVIDENCE).is_file():
            raise AlternasError(f"{out_dir} holds no table ({TABLE_EVIDENCE} is missing); compute one with "
                                "`alternas table --study FILE --out DIR`")
        try:
            with np.load(out_dir / TABLE_EVIDENCE, allow_pickle=False) as f:
                n = int(f["n"])
                table = cls([int(s) for s in f["seeds"]], [str(p) for p in f["placements"]], int(f["total_epochs"]),
                            n, str(f["digest"]), space=json.loads(str(f["space"])))
                rows = pd.DataFrame({c: f[f"row_{c}"] for c in COLUMNS})
                correct = np.unpackbits(f["correct"], axis=1, count=n).astype(bool)
        except (*DAMAGED_RECORD_ERRORS, KeyError, zlib.error) as err:
            raise AlternasError(f"{out_dir}: the table is damaged ({type(err).__name__}: {err}); compute it again "
                                "with `alternas table`") from None
        table.rows = rows
        for (placement, seed), group in rows.groupby(["placement", "seed"], sort=False):
            if (group.status == "completed").all():
                table.correct[(placement, int(seed))] = correct[group.sort_values("epoch").index.to_numpy()]
        return table


_DTYPES = {"placement": str, "seed": np.int64, "epoch": np.int64, "val_acc": np.float64, "status": str,
           "epochs": np.int64, "wall_time": np.float64, "key": str}


def _placement_order(placements: list[str]) -> Callable[[pd.Series], pd.Series]:
    rank = {p: i for i, p in enumerate(placements)}
    return lambda col: col.map(rank).fillna(len(rank)) if col.name == "placement" else col


def build_table(config: StudyConfig, placements: list[Placement], out_dir: str | Path, *, space: dict | None = None,
                log: Callable[[str], None] = print, quiet: bool = True, retry_failed: bool = False) -> Table:
    """Train every placement with every seed of ``config`` (what the table lacks; in the study's folder, through the
    shared evaluator), then write the table to ``out_dir``. Saved after every run, so a kill loses at most the
    run in progress (which resumes from its checkpoint). ``retry_failed`` trains the table's diverged runs again;
    a crash is left out of the table (the next call retries it)."""
    from alternas.search.evaluator import Evaluator

    out_dir = Path(out_dir)
    if config.buildup.warm_start:
        raise ConfigError("a table trains every placement from scratch: remove buildup.warm_start from the study")
    folder = StudyFolder(config.output_dir)
    evaluator = Evaluator(config, folder, quiet=quiet, retry_failed=retry_failed)
    names = [str(p) for p in placements]
    table = _start_table(config, names, evaluator, out_dir, space)
    total = len(names) * len(config.seeds)

    def wanted(held: Table) -> list[tuple[str, int]]:
        return [(p, s) for p in names for s in config.seeds
                if (p, s) not in held.runs or (retry_failed and held.status(p, s) == "diverged")]

    jobs = wanted(table)
    jobs_to_redo = {job for job in jobs if job in table.runs}  # diverged runs that --retry-failed trains again
    log(f"table: {len(names)} placements x {len(config.seeds)} seeds = {total} runs, {total - len(jobs)} already "
        f"in {out_dir}")
    locks = folder.candidates / ".locks"
    retried: set[tuple[str, int]] = set()
    while jobs:
        busy = []
        for placement, seed in jobs:
            locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(locks / f"{evaluator.key_for(placement, seed)}.table")
            try:
                lock.acquire(timeout=0)
            except Timeout:  # another worker trains it: come back to it
                busy.append((placement, seed))
                continue
            try:
                if (placement, seed) in _saved_runs(out_dir) and (placement, seed) not in jobs_to_redo:
                    continue  # another worker finished it while this one waited for the lock
                t0 = time.perf_counter()
                result = evaluator.evaluate(placement, seed)
                retried.add((placement, seed))
                if result.status == "failed":  # a crash is not an outcome: the next call of the command retries it
                    log(f"    {placement} seed {seed} crashed ({result.error}); left out: run the command again")
                    continue
                correct = _run_correct(result, config, table.digest) if result.status == "completed" else \
                    np.zeros((0, 0), bool)
                table = _save_merged(table, out_dir, result, correct)  # before the lock goes: no twin trains it
            finally:
                lock.release()
            outcome = result.status if result.val_acc is None else f"val acc {result.val_acc:.2f}"
            log(f"[{len(table.runs)}/{total}] {placement} seed {seed}: {outcome} ({time.perf_counter() - t0:.0f} s)")
        if busy and len(busy) == len(jobs):
            time.sleep(1.0)  # everything left is another worker's: wait for it
        table = _save_merged(table, out_dir)
        jobs = [job for job in wanted(table) if job in busy or job not in retried]
    return table


def _start_table(config: StudyConfig, names: list[str], evaluator, out_dir: Path, space: dict | None) -> Table:
    """The table in ``out_dir`` to continue, or a new one. A table of another validation split, or whose runs
    have other cache keys (another recipe, base or data), is refused rather than mixed in."""
    data = evaluator.data
    digest = data.val.digest()
    fresh = Table(list(config.seeds), names, config.recipe.total_epochs, len(data.val), digest, space=space)
    if not (out_dir / TABLE_EVIDENCE).is_file():
        return fresh
    with FileLock(out_dir / ".table.lock"):
        old = Table.load(out_dir)
    if (old.digest, old.total_epochs, old.n_examples) != (digest, fresh.total_epochs, fresh.n_examples):
        raise ConfigError(f"{out_dir} holds a table of another validation split or recipe (digest {old.digest}, "
                          f"{old.total_epochs} epochs, {old.n_examples} examples); give another --out or delete it")
    theirs = old.rows.drop_duplicates(["placement", "seed"])
    for placement, seed, key in theirs[["placement", "seed", "key"]].itertuples(index=False):
        if key != evaluator.key_for(placement, int(seed)):
            raise ConfigError(f"{out_dir} holds {placement} seed {seed} trained with other settings (key {key}, this "
                              f"study's is {evaluator.key_for(placement, int(seed))}); give another --out or delete it")
    fresh.merge(old)
    fresh.seeds = sorted(set(fresh.seeds) | set(old.seeds))
    fresh.placements = names + [p for p in old.placements if p not in names]
    fresh.space = space if space is not None else old.space
    return fresh


def _run_correct(result, config: StudyConfig, digest: str) -> np.ndarray:
    evidence = load_evidence(result.run_dir)
    total = config.recipe.total_epochs
    if evidence is None or evidence.epochs.tolist() != list(range(1, total + 1)):
        raise AlternasError(f"{result.run_dir} has no evidence of every epoch 1-{total}; delete that folder to "
                            "train it again")
    if evidence.digest != digest:
        raise AlternasError(f"{result.run_dir} was scored on another validation split (digest {evidence.digest}, "
                            f"the table's is {digest}); delete that folder to train it again")
    return evidence.correct


def _saved_runs(out_dir: Path) -> set[tuple[str, int]]:
    if not (out_dir / TABLE_EVIDENCE).is_file():
        return set()
    with FileLock(out_dir / ".table.lock"):
        return Table.load(out_dir).runs


def _save_merged(table: Table, out_dir: Path, result=None, correct: np.ndarray | None = None) -> Table:
    """Add a run (if any) and write the table under a lock, merged with what other workers wrote meanwhile."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir / ".table.lock"):
        if (out_dir / TABLE_EVIDENCE).is_file():
            table.merge(Table.load(out_dir))
        if result is not None:
            table.add(result, correct)
        table.save(out_dir)
    return table
