"""``diagnose``: every diagnostic a candidate is scored on, with bounded, configurable cost."""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from alternas.data.augment import eval_batches, make_train_batches, mixes, mixup_for
from alternas.data.datasets import DataSplits
from alternas.data.loader import TensorLoader
from alternas.diagnostics import figures
from alternas.diagnostics.corruptions import corrupted_for, corruption_robustness
from alternas.diagnostics.features import feature_profile, stage_end_delta_high
from alternas.diagnostics.hessian import hessian_spectrum, hutchinson_trace
from alternas.diagnostics.landscape import loss_landscape
from alternas.diagnostics.robustness import lesion_study, noise_robustness
from alternas.diagnostics.similarity import minibatch_cka
from alternas.errors import ConfigError
from alternas.fileio import atomic_write_text
from alternas.train.recipe import Recipe


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Which diagnostics to run and how much each may cost. Defaults are cheap enough to run on every candidate;
    the ``paper`` preset (``DIAGNOSTICS_PRESETS``) is the paper's protocol."""

    hessian: bool = True
    fourier: bool = True  # Fourier profile and feature-map variance (one forward pass)
    noise: bool = False
    lesion: bool = False
    landscape: bool = False
    trace: bool = False
    hessian_batches: int | None = 2  # None: every batch of one pass over the (augmented) training set
    hessian_batch_size: int | None = 64  # None: the recipe's batch size
    hessian_k: int = 1
    hessian_tol: float = 1e-3
    hessian_max_matvecs: int = 60  # per batch: bounds the Lanczos cost when eigenvalues cluster
    augment: bool = True  # Hessian loss on the recipe's augmented training batches (paper: yes)
    l2: bool = True  # add (wd/2)·‖θ‖² to the Hessian loss (paper: yes)
    fourier_images: int = 64
    fourier_score: Literal["common", "paper"] = "common"  # delta_high at a frequency all units resolve | paper's
    noise_eps: float = 0.7
    noise_half_width: float = 0.05
    noise_band: Literal["measured", "paper"] = "measured"  # the bins really in each band | the reference's mask
    noise_energy: Literal["equal", "paper"] = "equal"  # the same noise energy in every band | what the bins keep
    noise_images: int = 500
    lesion_images: int = 500
    landscape_grid: int = 7
    landscape_batches: int = 1
    trace_samples: int = 10
    # accuracy on corrupted images (PAPER.md §4.1): the released CIFAR-C files beside CIFAR, else generated ones
    corruptions: bool = False
    corruption_images: int = 200  # per corruption and severity
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    cka: bool = False  # linear CKA between the outputs of every pair of units (PAPER.md §7)
    cka_batches: int = 4
    cka_batch_size: int = 64
    # also diagnose at these epochs during training (1-based; "warmup": the end of the recipe's warmup, where the
    # paper's Hessian spectra are taken), kept in the candidate's diagnostics/epoch-NNN/
    at_epochs: tuple[int | Literal["warmup"], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value <= 10_000_000:
                raise ConfigError(f"diagnostics.{f.name} must be in [0, 10000000], got {value}")
        for key in ("hessian_k", "hessian_batches", "hessian_batch_size", "cka_batches", "cka_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"diagnostics.{key} must be >= 1, got {getattr(self, key)}")
        object.__setattr__(self, "at_epochs", tuple(self.at_epochs))
        object.__setattr__(self, "severities", tuple(sorted(self.severities)))
        if not self.severities or any(s not in (1, 2, 3, 4, 5) for s in self.severities) or \
                len(set(self.severities)) != len(self.severities):
            raise ConfigError(f"diagnostics.severities must list distinct severities 1-5, got {list(self.severities)}")
        if self.corruption_images < 1:
            raise ConfigError(f"diagnostics.corruption_images must be >= 1, got {self.corruption_images}")
        if any(e != "warmup" and (not isinstance(e, int) or e < 1) for e in self.at_epochs):
            raise ConfigError(f"diagnostics.at_epochs must list epochs >= 1 or 'warmup', got {list(self.at_epochs)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at_epochs"] = list(self.at_epochs)
        out["severities"] = list(self.severities)
        return out

    def epochs_for(self, recipe: Recipe) -> list[int]:
        """``at_epochs`` as 1-based epoch numbers of ``recipe`` ("warmup": its last warmup epoch, if it has one)."""
        wanted = {recipe.warmup_epochs if e == "warmup" else e for e in self.at_epochs}
        return sorted(e for e in wanted if 1 <= e <= recipe.total_epochs)


DIAGNOSTICS_PRESETS: dict[str, DiagnosticsConfig] = {
    "default": DiagnosticsConfig(),
    # PAPER.md §5.1, §6, §7: top-5 largest-magnitude eigenvalues per augmented training batch of the recipe's size
    # over one pass of the training set, also at the end of warmup; the Fourier score at each map's own highest
    # frequency; the reference's noise bands; lesions and CKA.
    "paper": DiagnosticsConfig(
        hessian_k=5, hessian_batches=None, hessian_batch_size=None, hessian_max_matvecs=200, fourier_images=256,
        fourier_score="paper", noise=True, noise_band="paper", noise_energy="paper", lesion=True, cka=True,
        at_epochs=("warmup",),
    ),
}


def get_diagnostics(spec: str | dict[str, Any] | None, where: str = "diagnostics") -> DiagnosticsConfig:
    """A study's ``diagnostics`` section: a preset name, or a mapping of settings with an optional ``preset``."""
    from alternas.errors import check_types, reject_unknown_keys

    if spec is None:
        return DiagnosticsConfig()
    values = {"preset": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else None
    if values is None:
        raise ConfigError(f"{where}: give a preset name ({', '.join(DIAGNOSTICS_PRESETS)}) or a mapping")
    preset = values.pop("preset", "default")
    if preset not in DIAGNOSTICS_PRESETS:
        raise ConfigError(f"{where}: unknown diagnostics preset {preset!r}; choose one of: "
                          f"{', '.join(DIAGNOSTICS_PRESETS)}")
    reject_unknown_keys(values, {f.name for f in fields(DiagnosticsConfig)}, where=where)
    return replace(DIAGNOSTICS_PRESETS[preset], **check_types(DiagnosticsConfig, values, where))


def hessian_batch_size(config: DiagnosticsConfig, recipe: Recipe) -> int:
    return config.hessian_batch_size or recipe.batch_size


def _hessian_batches(model, data: DataSplits, recipe: Recipe, config: DiagnosticsConfig, device):
    """Augmented training batches (+ Mixup/CutMix soft targets when the recipe mixes), or clean ones."""
    if config.augment:
        aug = replace(recipe, batch_size=hessian_batch_size(config, recipe), workers=0)
        batches = make_train_batches(data, aug, device, config.seed, 0, 1)
    else:
        batches = eval_batches(data, data.train, hessian_batch_size(config, recipe), device, shuffle=True,
                               drop_last=True, seed=config.seed)
    mixup = mixup_for(recipe, data) if config.augment else None
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if mixup is not None:
            if len(x) % 2:
                x, y = x[:-1], y[:-1]
            x, y = mixup(x, y)
        yield x, y


def diagnose(
    model: torch.nn.Module,
    data: DataSplits,
    recipe: Recipe,
    config: DiagnosticsConfig = DiagnosticsConfig(),
    out_dir: str | Path | None = None,
    label: str = "model",
) -> dict[str, Any]:
    """Run the diagnostics ``config`` selects on a trained ``model``; returns (and writes) ``diagnostics.json``.

    Summary keys a search records: ``lambda_max``, ``nep``, ``ape``, ``delta_high`` (per stage end), ``robustness``
    (mean accuracy on corrupted images, with ``corruptions.source`` saying which images).
    """
    device = next(model.parameters()).device
    wd = recipe.weight_decay if config.l2 else 0.0
    out: dict[str, Any] = {"settings": {**config.to_dict(), "weight_decay_in_loss": wd,
                                        "mixup_in_loss": bool(config.augment and mixes(recipe, data))},
                           "timings": {}}
    val_images = data.val if len(data.val) else data.test

    if config.fourier:
        t0 = time.perf_counter()
        images = val_images.take(torch.arange(min(config.fourier_images, len(val_images)))).load()
        x, _ = next(iter(TensorLoader(images, len(images), mean=data.mean, std=data.std, device=device)))
        records = feature_profile(model, x, config.fourier_score)
        out["units"] = [r.to_dict() for r in records]
        out["delta_high"] = stage_end_delta_high(records)
        out["fourier"] = {"score": config.fourier_score, "images": len(images), "high_frequency": (
            records[0].high_frequency if config.fourier_score == "common" and records else None)}
        out["timings"]["fourier"] = time.perf_counter() - t0
    if config.hessian:
        t0 = time.perf_counter()
        spectrum = hessian_spectrum(model, _hessian_batches(model, data, recipe, config, device),
                                    n_batches=config.hessian_batches, k=config.hessian_k, weight_decay=wd,
                                    tol=config.hessian_tol, max_matvecs=config.hessian_max_matvecs)
        out["hessian"] = spectrum.to_dict()
        out.update(lambda_max=spectrum.lambda_max, nep=spectrum.nep, ape=spectrum.ape)
        out["timings"]["hessian"] = time.perf_counter() - t0
    if config.trace:
        x, y = next(_hessian_batches(model, data, recipe, config, device))
        out["hessian_trace"] = hutchinson_trace(model, x, y, config.trace_samples, wd, config.seed)
    eval_loader = TensorLoader(val_images.take(torch.arange(min(max(config.noise_images, config.lesion_images),
                                                                len(val_images)))).load(),
                               256, mean=data.mean, std=data.std, device=device)
    if config.noise:
        t0 = time.perf_counter()
        out["noise"] = noise_robustness(model, eval_loader, eps=config.noise_eps,
                                        half_width=config.noise_half_width, seed=config.seed,
                                        band=config.noise_band, energy=config.noise_energy)
        out["timings"]["noise"] = time.perf_counter() - t0
    if config.lesion:
        out["lesion"] = lesion_study(model, eval_loader)
    if config.corruptions:
        t0 = time.perf_counter()
        corrupted = corrupted_for(data.name, Path(data.root) if data.root else None, val_images,
                                  config.corruption_images, config.severities, config.seed)
        out["corruptions"] = corruption_robustness(model, corrupted, data.mean, data.std, device)
        out["robustness"] = out["corruptions"]["robustness"]
        out["timings"]["corruptions"] = time.perf_counter() - t0
    if config.cka:
        t0 = time.perf_counter()
        count = min(config.cka_batches * config.cka_batch_size, len(val_images))
        loader = TensorLoader(val_images.take(torch.arange(count)).load(), config.cka_batch_size, mean=data.mean,
                              std=data.std, device=device, drop_last=True)
        out["cka"] = minibatch_cka(model, (x for x, _ in loader))
        out["timings"]["cka"] = time.perf_counter() - t0
    if config.landscape:
        batches = [b for _, b in zip(range(config.landscape_batches),
                                     _hessian_batches(model, data, recipe, config, device))]
        out["landscape"] = loss_landscape(model, batches, grid=config.landscape_grid, weight_decay=wd or 0.05,
                                          seed=config.seed)

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "diagnostics.json", json.dumps(_finite(out), indent=1))
        write_figures(out_dir / "diagnostics.html", {label: out}, title=f"Diagnostics: {label}")
    return out


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def diagnostic_figures(results: dict[str, dict]) -> list:
    """Every figure the results allow, comparing the labelled models side by side."""
    figs = []
    with_units = {k: v["units"] for k, v in results.items() if v.get("units")}
    if with_units:
        figs += [figures.fourier_figure(with_units), figures.variance_figure(with_units)]
    spectra = {k: v["hessian"]["eigenvalues"] for k, v in results.items() if v.get("hessian")}
    if spectra:
        figs.append(figures.hessian_figure(spectra))
    noise = {k: v["noise"] for k, v in results.items() if v.get("noise")}
    if noise:
        figs.append(figures.noise_figure(noise))
    for v in results.values():
        if v.get("lesion"):
            figs.append(figures.lesion_figure(v["lesion"]))
        if v.get("landscape"):
            figs.append(figures.landscape_figure(v["landscape"]))
    for name, v in results.items():
        if v.get("cka"):
            figs.append(figures.cka_figure(v["cka"], name))
    return figs


def _counts(result: dict) -> str:
    counts = (result.get("hessian") or {}).get("counts")
    return "" if not counts else f"{counts['lambda_max']} batches / {counts['nep']} / {counts['ape']}"


def _fourier_note(results: dict[str, dict]) -> str:
    units = next((v["units"] for v in results.values() if v.get("units")), None)
    if not units:
        return ""
    return f"<p>High-frequency score read at {html.escape(figures.high_frequency_label(units))}.</p>"


def write_figures(path: Path, results: dict[str, dict], title: str) -> Path:
    rows = "".join(
        f"<tr><td>{k}</td><td>{v.get('lambda_max', float('nan')):.4g}</td><td>{v.get('nep', float('nan')):.3f}</td>"
        f"<td>{v.get('ape', float('nan')):.4g}</td><td>{_counts(v)}</td>"
        f"<td>{', '.join(f'{s}: {d:.2f}' for s, d in v.get('delta_high', {}).items())}</td></tr>"
        for k, v in results.items()
    )
    table = ("<h2>Summary</h2><table><tr><th>model</th><th>λ_max (median)</th><th>NEP</th><th>APE</th>"
             "<th>values behind λ_max / NEP / APE</th>"
             "<th>Δ log amplitude at the high frequency, stage ends</th></tr>"
             f"{rows}</table>{_fourier_note(results)}")
    return figures.write_html(path, title, diagnostic_figures(results), tables_html=table)


def select_diagnostics(preset: str | None = None, chosen: dict[str, bool] | None = None,
                       **settings: Any) -> DiagnosticsConfig:
    """The diagnostics a command asks for: ``preset``'s settings (default: ``default``), the named ``chosen`` ones
    switched on (none named: the preset's own selection, or without a preset Hessian + Fourier), and ``settings``
    (``None`` values ignored) on top. Never during training (``at_epochs`` is cleared)."""
    if preset is not None and preset not in DIAGNOSTICS_PRESETS:
        raise ConfigError(f"unknown diagnostics preset {preset!r}; choose one of: {', '.join(DIAGNOSTICS_PRESETS)}")
    base = DIAGNOSTICS_PRESETS[preset or "default"]
    chosen = dict(chosen or {})
    if not any(chosen.values()):
        chosen = {k: getattr(base, k) for k in chosen} if preset else {**chosen, "hessian": True, "fourier": True}
    return replace(base, **chosen, **{k: v for k, v in settings.items() if v is not None}, at_epochs=())


class Diagnosed(NamedTuple):
    model: torch.nn.Module
    result: dict[str, Any]
    out_dir: Path


def diagnose_trained(
    run_dir: str | Path | None = None,
    *,
    placement: str | None = None,
    base: str | None = None,
    window_size: int | None = None,
    checkpoint: str | Path | None = None,
    data: dict[str, Any] | None = None,
    recipe: str | None = None,
    config: DiagnosticsConfig = DiagnosticsConfig(),
    device: str | None = None,
    out_dir: str | Path | None = None,
) -> Diagnosed:
    """Diagnose a trained model: a run folder (model, data and recipe from its ``config.yaml``, its weights) or a
    ``placement`` + ``base`` (+ ``checkpoint``) on the built-in data. ``data`` overrides data settings by key,
    ``recipe`` names the preset whose augmentation and weight decay the Hessian loss uses. Writes
    ``diagnostics.json`` / ``.html`` to ``out_dir`` (default ``RUN_DIR/diagnostics``)."""
    from alternas.data.datasets import DataConfig, load_data
    from alternas.errors import check_types, reject_unknown_keys
    from alternas.models.timm_hub import load_weights
    from alternas.train.fit import pick_device
    from alternas.train.recipe import get_recipe
    from alternas.train.run import model_for, read_run_config, run_weights

    saved: dict[str, Any] = {}
    if run_dir is not None:
        saved = read_run_config(run_dir)
        checkpoint = checkpoint or run_weights(run_dir)
    elif placement is None:
        raise ConfigError("diagnose needs a run folder, or a placement (with a base and a checkpoint)")
    model_args = saved.get("model") or {}
    chosen_recipe = (get_recipe(recipe) if recipe else
                     Recipe.from_dict(saved["recipe"]) if "recipe" in saved else get_recipe("fast"))
    settings = {**(saved.get("data_config") or {}), **{k: v for k, v in (data or {}).items() if v is not None}}
    where = f"{run_dir}/config.yaml data_config" if run_dir is not None else "data"
    reject_unknown_keys(settings, {f.name for f in fields(DataConfig)}, where=where)
    splits = load_data(DataConfig(**check_types(DataConfig, settings, where)))
    model = model_for(placement or model_args.get("placement"), base or model_args.get("base", "resnet50"), splits,
                      chosen_recipe, window_size or model_args.get("window_size"))
    if checkpoint:
        load_weights(model, checkpoint)
    model = model.to(pick_device(device))
    target = Path(out_dir or (Path(run_dir) / "diagnostics" if run_dir is not None else "diagnostics"))
    return Diagnosed(model, diagnose(model, splits, chosen_recipe, config, out_dir=target,
                                     label=str(model.placement)), target)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers a command prints of a ``diagnose`` result: curvature, Fourier, trace, and accuracy change per
    noise frequency."""
    summary = {k: result[k] for k in ("lambda_max", "nep", "ape", "delta_high", "hessian_trace") if k in result}
    if "noise" in result:
        summary["noise_delta_acc"] = dict(zip(result["noise"]["frequencies"], result["noise"]["delta_acc"]))
    return summary
