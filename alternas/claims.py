"""The paper's claims checked on a study's own candidates: ``alternas claims``.

Each claim becomes one effect measured on the study's finished runs and an interval over training seeds: a run's
diagnostics are averaged per seed (seeds are the independent replicates; placements trained with one seed share
its data order), and a Student-t interval at the study's confidence is taken over the seed means. The verdict
reads the interval: **holds** when it excludes zero on the side the paper reports, **contradicted** when it
excludes zero on the other side, **inconclusive** otherwise (or with fewer than two seeds). Comparisons of two
placements (best AlterNet vs the all-Conv start) are paired by seed, as the build-up's decisions are.

The claims (PAPER.md §5-7), and one the paper never tested:
* ``msa_low_pass``: across a block, the high-frequency score changes less (or falls) at MSAs than at Convs (§6.1);
* ``msa_reduce_variance``: MSAs lower feature-map variance, Convs raise it (§7);
* ``msa_flatten_loss``: the best AlterNet's Hessian λ_max is below the all-Conv start's (§5.1);
* ``alternet_noise_robust``: the best AlterNet loses less accuracy to high-frequency noise than the start (§6.2);
* ``alternet_corruption_robust``: the best AlterNet is more accurate on corrupted images than the start (§4.1);
* ``msa_matter_at_stage_end``: removing an MSA block at a stage's end costs more than removing the Conv that stood
  there in the all-Conv start (same seed: position-matched, §7);
* ``diagnostics_predict_gains``: across the evaluated children, do λ_max or the high-frequency score rank the
  accuracy gains?

Why one module over the ~400-line guide: the claims are one catalogue, printed in this order, each a short function
over the same per-seed records and interval helpers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats

from alternas.errors import ConfigError

Verdict = Literal["holds", "contradicted", "inconclusive"]
Direction = Literal["negative", "positive"]
HIGH_NOISE_BANDS = 0.5  # the noise claim averages the bands above this frequency (×π): 0.6π-0.9π by default


@dataclass(frozen=True)
class RunRecord:
    """One finished training run of a placement with a seed, and its final diagnostics (``diagnostics.json``)."""

    placement: str
    seed: int
    val_acc: float | None
    diagnostics: dict[str, Any]
    key: str = ""
    warmup: dict[str, Any] = field(default_factory=dict)  # diagnostics at the end of warmup, where measured

    @property
    def num_msa(self) -> int:
        return self.placement.upper().count("M")


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` replicates with its two-sided interval at ``confidence`` (NaN bounds below 2)."""

    mean: float
    ci: tuple[float, float]
    n: int
    unit: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"mean": _clean(self.mean), "ci": [_clean(v) for v in self.ci], "n": self.n, "unit": self.unit}

    def describe(self) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        interval = f" [{self.ci[0]:+.3g}, {self.ci[1]:+.3g}]" if math.isfinite(self.ci[0]) else ""
        return f"{self.mean:+.3g}{interval} (n={self.n})"


@dataclass
class ClaimResult:
    """A claim, what the paper reports, what this study measured (with intervals and counts), and the verdict."""

    claim: str
    title: str
    paper: str
    measured: dict[str, Any]
    verdict: Verdict
    method: str
    expected: Direction | None = None  # the sign of ``measured["effect"]`` the paper reports
    effect: Estimate | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("effect")
        return out


def seed_interval(by_seed: dict[int, float], confidence: float, unit: str = "") -> Estimate:
    """Mean over seeds with a Student-t interval (the seeds' spread is all the noise there is to see)."""
    values = np.array([v for v in by_seed.values() if math.isfinite(v)], dtype=float)
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), (float("nan"), float("nan")), 0, unit)
    mean = float(values.mean())
    if n < 2:
        return Estimate(mean, (float("nan"), float("nan")), n, unit)
    if np.ptp(values) == 0:  # every seed agrees: no spread to scale a t by
        return Estimate(mean, (mean, mean), n, unit)
    with warnings.catch_warnings():  # nearly equal seeds: scipy warns of precision loss in its moments; the interval
        warnings.simplefilter("ignore", RuntimeWarning)  # is as narrow as they are, which is the answer
        low, high = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return Estimate(mean, (float(low), float(high)), n, unit)


def verdict_of(effect: Estimate, expected: Direction) -> Verdict:
    """holds / contradicted when the interval excludes zero on the expected / other side, else inconclusive."""
    lo, hi = effect.ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if (hi < 0 and expected == "negative") or (lo > 0 and expected == "positive"):
        return "holds"
    if (lo > 0 and expected == "negative") or (hi < 0 and expected == "positive"):
        return "contradicted"
    return "inconclusive"


def _per_seed(runs: Iterable[RunRecord], value: Callable[[RunRecord], float | None]) -> dict[int, float]:
    """The mean of ``value`` over each seed's runs (runs where it is missing are left out)."""
    grouped: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        v = value(run)
        if v is not None and math.isfinite(v):
            grouped[run.seed].append(v)
    return {seed: float(np.mean(vs)) for seed, vs in grouped.items()}


def block_changes(units: list[dict], quantity: Callable[[dict], float]) -> list[tuple[str, float]]:
    """(kind, change of ``quantity`` across the block) for every block whose output has its input's resolution
    (subsampling blocks change the frequency grid and the variance's support, so they are left out)."""
    out = []
    for before, after in zip(units, units[1:]):
        if after["kind"] in ("msa", "conv") and not after["subsamples"] and after.get("size") == before.get("size"):
            out.append((after["kind"], quantity(after) - quantity(before)))
    return out


def _kind_gap(changes: list[tuple[str, float]]) -> tuple[float, float, float] | None:
    """(mean value at MSA blocks, at Conv blocks, their difference) of one run's (kind, value) pairs; None without
    both kinds."""
    msa = [c for k, c in changes if k == "msa"]
    conv = [c for k, c in changes if k == "conv"]
    if not msa or not conv:
        return None
    return float(np.mean(msa)), float(np.mean(conv)), float(np.mean(msa) - np.mean(conv))


def _msa_vs_conv(runs: list[RunRecord], per_block: Callable[[RunRecord], list[tuple[str, float]]],
                 confidence: float, unit: str) -> tuple[dict[str, Any], Estimate]:
    """MSA-block minus Conv-block mean per run, averaged per seed, over the runs that have both kinds."""
    blocks = {id(r): per_block(r) for r in runs}
    gaps = {i: _kind_gap(b) for i, b in blocks.items()}
    used = [r for r in runs if gaps[id(r)] is not None]

    def part(i: int) -> Estimate:
        return seed_interval(_per_seed(used, lambda r: gaps[id(r)][i]), confidence, unit)

    effect = part(2)
    return {"effect": effect.to_dict(), "msa": part(0).to_dict(), "conv": part(1).to_dict(), "runs": len(used),
            "placements": len({r.placement for r in used}),
            "msa_blocks": sum(k == "msa" for r in used for k, _ in blocks[id(r)]),
            "conv_blocks": sum(k == "conv" for r in used for k, _ in blocks[id(r)])}, effect


def _block_claim(runs: list[RunRecord], confidence: float, quantity: Callable[[dict], float], unit: str
                 ) -> tuple[dict[str, Any], Estimate]:
    measured, effect = _msa_vs_conv(runs, lambda r: block_changes(r.diagnostics.get("units") or [], quantity),
                                    confidence, unit)
    measured["msa_change"], measured["conv_change"] = measured.pop("msa"), measured.pop("conv")
    return measured, effect


def claim_low_pass(runs: list[RunRecord], confidence: float) -> ClaimResult:
    with_units = [r for r in runs if r.diagnostics.get("units")]
    measured, effect = _block_claim(with_units, confidence, lambda u: u["delta_high"], "Δ log amplitude")
    frequencies = {round(u.get("high_frequency") or float("nan"), 3) for r in with_units
                   for u in r.diagnostics["units"]}
    measured["frequency"] = sorted(f for f in frequencies if math.isfinite(f))
    return ClaimResult(
        "msa_low_pass", "MSAs are low-pass, Convs high-pass",
        "Δ log amplitude at high frequency falls across MSAs and rises across Convs (PAPER.md §6.1; ImageNet "
        "ResNet-50 and ViT-Ti)",
        measured, verdict_of(effect, "negative"),
        "Per run, the change of the high-frequency score (Δ log amplitude at the frequency in 'frequency', ×π) "
        "across every block that keeps its input's resolution; the mean change at MSA blocks minus that at Conv "
        "blocks, averaged per seed over the runs with both; t-interval over seeds. Holds when the interval is below 0.",
        "negative", effect)


def claim_variance(runs: list[RunRecord], confidence: float) -> ClaimResult:
    measured, effect = _block_claim([r for r in runs if r.diagnostics.get("units")], confidence,
                                    lambda u: math.log(max(u["variance"], 1e-30)), "log variance")
    return ClaimResult(
        "msa_reduce_variance", "MSAs reduce feature-map variance, Convs increase it",
        "variance drops across MSA units and rises across Conv/MLP units (PAPER.md §7; CIFAR-100 ResNet-50, ViT-Ti)",
        measured, verdict_of(effect, "negative"),
        "Per run, the change of log feature-map variance across every block that keeps its input's resolution; the "
        "mean at MSA blocks minus that at Conv blocks, averaged per seed; t-interval over seeds. Holds when below 0.",
        "negative", effect)


def _paired(best: list[RunRecord], start: list[RunRecord], value: Callable[[RunRecord], float | None]
            ) -> dict[int, float]:
    """best − start per seed both have a value for."""
    a, b = _per_seed(best, value), _per_seed(start, value)
    return {s: a[s] - b[s] for s in a.keys() & b.keys()}


def _log(value: float | None) -> float | None:
    return math.log(value) if value is not None and value > 0 else None


def claim_flatter(best: list[RunRecord], start: list[RunRecord], confidence: float) -> ClaimResult:
    runs = best + start
    # the paper measures at the end of warmup: those diagnostics where every run has them, else the final ones
    at_warmup = bool(runs) and all(r.warmup.get("lambda_max") is not None for r in runs)
    when = "end of warmup" if at_warmup else "end of training"

    def diag(r: RunRecord) -> dict[str, Any]:
        return r.warmup if at_warmup else r.diagnostics

    effect = seed_interval(_paired(best, start, lambda r: _log(diag(r).get("lambda_max"))), confidence, "log ratio")
    counts = [diag(r).get("hessian", {}).get("counts") or {} for r in runs]
    measured = {
        "effect": effect.to_dict(),
        "measured_at": when,
        "lambda_max_ratio": _clean(math.exp(effect.mean)) if math.isfinite(effect.mean) else None,
        "ape_log_ratio": seed_interval(_paired(best, start, lambda r: _log(diag(r).get("ape"))), confidence,
                                       "log ratio").to_dict(),
        "nep_difference": seed_interval(_paired(best, start, lambda r: diag(r).get("nep")), confidence).to_dict(),
        "best": _placement_of(best), "start": _placement_of(start),
        "eigenvalues_per_run": min((c.get("nep", 0) for c in counts), default=0),
        # a log ratio needs λ_max > 0: runs whose largest eigenvalue is not positive are left out, and counted
        "runs_without_positive_lambda_max": sum(1 for r in runs if (diag(r).get("lambda_max") is not None
                                                                    and diag(r)["lambda_max"] <= 0)),
    }
    return ClaimResult(
        "msa_flatten_loss", "MSAs suppress large Hessian eigenvalues",
        "the AlterNet's max-eigenvalue spectrum sits at smaller values than ResNet's (PAPER.md §5.1; CIFAR-100, "
        "end of warmup)",
        measured, verdict_of(effect, "negative"),
        f"log(λ_max of the best AlterNet / λ_max of the all-Conv start) at the {when} (the end of warmup where the "
        "study measured it: diagnostics.at_epochs: [warmup]), paired by seed (λ_max: the median over batches of each "
        "batch's top eigenvalue of NLL + L2 on augmented batches); t-interval over seeds; APE and NEP alongside. "
        "Holds when the interval is below 0. 'eigenvalues_per_run' is the fewest values behind one run's NEP; "
        "'runs_without_positive_lambda_max' were left out of the log ratio.",
        "negative", effect)


def _high_band_drop(run: RunRecord) -> float | None:
    noise = run.diagnostics.get("noise")
    if not noise:
        return None
    values = [d for f, d in zip(noise["frequencies"], noise["delta_acc"])
              if f > HIGH_NOISE_BANDS and d is not None and math.isfinite(d)]
    return float(np.mean(values)) if values else None


def claim_noise(best: list[RunRecord], start: list[RunRecord], confidence: float) -> ClaimResult:
    effect = seed_interval(_paired(best, start, _high_band_drop), confidence, "pp")
    noise = next((r.diagnostics["noise"] for r in best + start if r.diagnostics.get("noise")), {})
    measured = {"effect": effect.to_dict(),
                "best_drop": seed_interval(_per_seed(best, _high_band_drop), confidence, "pp").to_dict(),
                "start_drop": seed_interval(_per_seed(start, _high_band_drop), confidence, "pp").to_dict(),
                "bands": [f for f in noise.get("frequencies", []) if f > HIGH_NOISE_BANDS],
                "images": noise.get("images"), "energy": noise.get("energy"),
                "best": _placement_of(best), "start": _placement_of(start)}
    if not noise:
        measured["missing"] = "no noise diagnostics: set diagnostics.noise: true (or diagnostics: paper)"
    return ClaimResult(
        "alternet_noise_robust", "AlterNets withstand high-frequency noise better",
        "ViT loses ~4-6 pp to 0.7-0.9π noise where ResNet loses 10-15 pp (PAPER.md §6.2; ImageNet)",
        measured, verdict_of(effect, "positive"),
        f"Per run, the mean Δaccuracy under band-limited noise in the bands above {HIGH_NOISE_BANDS}π; best AlterNet "
        "minus all-Conv start, paired by seed; t-interval over seeds. Holds when above 0 (the AlterNet loses less).",
        "positive", effect)


def _corruptions(run: RunRecord) -> dict[str, Any]:
    return run.diagnostics.get("corruptions") or {}


def _robustness(run: RunRecord) -> float | None:
    return _corruptions(run).get("robustness")


def claim_corruptions(best: list[RunRecord], start: list[RunRecord], confidence: float) -> ClaimResult:
    sources = {_corruptions(r).get("source") for r in best + start} - {None}
    mixed = len(sources) > 1  # released and generated corruptions are different measurements: never paired
    effect = seed_interval({} if mixed else _paired(best, start, _robustness), confidence, "pp")
    measured: dict[str, Any] = {
        "effect": effect.to_dict(), "best_robustness": seed_interval(_per_seed(best, _robustness), confidence,
                                                                     "%").to_dict(),
        "start_robustness": seed_interval(_per_seed(start, _robustness), confidence, "%").to_dict(),
        "source": next(iter(sources), None), "best": _placement_of(best), "start": _placement_of(start)}
    if not sources:
        measured["missing"] = "no corruption diagnostics: set diagnostics.corruptions: true"
    elif mixed:
        measured["missing"] = (f"the runs were scored on different corrupted images ({', '.join(sorted(sources))}): "
                               "run the study's search command again to score them all on one")
    return ClaimResult(
        "alternet_corruption_robust", "AlterNets are more robust than their start",
        "Alter-ResNet-50 66.8 % vs ResNet-50 65.1 % mean accuracy on CIFAR-100-C (PAPER.md §4.1)",
        measured, verdict_of(effect, "positive"),
        "Per run, the mean accuracy over the corruptions and severities of 'source' (the released CIFAR-C files, "
        "else corruptions generated on validation images, which approximate them); best AlterNet minus all-Conv "
        "start, paired by seed; t-interval over seeds. Holds when above 0.",
        "positive", effect)


def _position_matched_lesions(run: RunRecord, start_by_seed: dict[int, RunRecord]) -> list[tuple[float, float]]:
    """(Δacc without this run's MSA block, Δacc without the start's Conv block at the same place, same seed) for
    every MSA of ``run`` whose place the start net of its seed was lesioned at."""
    start = start_by_seed.get(run.seed)
    if start is None:
        return []
    conv_at = {row["name"]: row["delta_acc"] for row in start.diagnostics.get("lesion") or [] if row["kind"] == "conv"}
    return [(row["delta_acc"], conv_at[row["name"]]) for row in run.diagnostics.get("lesion") or []
            if row["kind"] == "msa" and row["name"] in conv_at]


def claim_lesion(runs: list[RunRecord], start: list[RunRecord], confidence: float) -> ClaimResult:
    start_by_seed = {r.seed: r for r in start}
    matched = {id(r): _position_matched_lesions(r, start_by_seed) for r in runs}
    used = [r for r in runs if matched[id(r)]]

    def per_seed(i: int | None) -> Estimate:
        def value(r: RunRecord) -> float:
            pairs = matched[id(r)]
            return float(np.mean([m - c for m, c in pairs] if i is None else [p[i] for p in pairs]))
        return seed_interval(_per_seed(used, value), confidence, "pp")

    effect = per_seed(None)
    measured: dict[str, Any] = {"effect": effect.to_dict(), "msa_removed": per_seed(0).to_dict(),
                                "conv_removed_at_the_same_place": per_seed(1).to_dict(), "runs": len(used),
                                "placements": len({r.placement for r in used}),
                                "msa_blocks": sum(len(matched[id(r)]) for r in used)}
    if not any(r.diagnostics.get("lesion") for r in runs + start):
        measured["missing"] = "no lesion diagnostics: set diagnostics.lesion: true (or diagnostics: paper)"
    elif not used:
        measured["missing"] = "no AlterNet run has a start-net run of its seed with lesions to match its MSAs to"
    return ClaimResult(
        "msa_matter_at_stage_end", "MSAs matter at the end of a stage",
        "removing an MSA at a stage's end costs more accuracy than removing a Conv there; Convs matter at a stage's "
        "start (PAPER.md §7; Swin)",
        measured, verdict_of(effect, "negative"),
        "Position-matched: per AlterNet run, for each of its MSA blocks (at a stage's end), the Δaccuracy when that "
        "block's residual branch is skipped minus the Δaccuracy when the Conv block at the same place in the "
        "all-Conv start net of the same seed is skipped; averaged per seed; t-interval over seeds. Holds when below "
        "0 (the MSA there matters more than the Conv it replaced).",
        "negative", effect)


@dataclass(frozen=True)
class ChildChange:
    """A build-up child against its incumbent: the paired accuracy gain and how the diagnostics moved."""

    placement: str
    gain: float
    decision: str
    log_lambda_ratio: float | None
    high_frequency_change: float | None


def spearman_interval(x: list[float], y: list[float], confidence: float) -> Estimate:
    """Spearman's ρ with a Fisher-z interval (standard error √(1.06 / (n − 3)), Fieller et al. 1957); n ≥ 4."""
    n = len(x)
    if n < 3:
        return Estimate(float("nan"), (float("nan"), float("nan")), n, "rank correlation")
    rho = float(stats.spearmanr(x, y).statistic)
    if n < 4 or not math.isfinite(rho):
        return Estimate(rho, (float("nan"), float("nan")), n, "rank correlation")
    z, se = math.atanh(min(max(rho, -0.999999), 0.999999)), math.sqrt(1.06 / (n - 3))
    q = float(stats.norm.ppf(0.5 + confidence / 2))
    return Estimate(rho, (math.tanh(z - q * se), math.tanh(z + q * se)), n, "rank correlation")


def _early_filter(children: list[ChildChange], attr: str, sign: float) -> dict[str, Any]:
    """What training only the children on the gain-predicting side of the diagnostic's median would have done."""
    values = [(getattr(c, attr), c) for c in children if getattr(c, attr) is not None]
    median = float(np.median([v for v, _ in values]))
    kept = [c for v, c in values if sign * (v - median) >= 0]
    accepted = [c for _, c in values if c.decision == "accept"]
    return {"children": len(values), "trained": len(kept), "skipped_fraction": 1 - len(kept) / len(values),
            "accepted": len(accepted), "accepted_kept": sum(c.decision == "accept" for c in kept)}


NOT_PREDICTIVE = 0.3  # |ρ| below this is too weak to filter candidates with


def claim_predicts(children: list[ChildChange], confidence: float) -> ClaimResult:
    tests = (("lambda_max", "log_lambda_ratio"), ("high_frequency", "high_frequency_change"))
    per_test = 1 - (1 - confidence) / len(tests)  # Bonferroni: "either one holds" keeps the study's error rate
    measured: dict[str, Any] = {"children": len(children), "per_test_confidence": per_test}
    correlations: dict[str, Estimate] = {}
    verdicts = []
    for name, attr in tests:
        pairs = [(c.gain, getattr(c, attr)) for c in children if getattr(c, attr) is not None]
        rho = correlations[name] = spearman_interval([g for g, _ in pairs], [v for _, v in pairs], per_test)
        measured[name] = {"rho": rho.to_dict()}
        lo, hi = rho.ci
        if math.isfinite(lo) and (lo > 0 or hi < 0):
            verdicts.append("holds")
            measured[name]["early_filter"] = _early_filter(children, attr, math.copysign(1.0, rho.mean))
        elif math.isfinite(lo) and lo > -NOT_PREDICTIVE and hi < NOT_PREDICTIVE:
            verdicts.append("contradicted")
        else:
            verdicts.append("inconclusive")
    effect = max(correlations.values(), key=lambda e: abs(e.mean) if math.isfinite(e.mean) else -1.0)
    measured["effect"] = effect.to_dict()
    verdict: Verdict = ("holds" if "holds" in verdicts else
                        "contradicted" if verdicts == ["contradicted", "contradicted"] else "inconclusive")
    measured["summary"] = _predict_summary(measured, verdict)
    return ClaimResult(
        "diagnostics_predict_gains", "The diagnostics predict the build-up's decisions",
        "not tested in the paper (it reports the diagnostics of final models, not whether they rank candidates)",
        measured, verdict,
        "Across the evaluated children, Spearman's ρ between the paired accuracy gain over the incumbent and the "
        "change in log λ_max, and in the mean stage-end high-frequency score (both paired by seed); Fisher-z "
        "intervals, each at the Bonferroni level for two tests ('per_test_confidence'). Holds when either interval "
        f"excludes 0; contradicted when both lie within ±{NOT_PREDICTIVE}. Children that share an incumbent share "
        "its runs, so they are not independent: the intervals are narrower than they should be. "
        "'early_filter' replays, on these children, training only those on the gain side of the diagnostic's "
        "median (in-sample, from final-epoch diagnostics: an upper bound on what an early look would save). "
        "'effect' is the stronger of the two correlations.",
        None, effect)


def _predict_summary(measured: dict[str, Any], verdict: Verdict) -> str:
    if verdict == "holds":
        parts = []
        for name in ("lambda_max", "high_frequency"):
            f = measured[name].get("early_filter")
            if f:
                parts.append(f"{name} as an early filter would train {f['trained']} of {f['children']} children "
                             f"({100 * f['skipped_fraction']:.0f}% saved) and keep {f['accepted_kept']} of "
                             f"{f['accepted']} accepted ones")
        return "; ".join(parts)
    if verdict == "contradicted":
        return "neither diagnostic ranks the gains: they cannot replace training as a filter here"
    return (f"{measured['children']} children are too few to tell whether the diagnostics rank the gains; they "
            "cannot yet be trusted as a filter")


def _placement_of(runs: list[RunRecord]) -> str | None:
    return runs[0].placement if runs else None


def check_claims(runs: list[RunRecord], best: list[RunRecord], start: list[RunRecord],
                 children: list[ChildChange], confidence: float = 0.9) -> list[ClaimResult]:
    """Every claim on given runs: ``runs`` (all finished), the best AlterNet's and the start's, and the children."""
    alternets = [r for r in runs if r.num_msa]
    return [claim_low_pass(runs, confidence), claim_variance(runs, confidence),
            claim_flatter(best, start, confidence), claim_noise(best, start, confidence),
            claim_corruptions(best, start, confidence), claim_lesion(alternets, start, confidence),
            claim_predicts(children, confidence)]


def study_claims(study_dir: str | Path, confidence: float | None = None) -> list[ClaimResult]:
    """The claims on a build-up study folder's finished runs (``confidence``: the study's, unless given)."""
    from alternas.search.evaluator import epoch_diagnostics_dir
    from alternas.search.selection import load_results
    from alternas.search.study import StudyFolder

    study_dir = Path(study_dir)
    path = study_dir / "trajectory.json"
    if not path.is_file():
        raise ConfigError(f"{study_dir} has no build-up trajectory; run `alternas buildup` for it first")
    try:
        trajectory = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is damaged ({err}); run the build-up again to rewrite it") from None
    config = StudyFolder(study_dir).load_config()
    if confidence is None:
        confidence = config.buildup.confidence
    warmup = config.recipe.warmup_epochs if "warmup" in config.diagnostics.at_epochs else 0
    results = load_results(study_dir)

    def at_warmup(run_dir: str) -> dict[str, Any]:
        return _diagnostics(epoch_diagnostics_dir(run_dir, warmup)) if warmup else {}

    finished = {key: r for key, r in results.items() if r.status == "completed"}
    _one_split(finished)
    records = {key: RunRecord(r.placement, r.seed, r.val_acc, _diagnostics(Path(r.run_dir)), key,
                              at_warmup(r.run_dir))
               for key, r in finished.items()}
    steps = trajectory["steps"]
    runs_of = {s["placement"]: [records[k] for k in s.get("keys", []) if k in records] for s in steps}
    start = runs_of.get(steps[0]["placement"], []) if steps else []
    best_step = _best_alternet(steps, trajectory.get("best"))
    best = runs_of.get(best_step["placement"], []) if best_step else []
    return check_claims(list(records.values()), best, start, _children(steps, runs_of), confidence)


def _one_split(results: dict[str, Any]) -> None:
    """Claims pair runs by seed: refuse runs validated on different splits (data files that differ between the
    machines that trained them), naming two of them, as the build-up's comparisons do."""
    from alternas.search.evaluated import Evaluated, same_split
    from alternas.train.evidence import evidence_digest

    same_split(Evaluated(result, digest=evidence_digest(result.run_dir)) for result in results.values())


def _best_alternet(steps: list[dict], best: str | None) -> dict | None:
    """The build-up's best placement if it has an MSA, else its highest-scoring evaluated placement with one."""
    chosen = next((s for s in steps if s["placement"] == best and s.get("num_msa")), None)
    if chosen is not None:
        return chosen
    alternets = [s for s in steps if s.get("num_msa") and s.get("score") is not None]
    return max(alternets, key=lambda s: s["score"], default=None)


def _stage_end_score(run: RunRecord) -> float | None:
    scores = list((run.diagnostics.get("delta_high") or {}).values())
    return float(np.mean(scores)) if scores else None


def _children(steps: list[dict], runs_of: dict[str, list[RunRecord]]) -> list[ChildChange]:
    children = []
    for step in steps:
        incumbent = step.get("incumbent") or step.get("parent")
        if step["decision"] in ("start",) or step.get("gain") is None or incumbent not in runs_of:
            continue
        child, parent = runs_of[step["placement"]], runs_of[incumbent]
        ratio = _paired(child, parent, lambda r: _log(r.diagnostics.get("lambda_max")))
        high = _paired(child, parent, _stage_end_score)
        children.append(ChildChange(step["placement"], float(step["gain"]), step["decision"],
                                    float(np.mean(list(ratio.values()))) if ratio else None,
                                    float(np.mean(list(high.values()))) if high else None))
    return children


def _diagnostics(run_dir: Path) -> dict[str, Any]:
    """A run's final diagnostics (``RUN/diagnostics``), or of one epoch (``RUN/diagnostics/epoch-NNN``)."""
    path = (run_dir if run_dir.name.startswith("epoch-") else run_dir / "diagnostics") / "diagnostics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def claims_table(claims: list[ClaimResult]) -> str:
    """The claims as a plain-text table for the terminal."""
    rows = [("claim", "paper", "measured", "verdict")]
    for c in claims:
        rows.append((c.title, c.paper.split(" (")[0], _measured_line(c), c.verdict))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((48, 60, 64, 12))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(_cut(cell, w).ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _measured_line(c: ClaimResult) -> str:
    if c.measured.get("missing"):
        return c.measured["missing"].split(":")[0]
    if c.claim == "diagnostics_predict_gains":
        parts = [f"ρ({k}) {_describe(c.measured[k]['rho'])}" for k in ("lambda_max", "high_frequency")]
        return "; ".join(parts)
    effect = c.measured["effect"]
    return f"{_describe(effect)} {effect['unit']}".strip()


def _describe(estimate: dict[str, Any]) -> str:
    mean, (lo, hi) = estimate["mean"], estimate["ci"]
    if mean is None:
        return f"n/a (n={estimate['n']})"
    interval = f" [{lo:+.3g}, {hi:+.3g}]" if lo is not None else ""
    return f"{mean:+.3g}{interval} (n={estimate['n']})"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


VERDICT_COLOURS = {"holds": "seagreen", "contradicted": "crimson", "inconclusive": "grey"}


def claims_figure(claims: list[ClaimResult]) -> Any:
    """One row per claim: the measured effect with its interval against zero, the side the paper reports shaded,
    coloured by verdict."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(claims), cols=1, vertical_spacing=0.6 / max(len(claims), 1),
                        subplot_titles=[f"{c.title}: {c.verdict}" for c in claims])
    for row, c in enumerate(claims, start=1):
        effect = c.measured["effect"]
        mean, (lo, hi) = effect["mean"], effect["ci"]
        span = max(abs(v) for v in (mean, lo, hi, 1e-9) if v is not None) * 1.3
        if c.expected:
            x0, x1 = (-span, 0) if c.expected == "negative" else (0, span)
            fig.add_vrect(x0=x0, x1=x1, fillcolor="rgba(46,139,87,0.10)", line_width=0, row=row, col=1)
        fig.add_vline(x=0, line_color="black", line_width=1, row=row, col=1)
        if mean is not None:
            error = {"type": "data", "symmetric": False, "array": [hi - mean], "arrayminus": [mean - lo]} if (
                lo is not None) else None
            fig.add_trace(go.Scatter(x=[mean], y=[c.claim], error_x=error, mode="markers",
                                     marker={"color": VERDICT_COLOURS[c.verdict], "size": 11}, showlegend=False,
                                     hovertext=f"{c.paper}<br>measured: {_measured_line(c)}"), row=row, col=1)
        paper = "paper: below 0" if c.expected == "negative" else "paper: above 0" if c.expected else \
            "paper: not tested"
        fig.update_xaxes(range=[-span, span], title_text=f"{effect['unit']} (n={effect['n']}); {paper}",
                         title_font_size=11, row=row, col=1)
        fig.update_yaxes(showticklabels=False, row=row, col=1)
    fig.update_layout(title="The paper's claims on this study (shaded: the side the paper reports)",
                      height=130 * len(claims) + 80)
    return fig


def claims_html(claims: list[ClaimResult]) -> str:
    """The claims as an HTML table (paper, measured, verdict, method)."""
    import html

    rows = "".join(
        f"<tr><td>{html.escape(c.title)}</td><td>{html.escape(c.paper)}</td>"
        f"<td>{html.escape(_measured_line(c))}</td>"
        f"<td style='color:{VERDICT_COLOURS[c.verdict]}'><b>{c.verdict}</b></td>"
        f"<td>{html.escape(c.method)}</td></tr>" for c in claims)
    return ("<h2 id='claims'>The paper's claims on this study</h2><table><tr><th>claim</th><th>paper</th>"
            f"<th>measured (mean [interval] (n))</th><th>verdict</th><th>method</th></tr>{rows}</table>")
