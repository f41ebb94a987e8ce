"""Search spaces over placements (``search_spaces/*.yaml``), encoded for Optuna with fixed parameter names.

Optuna cannot change a parameter's choices between trials, so every parameter is declared with the widest range
the space allows (``c3_depth``, ``c3_msa``, ``c3_b4`` …) and combinations that make no valid placement (3 MSAs in a
4-block stage, say) are reported as ``InvalidCandidate``; the Optuna objective turns that into a pruned trial.

Per stage: ``depth`` (choices), and ``msa``, how MSAs may be placed:
* ``none``: all Conv;
* ``count``: ``cN_msa`` MSAs in the reference pattern, alternating from the end (``[C]*(n-2k) + [C,M]*k``);
* ``end``: ``cN_msa`` contiguous MSAs at the end of the stage;
* ``free``: ``cN_bJ`` ∈ {C, M} for every block J ≥ 2 (block 1 stays Conv).

Optional ``msa`` section: searched MSA hyper-parameters ``heads_mult``, ``dim_head``, ``window_size`` (choices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alternas.errors import AlternasError, ConfigError
from alternas.models.bases import get_base
from alternas.placement import Placement

MODES = ("none", "count", "end", "free")
MSA_KEYS = ("heads_mult", "dim_head", "window_size")


class InvalidCandidate(AlternasError):
    """A combination of parameter values that does not describe a buildable placement."""


@dataclass(frozen=True)
class StageSpace:
    depth: tuple[int, ...]
    msa: str = "count"
    max_msa: int | None = None

    @property
    def msa_limit(self) -> int:
        if self.max_msa is not None:
            return self.max_msa
        return max(self.depth) // 2 if self.msa == "count" else max(self.depth) - 1


@dataclass(frozen=True)
class SearchSpace:
    base: str
    stages: tuple[StageSpace, ...]
    msa: dict[str, tuple] = field(default_factory=dict)
    source: str = "space"

    # -- sampling ------------------------------------------------------------------------------------------------
    def sample(self, trial: Any) -> tuple[Placement, str, int | None]:
        """(placement, base spec, window size) for an Optuna trial; raises ``InvalidCandidate``."""
        letters = []
        problems = []
        for s, st in enumerate(self.stages, start=1):
            depth = st.depth[0] if len(st.depth) == 1 else trial.suggest_categorical(f"c{s}_depth", list(st.depth))
            if st.msa == "none":
                letters.append("C" * depth)
            elif st.msa in ("count", "end"):
                k = trial.suggest_int(f"c{s}_msa", 0, st.msa_limit)
                if st.msa == "count":
                    if 2 * k > depth:
                        problems.append(f"c{s}: {k} alternating MSAs do not fit {depth} blocks")
                    letters.append("C" * max(depth - 2 * k, 0) + "CM" * k)
                else:
                    if k >= depth:
                        problems.append(f"c{s}: {k} MSAs at the end leave no Conv first block in {depth} blocks")
                    letters.append("C" * max(depth - k, 1) + "M" * min(k, depth - 1))
            else:
                blocks = ["C"] + [trial.suggest_categorical(f"c{s}_b{j}", ["C", "M"])
                                  for j in range(2, max(st.depth) + 1)]
                letters.append("".join(blocks[:depth]))
        base, window = self._msa_choices(trial)
        if problems:
            raise InvalidCandidate("; ".join(problems))
        return Placement(tuple(letters)), base, window

    def _msa_choices(self, trial: Any) -> tuple[str, int | None]:
        variant = []
        for key in ("heads_mult", "dim_head"):
            if key in self.msa:
                variant.append(f"{key}={trial.suggest_categorical(f'msa_{key}', list(self.msa[key]))}")
        window = trial.suggest_categorical("msa_window_size", list(self.msa["window_size"])) \
            if "window_size" in self.msa else None
        return (f"{self.base}@{','.join(variant)}" if variant else self.base), window

    # -- the inverse, for enqueueing known placements ------------------------------------------------------------
    def encode(self, placement: Placement) -> dict[str, Any] | None:
        """Parameters that make ``sample`` return ``placement`` with the base's MSA shape, or ``None``."""
        if placement.num_stages != len(self.stages):
            return None
        params: dict[str, Any] = {}
        for s, (st, letters) in enumerate(zip(self.stages, placement.stages), start=1):
            n = len(letters)
            if n not in st.depth:
                return None
            if len(st.depth) > 1:
                params[f"c{s}_depth"] = n
            k = letters.count("M")
            if st.msa == "none" and k:
                return None
            if st.msa == "count":
                if letters != "C" * (n - 2 * k) + "CM" * k or k > st.msa_limit:
                    return None
                params[f"c{s}_msa"] = k
            elif st.msa == "end":
                if letters != "C" * (n - k) + "M" * k or k > st.msa_limit:
                    return None
                params[f"c{s}_msa"] = k
            elif st.msa == "free":
                if letters[0] != "C":
                    return None
                for j in range(2, max(st.depth) + 1):
                    params[f"c{s}_b{j}"] = letters[j - 1] if j <= n else "C"
        defaults = {"heads_mult": 1, "dim_head": get_base(self.base).dim_head}
        for key, choices in self.msa.items():  # the base's own MSA shape when the space offers it
            params[f"msa_{key}"] = defaults[key] if defaults.get(key) in choices else choices[0]
        return params

    def grid(self) -> dict[str, list]:
        """Every parameter's choices, for Optuna's GridSampler."""
        out: dict[str, list] = {}
        for s, st in enumerate(self.stages, start=1):
            if len(st.depth) > 1:
                out[f"c{s}_depth"] = list(st.depth)
            if st.msa in ("count", "end"):
                out[f"c{s}_msa"] = list(range(st.msa_limit + 1))
            elif st.msa == "free":
                out.update({f"c{s}_b{j}": ["C", "M"] for j in range(2, max(st.depth) + 1)})
        out.update({f"msa_{k}": list(v) for k, v in self.msa.items()})
        return out


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space; errors name the file, the key and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return space_from_dict(raw, str(path))


def space_from_dict(raw: dict[str, Any], source: str = "space") -> SearchSpace:
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {problem}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a search space must be a YAML mapping")
    unknown = sorted(set(raw) - {"base", "stages", "msa", "description"})
    if unknown:
        raise fail(unknown[0], "unknown key; known keys: base, description, msa, stages")
    try:
        base = get_base(str(raw.get("base", "")))
    except ConfigError as err:
        raise fail("base", str(err)) from None
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or len(stages_raw) != base.num_stages:
        raise fail("stages", f"give a list of {base.num_stages} stage entries (one per stage of {base.name})")
    stages = []
    for s, entry in enumerate(stages_raw, start=1):
        key = f"stages[{s}]"
        if not isinstance(entry, dict):
            raise fail(key, "each stage is a mapping with depth and msa")
        bad = sorted(set(entry) - {"depth", "msa", "max_msa"})
        if bad:
            raise fail(f"{key}.{bad[0]}", "unknown key; known keys: depth, max_msa, msa")
        depth = entry.get("depth", [base.depths[s - 1]])
        depth = tuple(depth) if isinstance(depth, list) else (depth,)
        if not depth or not all(isinstance(d, int) and d >= 1 for d in depth):
            raise fail(f"{key}.depth", "give positive whole numbers, e.g. [3, 4]")
        mode = entry.get("msa", "count")
        if mode not in MODES:
            raise fail(f"{key}.msa", f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        max_msa = entry.get("max_msa")
        if max_msa is not None and (not isinstance(max_msa, int) or max_msa < 0):
            raise fail(f"{key}.max_msa", "give a whole number >= 0")
        stages.append(StageSpace(depth, mode, max_msa))
    msa_raw = raw.get("msa") or {}
    if not isinstance(msa_raw, dict):
        raise fail("msa", "a mapping of heads_mult / dim_head / window_size choices")
    msa = {}
    for k, v in msa_raw.items():
        if k not in MSA_KEYS:
            raise fail(f"msa.{k}", f"unknown key; known keys: {', '.join(MSA_KEYS)}")
        choices = tuple(v) if isinstance(v, list) else (v,)
        if not choices or not all(isinstance(c, (int, float)) and c > 0 for c in choices):
            raise fail(f"msa.{k}", "give positive numbers")
        msa[k] = choices
    return SearchSpace(base.name, tuple(stages), msa, source)


def default_space_path(base: str) -> Path:
    """``search_spaces/<base>.yaml`` in the working directory (your edited copy), else the one shipped with the
    package."""
    name = base.split("@")[0]
    shipped = Path(str(resources.files("alternas.search_spaces")))
    for root in (Path.cwd() / "search_spaces", shipped):
        if (root / f"{name}.yaml").is_file():
            return root / f"{name}.yaml"
    known = ", ".join(p.stem for p in sorted(shipped.glob("*.yaml")))
    raise ConfigError(f"no search space for base {name!r} (shipped: {known}): pass --space FILE")
