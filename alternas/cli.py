"""The ``alternas`` command line: a thin click layer over the library.

Each command parses options, calls the library and prints. Library errors (``AlternasError``) become one line on
stderr and exit code 2; Ctrl-C exits 130 after the library has saved what it computed.

Why one module over the ~400-line guide: every command's options and help texts sit together, as click apps keep
them (the docs' CLI page is generated from them), and each command body is a few lines over the library.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from alternas.errors import AlternasError


class _Group(click.Group):
    """Maps user errors to one line + exit 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AlternasError as err:
            click.echo(f"alternas: error: {err.one_line()}", err=True)
            sys.exit(2)
        except click.UsageError as err:
            command = err.ctx.command_path if err.ctx else "alternas"
            click.echo(f"alternas: error: {err.format_message()} (see '{command} --help')", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("alternas: interrupted; finished work is saved, run the same command again to resume",
                       err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="alternas")
def main() -> None:
    """Build, train, diagnose and search AlterNets (Conv/MSA placements on ResNet bases)."""


# Help texts of options that several commands share (a study file's value wins where the option is not given).
BASE_HELP = "Base network: resnet18/34/50/101/152 or a CPU-sized tiny/small (see `alternas bases`)."
WINDOW_HELP = "MSA window; default 4 for images <= 64 px, else 7."
DATA_HELP = ("cifar10, cifar100, fashion-mnist, mnist, kmnist, torch/NAME (timm's prefix: torch/cifar10 ... and "
             "torch/svhn, torch/stl10, torch/flowers102, torch/dtd, torch/oxford_iiit_pet, torch/food101), shapes, "
             "textures, cued-shapes, brightest or imagefolder:PATH.")
DATA_ROOT_HELP = ("Where datasets live (default $ALTERNAS_DATA, else ~/.cache/alternas/data; Fashion-MNIST also "
                  "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist).")
SUBSET_HELP = "Train on a class-balanced subset: a fraction (0-1] or a number of images."
DEVICE_HELP = "cuda, cuda:1, mps or cpu (default: the best available)."
RECIPE_HELP = "Training recipe preset: fast, paper, paper-imagenet or paper-sgd."
_STUDY_DEFAULT = " Default: the study file's, else {} on the built-in datasets and {} on others."


def _model_options(func: Any) -> Any:
    """Options shared by every command that builds a model from a placement."""
    for option in reversed([
        click.option("--base", default="resnet50", show_default=True, help=BASE_HELP),
        click.option("--num-classes", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Classes of the classifier head."),
        click.option("--image-size", type=click.IntRange(min=8), default=224, show_default=True,
                     help="Input size in px: <= 64 gives the CIFAR-style stem (3x3, no max-pool)."),
        click.option("--window-size", type=click.IntRange(min=1), default=None, help=WINDOW_HELP),
    ]):
        func = option(func)
    return func


@main.command()
def bases() -> None:
    """List the registered base networks."""
    from alternas.models import get_base, list_bases

    for name in list_bases():
        b = get_base(name)
        click.echo(f"{name:<10} {b.block:<10} depths={b.depths} widths={b.widths} heads={b.heads}  {b.description}")


@main.command()
@click.argument("placement")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def arch(placement: str, base: str, num_classes: int, image_size: int, window_size: int | None,
         as_json: bool) -> None:
    """Describe the AlterNet that PLACEMENT (e.g. CCC,CCCM,CCCCCM,CMCM) builds: blocks, parameters, FLOPs."""
    from alternas.models import build_model, count_flops, count_parameters

    model = build_model(placement, base, num_classes=num_classes, image_size=image_size, window_size=window_size)
    params, flops = count_parameters(model), count_flops(model)
    blocks = [info.to_dict() for info in model.block_infos]
    if as_json:
        click.echo(json.dumps({
            "placement": str(model.placement), "base": model.base.name, "num_classes": num_classes,
            "image_size": image_size, "window_size": model.window_size, "num_msa": model.placement.num_msa,
            "params": params, "flops": flops, "blocks": blocks,
        }))
        return
    click.echo(f"AlterNet {model.placement} on {model.base.name}  ({model.placement.describe()})")
    click.echo(f"{'unit':<12} {'kind':<5} {'channels':>13} {'map':>7} {'heads':>5} {'window':>6}")
    for info in model.block_infos:
        unit = "stem" if info.kind == "stem" else f"c{info.stage + 1}.{info.index + 1}"
        kind = info.kind + ("/2" if info.subsamples else "")
        chans = f"{info.in_channels}->{info.out_channels}"
        fmap = f"{info.feature_size}x{info.feature_size}"
        heads = info.heads or "-"
        window = info.window_size or "-"
        click.echo(f"{unit:<12} {kind:<5} {chans:>13} {fmap:>7} {heads!s:>5} {window!s:>6}")
    click.echo(f"params: {params:,}   forward FLOPs/image: {flops / 1e9:.3f} G   "
               f"({image_size}px, {num_classes} classes, window {model.window_size})")


@main.command()
@_model_options
@click.option("--placement", default=None, help="Placement to export (with --base etc.).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Trained weights (.safetensors, or a torch file loaded with weights_only=True).")
@click.option("--study", "study_dir", type=click.Path(file_okay=False), default=None,
              help="A study folder: export its chosen candidate (with --best) and trained weights.")
@click.option("--best", is_flag=True, help="With --study: the build-up's final placement (or, for an Optuna-only "
              "study, the best trial), best seed.")
@click.option("--trial", type=int, default=None, help="With --study: this Optuna trial.")
@click.option("--prefer", default=None, help="With --best on a multi-objective study: the objective that decides.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
def export(base: str, num_classes: int, image_size: int, window_size: int | None, placement: str | None,
           checkpoint: str | None, study_dir: str | None, best: bool, trial: int | None, prefer: str | None,
           out_dir: str, force: bool) -> None:
    """Export an AlterNet (with weights) to a folder that timm.create_model('local-dir:OUT') loads."""
    from alternas.models import build_model
    from alternas.models.timm_hub import export_to_timm, load_weights, model_from_run

    if study_dir:
        if not best and trial is None:
            raise click.UsageError("with --study, say which candidate: --best or --trial N")
        from alternas.search.selection import chosen_run

        chosen = chosen_run(study_dir, trial, prefer)
        model = model_from_run(chosen.run_dir)
        base = model.base.name
        click.echo(f"{study_dir}: best placement {chosen.placement} (seed {chosen.seed}, val acc "
                   f"{chosen.val_acc:.2f}%, test acc {chosen.test_acc:.2f}%)")
    elif placement is None:
        raise click.UsageError("give --placement (and --base, --num-classes, --image-size) or --study DIR --best")
    else:
        model = build_model(placement, base, num_classes=num_classes, image_size=image_size,
                            window_size=window_size)
        if checkpoint:
            load_weights(model, checkpoint)
    out = export_to_timm(model.eval(), out_dir, force=force)
    click.echo(f"exported {model.placement} ({base}) to {out}; load it with "
               f"`import alternas, timm; timm.create_model('local-dir:{out}', pretrained=True)`")


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--set key=value`` pairs -> dict (values are coerced by the recipe)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        out[key.strip().replace("-", "_")] = value
    return out


def _data_options(func: Any) -> Any:
    for option in reversed([
        click.option("--data", "data_name", default="shapes", show_default=True,
                     help=DATA_HELP),
        click.option("--data-root", default=None, help=DATA_ROOT_HELP),
        click.option("--subset", type=float, default=None, help=SUBSET_HELP),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
                     help="Share of the training set held out for validation (seeded)."),
        click.option("--image-size", type=click.IntRange(min=8), default=None,
                     help="Image folders and torch/ sets: the size images are resized to (default 32)."),
        click.option("--stream", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
                     help="Image files (imagefolder, torch/ JPEG sets): decode per sample from disk instead of into "
                          "memory (auto: when larger than 4 GiB decoded)."),
    ]):
        func = option(func)
    return func


@main.command()
@click.option("--placement", required=True, help="Placement string, e.g. CC,CM,CM,CM.")
@click.option("--base", default="resnet50", show_default=True, help=BASE_HELP)
@click.option("--window-size", type=click.IntRange(min=1), default=None, help=WINDOW_HELP)
@_data_options
@click.option("--recipe", "recipe_name", default="fast", show_default=True, help=RECIPE_HELP)
@click.option("--recipe-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML mapping of recipe keys applied on top of --recipe.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs after warmup.")
@click.option("--batch-size", type=click.IntRange(min=2), default=None,
              help="Training batch size (default: the recipe's).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (default: the recipe's).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other recipe key (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the weights, data order and augmentation.")
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (CUDA).")
@click.option("--deterministic", is_flag=True, help="Deterministic kernels (slower).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(placement: str, base: str, window_size: int | None, data_name: str, data_root: str | None,
          subset: float | None, val_fraction: float, image_size: int | None, stream: str, recipe_name: str,
          recipe_file: str | None, epochs: int | None,
          batch_size: int | None, lr: float | None, sets: tuple[str, ...], out_dir: str, resume: bool, seed: int,
          device: str | None, compile_model: bool, deterministic: bool, quiet: bool) -> None:
    """Train one AlterNet and write metrics, checkpoints and weights to --out."""
    from alternas.data import DataConfig
    from alternas.train import get_recipe
    from alternas.train.run import recipe_file_overrides, train_run

    overrides: dict[str, Any] = recipe_file_overrides(recipe_file) if recipe_file else {}
    overrides.update({k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v})
    overrides.update(_parse_sets(sets))
    data = DataConfig(data_name, root=data_root, subset=subset, val_fraction=val_fraction, seed=seed,
                      image_size=image_size, stream=stream)
    result = train_run(placement, base, data, get_recipe(recipe_name, overrides), out_dir, window_size=window_size,
                       seed=seed, log=click.echo, device=device, resume=resume, quiet=quiet,
                       compile_model=compile_model, deterministic=deterministic)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        test = f", test acc {result.test['acc']:.2f}%" if result.test else ""
        click.echo(f"{result.status}: {result.epochs_completed}/{result.total_epochs} epochs, "
                   f"val acc {result.val.get('acc', float('nan')):.2f}%{test} -> {out_dir}")
    if result.status != "completed":
        sys.exit(1)


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--placement", default=None, help="Without RUN_DIR: the placement to build.")
@click.option("--base", default=None, help="Without RUN_DIR: the base (default resnet50).")
@click.option("--window-size", type=click.IntRange(min=1), default=None, help=WINDOW_HELP)
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Weights to diagnose.")
@click.option("--data", "data_name", default=None, help="Dataset (default: the run's, else shapes).")
@click.option("--data-root", default=None, help=DATA_ROOT_HELP)
@click.option("--subset", type=float, default=None, help=SUBSET_HELP)
@click.option("--recipe", "recipe_name", default=None, help="Recipe whose augmentation and wd the Hessian uses.")
@click.option("--preset", type=click.Choice(["default", "paper"]), default=None,
              help="Diagnostics settings: paper = the paper's protocol (top-5 Hessian eigenvalues per training batch "
                   "over an epoch, noise, lesion, CKA); the flags below then pick among them.")
@click.option("--hessian", is_flag=True, help="Hessian max-eigenvalue spectrum (λ_max, NEP, APE).")
@click.option("--fourier", is_flag=True, help="Δ log amplitude of every block's output vs depth.")
@click.option("--variance", is_flag=True, help="Feature-map variance vs depth (same pass as --fourier).")
@click.option("--noise", is_flag=True, help="Accuracy under band-limited noise, 0.1π..0.9π.")
@click.option("--lesion", is_flag=True, help="Accuracy drop when each block is removed.")
@click.option("--landscape", is_flag=True, help="2-D loss landscape (costly: grid² × batches forwards).")
@click.option("--trace", is_flag=True, help="Hutchinson estimate of the Hessian trace.")
@click.option("--cka", is_flag=True, help="Linear CKA between every pair of blocks' outputs.")
@click.option("--hessian-batches", type=click.IntRange(min=1), default=None,
              help="Batches the Hessian spectrum averages over (default: the preset's).")
@click.option("--hessian-k", type=click.IntRange(min=1), default=None,
              help="Top eigenvalues of the Hessian to estimate (default: the preset's).")
@click.option("--no-augment", is_flag=True, help="Hessian loss on clean batches instead of augmented ones.")
@click.option("--no-l2", is_flag=True, help="Hessian loss without the (wd/2)·‖θ‖² term.")
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where diagnostics.json and diagnostics.html go (default RUN_DIR/diagnostics).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def diagnose(run_dir: str | None, placement: str | None, base: str | None, window_size: int | None,
             checkpoint: str | None, data_name: str | None, data_root: str | None, subset: float | None,
             recipe_name: str | None, preset: str | None, hessian: bool, fourier: bool, variance: bool, noise: bool,
             lesion: bool, landscape: bool, trace: bool, cka: bool, hessian_batches: int | None,
             hessian_k: int | None, no_augment: bool,
             no_l2: bool, device: str | None, out_dir: str | None, as_json: bool) -> None:
    """Diagnose a trained model: a run folder (RUN_DIR) or --placement/--base/--checkpoint."""
    from alternas.diagnostics.run import diagnose_trained, headline, select_diagnostics

    if run_dir is None and placement is None:
        raise click.UsageError("give RUN_DIR, or --placement (with --base and --checkpoint)")
    config = select_diagnostics(preset, {"hessian": hessian, "fourier": fourier or variance, "noise": noise,
                                         "lesion": lesion, "landscape": landscape, "trace": trace, "cka": cka},
                                hessian_batches=hessian_batches, hessian_k=hessian_k, augment=not no_augment,
                                l2=not no_l2)
    done = diagnose_trained(run_dir, placement=placement, base=base, window_size=window_size, checkpoint=checkpoint,
                            recipe=recipe_name, config=config, device=device, out_dir=out_dir,
                            data={"name": data_name, "root": data_root, "subset": subset})
    summary, target = headline(done.result), done.out_dir
    if as_json:
        click.echo(json.dumps({"placement": str(done.model.placement), **summary, "out": str(target)}))
    else:
        for key, value in summary.items():
            click.echo(f"{key:>16}: {value}")
        click.echo(f"wrote {target}/diagnostics.json and {target}/diagnostics.html")


def _study_options(func: Any) -> Any:
    """Options shared by the searches: they override the study file's values."""
    for option in reversed([
        click.option("--name", default=None, help="Study name (output defaults to studies/<name>)."),
        click.option("--base", default=None, help=BASE_HELP + _STUDY_DEFAULT.format("tiny", "resnet50")),
        click.option("--data", "data_name", default=None,
                     help=DATA_HELP + " Default: the study file's, else shapes (optuna: cifar100 on resnet50)."),
        click.option("--data-root", default=None, help=DATA_ROOT_HELP),
        click.option("--subset", type=float, default=None, help=SUBSET_HELP),
        click.option("--recipe", "recipe_name", default=None,
                     help=RECIPE_HELP + _STUDY_DEFAULT.format("fast", "paper")),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Epochs after warmup of every candidate (default: the recipe's)."),
        click.option("--seeds", default=None, help="Comma-separated seeds; decisions use the mean over them."),
        click.option("--out", "out_dir", default=None, help="Study folder (default studies/<name>)."),
        click.option("--device", default=None, help=DEVICE_HELP),
        click.option("--quiet", is_flag=True, help="No per-epoch progress bars."),
        click.option("--retry-failed", is_flag=True,
                     help="Train diverged candidates again (crashed ones are retried by every run anyway)."),
    ]):
        func = option(func)
    return func


def _worker_options(func: Any) -> Any:
    """How many local workers a search runs, and how many torch threads each uses."""
    for option in reversed([
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Local worker processes: one per visible GPU, or on CPU each with cores/N torch threads."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Torch threads of this worker (default: torch's; --workers sets cores/N)."),
        click.option("--worker", is_flag=True, hidden=True, help="Started by --workers: no report of its own."),
    ]):
        func = option(func)
    return func


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_workers(command: str, config: Any, workers: int, storage: str | None, quiet: bool,
                 retry_failed: bool) -> None:
    """``workers`` local processes of ``command`` on the study as saved in its folder (every override applied)."""
    from alternas.search import StudyFolder
    from alternas.search.workers import launch_workers

    folder = StudyFolder(config.output_dir)
    folder.save_config(config)
    args = [command, "--study", str(folder.root / "study.yaml"), "--worker"]
    args += ["--quiet"] * quiet + ["--retry-failed"] * retry_failed
    code = launch_workers(args, workers, storage, click.echo)
    if code:
        raise SystemExit(code)


@main.command()
@click.option("--study", "study_file", type=click.Path(dir_okay=False), default=None,
              help="Study YAML (e.g. studies/quickstart.yaml); flags below override it.")
@_study_options
@click.option("--start", default=None, help="Placement to start from (default: the base's all-Conv net).")
@click.option("--min-gain", type=click.FloatRange(min=0), default=None, help="Accuracy gain (pp) to accept an MSA.")
@click.option("--confidence", type=click.FloatRange(0.5, 1, min_open=True, max_open=True), default=None,
              help="Accept when P(gain > min gain) reaches this; reject when it falls to 1 - this.")
@click.option("--min-seeds", type=click.IntRange(min=1), default=None, help="Seeds a comparison starts with.")
@click.option("--max-seeds", type=click.IntRange(min=1), default=None,
              help="Seeds it may grow to while undecided (then: reject by the seed budget).")
@click.option("--screen-at", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Look at this fraction of the epochs first; stop children confidently worse there.")
@click.option("--pool-seed-variance/--no-pool-seed-variance", default=None,
              help="Comparisons borrow the seed variance the study's earlier comparisons measured (default: off).")
@click.option("--accept-spending", type=click.Choice(["power", "equal"]), default=None,
              help="How a comparison's looks share its false-accept rate: by the share of seeds seen, so looks at few "
                   "seeds keep little (power, default), or evenly (equal, Bonferroni).")
@click.option("--patience", type=click.IntRange(min=0), default=None,
              help="After a reject, keep adding MSAs in that stage on the rejected net this many times (default 0).")
@click.option("--max-candidates", type=click.IntRange(min=1), default=None,
              help="Placements to evaluate, the start included (default 50).")
@click.option("--budget-hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop once candidates have used this many hours of training (default: no budget).")
@click.option("--warm-start/--no-warm-start", default=None,
              help="Children inherit their parent's weights and train half the epochs: cheaper, but it can miss an "
                   "MSA that must learn something new (docs/concepts/buildup.md).")
@click.option("--storage", default=None, help="Optuna storage URL every worker shares (default: $ALTERNAS_STORAGE, "
              "else the study's optuna.storage, else a journal file in the study folder).")
@_worker_options
def buildup(study_file: str | None, name: str | None, base: str | None, data_name: str | None,
            data_root: str | None, subset: float | None, recipe_name: str | None, epochs: int | None,
            seeds: str | None, start: str | None, min_gain: float | None, confidence: float | None,
            min_seeds: int | None, max_seeds: int | None, screen_at: float | None,
            pool_seed_variance: bool | None, accept_spending: str | None, patience: int | None,
            max_candidates: int | None, budget_hours: float | None, warm_start: bool | None, storage: str | None,
            workers: int, threads: int | None, worker: bool, out_dir: str | None, device: str | None, quiet: bool,
            retry_failed: bool) -> None:
    """Run (or resume) the automated build-up search; finished candidates are never retrained. Start it on every
    GPU of every machine with one --storage (or --workers N on one machine): the workers share one search."""
    from alternas.report import build_report
    from alternas.search import run_buildup

    config = _study_config(study_file, name, base, data_name, data_root, subset, recipe_name, epochs, seeds,
                           out_dir, device, {"buildup.start": start, "buildup.min_gain": min_gain,
                                             "buildup.confidence": confidence, "buildup.min_seeds": min_seeds,
                                             "buildup.max_seeds": max_seeds, "buildup.screen_at": screen_at,
                                             "buildup.pool_seed_variance": pool_seed_variance,
                                             "buildup.accept_spending": accept_spending,
                                             "buildup.patience": patience, "buildup.max_candidates": max_candidates,
                                             "buildup.budget_hours": budget_hours, "buildup.warm_start": warm_start})
    click.echo(f"study {config.name}: base {config.base}, data {config.data.name}, recipe {config.recipe.name} "
               f"({config.recipe.total_epochs} epochs), seeds {list(config.seeds)} -> {config.output_dir}")
    if workers > 1:
        _run_workers("buildup", config, workers, storage, quiet, retry_failed)
        trajectory = json.loads((config.output_dir / "trajectory.json").read_text())
        click.echo(f"best placement: {trajectory['best']} ({len(trajectory['steps'])} placements, {workers} workers)")
    else:
        _set_threads(threads)
        outcome = run_buildup(config, quiet=quiet, retry_failed=retry_failed, storage=storage, log=click.echo)
        click.echo(f"best placement: {outcome.best} ({outcome.candidates_evaluated} placements, "
                   f"{outcome.candidate_epochs} candidate-epochs trained by this worker, stopped: "
                   f"{outcome.stopped_by})")
    if not worker:
        click.echo(f"report: {build_report(config.output_dir)}")


def _study_config(study_file, name, base, data_name, data_root, subset, recipe_name, epochs, seeds, out_dir, device,
                  extra: dict[str, Any]):
    from alternas.search.study import study_for_command

    if seeds is not None:
        try:
            seeds = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}",
                                     param_hint="--seeds") from None
    overrides = {"name": name, "base": base, "data.name": data_name, "data.root": data_root, "data.subset": subset,
                 "recipe.epochs": epochs, "seeds": seeds or None, "output": out_dir, "device": device, **extra}
    return study_for_command(study_file, overrides, recipe=recipe_name)


@main.command()
@click.option("--study", "study_file", type=click.Path(dir_okay=False), default=None,
              help="Study YAML; default: the paper's setting (resnet50 on cifar100).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Total trials of the study, all workers.")
@click.option("--space", type=click.Path(dir_okay=False), default=None,
              help="Search space YAML (default search_spaces/<base>.yaml).")
@click.option("--sampler", type=click.Choice(["tpe", "nsga2", "random", "grid"]), default=None,
              help="Optuna sampler (default tpe; nsga2 for several objectives).")
@click.option("--pruner", type=click.Choice(["hyperband", "median", "none"]), default=None,
              help="Optuna pruner that stops poor trials early (default hyperband; single objective only).")
@click.option("--objectives", default=None, help="Comma-separated, e.g. acc,lambda_max,params (directions inferred).")
@click.option("--storage", default=None, help="Optuna storage URL (default: $ALTERNAS_STORAGE, else a journal file "
              "in the study folder).")
@click.option("--study-name", default=None, help="Name of the Optuna study inside the storage.")
@click.option("--seed", type=int, default=None, help="Sampler seed.")
@_study_options
@_worker_options
def optuna(study_file: str | None, trials: int | None, space: str | None, sampler: str | None, pruner: str | None,
           objectives: str | None, storage: str | None, study_name: str | None, seed: int | None, name: str | None,
           base: str | None, data_name: str | None, data_root: str | None, subset: float | None,
           recipe_name: str | None, epochs: int | None, seeds: str | None, out_dir: str | None, device: str | None,
           quiet: bool, retry_failed: bool, workers: int, threads: int | None, worker: bool) -> None:
    """Optuna search over placements; run the same command on many machines with one --storage to share a study."""
    from alternas.report import build_report
    from alternas.search.optuna_search import run_optuna
    from alternas.search.storage import redact, storage_url

    if study_file is None and not (base or data_name):
        base, data_name = "resnet50", "cifar100"
    config = _study_config(study_file, name, base, data_name, data_root, subset, recipe_name, epochs, seeds,
                           out_dir, device, {
                               "optuna.trials": trials, "optuna.space": space, "optuna.sampler": sampler,
                               "optuna.pruner": pruner, "optuna.study_name": study_name, "optuna.seed": seed,
                               "optuna.objectives": [o.strip() for o in objectives.split(",")] if objectives
                               else None})
    oc = config.optuna
    url = storage_url(storage, oc.storage)  # --storage stays out of study.yaml: it may carry a password
    where = redact(url) if url else "the journal file in the study folder"
    click.echo(f"optuna study {oc.study_name or config.name}: {oc.trials} trials in total, sampler {oc.sampler}, "
               f"objectives {list(oc.objectives)}, storage {where} -> {config.output_dir}")
    if workers > 1:
        _run_workers("optuna", config, workers, storage, quiet, retry_failed)
        from alternas.search.optuna_search import load_optuna_study

        study = load_optuna_study(config, url)
    else:
        _set_threads(threads)
        study = run_optuna(config, storage=storage, quiet=quiet, retry_failed=retry_failed, log=click.echo)
    if worker:
        return
    states = [t.state.name for t in study.trials]
    click.echo(f"trials: {len(states)} ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
               f"{states.count('FAIL')} failed)")
    if len(oc.objectives) == 1 and states.count("COMPLETE"):
        best = study.best_trial
        click.echo(f"best: trial {best.number} {best.user_attrs.get('placement')} on {best.user_attrs.get('base')}, "
                   f"{oc.objectives[0]} {best.value:.4g}")
    elif states.count("COMPLETE"):
        click.echo(f"Pareto front: {len(study.best_trials)} trials: "
                   + "; ".join(f"#{t.number} {t.user_attrs.get('placement')}" for t in study.best_trials))
    click.echo(f"report: {build_report(config.output_dir, storage=url)}")


def _parse_seeds(text: str, hint: str = "--seeds") -> list[int]:
    """``0-9``, ``0,1,2`` or both (``0-3,7``) as a sorted list of distinct seeds (>= 0)."""
    seeds: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            first, last = 0, -1
        if not 0 <= first <= last:
            raise click.BadParameter(f"expected seeds like 0-9 (low to high) or 0,1,2, got {text!r}",
                                     param_hint=hint)
        seeds.update(range(first, last + 1))
    if not seeds:
        raise click.BadParameter(f"expected at least one seed, got {text!r}", param_hint=hint)
    return sorted(seeds)


@main.command()
@click.option("--study", "study_file", type=click.Path(dir_okay=False), required=True,
              help="Study YAML: base, data, recipe and start of the placements (e.g. studies/tables/NAME/study.yaml).")
@click.option("--space", type=click.Path(dir_okay=False), default=None,
              help="Search space YAML whose every placement to train (default: every placement the build-up can "
                   "reach from the study's start).")
@click.option("--seeds", default=None, help="Seeds, e.g. 0-9 or 0,1,2 (default: the study's seeds).")
@click.option("--out", "out_dir", default=None,
              help="Table folder (default: the study file's folder for a file named study.yaml, else "
                   "<its folder>/<its name>-table).")
@click.option("--quiet", is_flag=True, help="No per-epoch progress output.")
@click.option("--retry-failed", is_flag=True, help="Train diverged runs again.")
@_worker_options
def table(study_file: str, space: str | None, seeds: str | None, out_dir: str | None, quiet: bool,
          retry_failed: bool, workers: int, threads: int | None, worker: bool) -> None:
    """Train every placement x every seed through the shared evaluator and write a tabular benchmark (table.csv,
    evidence.npz, table.json, study.yaml) that `alternas bench search` replays searches from. Resumable: runs
    the table holds are never trained again; --workers N shares the runs between N local processes."""
    import yaml

    from alternas.search.spaces import load_space
    from alternas.search.study import load_study, with_overrides
    from alternas.search.table import Table, build_table, table_placements

    config = load_study(study_file)
    if seeds is not None:
        config = with_overrides(config, {"seeds": _parse_seeds(seeds)})
    study_path = Path(study_file)
    out = Path(out_dir) if out_dir else (study_path.parent if study_path.name == "study.yaml"
                                         else study_path.parent / f"{study_path.stem}-table")
    placements = table_placements(config, load_space(space) if space else None)
    if not worker:
        click.echo(f"table {config.name}: {len(placements)} placements of {config.base} on {config.data.name}, "
                   f"seeds {list(config.seeds)}, {config.recipe.total_epochs} epochs -> {out}")
    if workers > 1:
        from alternas.search.workers import launch_workers

        args = ["table", "--study", study_file, "--out", str(out), "--seeds", ",".join(map(str, config.seeds)),
                "--worker", *(["--space", space] if space else []), *(["--quiet"] * quiet),
                *(["--retry-failed"] * retry_failed)]
        code = launch_workers(args, workers, None, click.echo)
        if code:
            raise SystemExit(code)
    else:
        _set_threads(threads)
        build_table(config, placements, out, space=yaml.safe_load(Path(space).read_text()) if space else None,
                    log=click.echo, quiet=quiet, retry_failed=retry_failed)
    if not worker:
        from alternas.fileio import atomic_write_text

        if not (out / "study.yaml").is_file():  # the study that recomputes the table travels with it
            atomic_write_text(out / "study.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        done = Table.load(out)
        click.echo(f"table: {len(done.runs)} of {len(done.placements) * len(done.seeds)} runs in {out} "
                   f"({'complete' if done.complete else 'incomplete: run the command again'})")


@main.command()
@click.argument("study_dir", type=click.Path(file_okay=False))
@click.option("--storage", default=None, help="Optuna storage URL, when the study's trials are not in the folder.")
def report(study_dir: str, storage: str | None) -> None:
    """Write STUDY_DIR/report.html (works on a finished or a running study)."""
    from alternas.report import build_report

    click.echo(f"wrote {build_report(study_dir, storage=storage)}")


@main.command()
@click.argument("study_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the claims as JSON (claim, paper, measured, verdict, "
              "method).")
@click.option("--confidence", type=click.FloatRange(0.5, 1.0, min_open=True, max_open=True), default=None,
              help="Level of the intervals (default: the study's buildup.confidence).")
def claims(study_dir: str, as_json: bool, confidence: float | None) -> None:
    """Check the paper's claims on STUDY_DIR's own candidates; also written to claims.json and report.html."""
    from alternas.claims import claims_table, study_claims
    from alternas.fileio import atomic_write_text
    from alternas.report import build_report

    checked = study_claims(study_dir, confidence)
    payload = json.dumps([c.to_dict() for c in checked], indent=1)
    atomic_write_text(Path(study_dir) / "claims.json", payload)
    report = build_report(study_dir)
    if as_json:
        click.echo(payload)
        return
    click.echo(claims_table(checked))
    for c in checked:
        if c.claim == "diagnostics_predict_gains":
            click.echo(f"\n{c.title}: {c.measured['summary']}.")
    click.echo(f"\nwrote {Path(study_dir) / 'claims.json'} and {report}")


BENCHMARKS = ("attention", "layout", "pipeline", "streaming", "hessian", "fourier")  # alternas.bench.SPEED_BENCHMARKS
SLOW_BENCHMARKS = ("decisions", "buildup-workers", "search")  # run only when named


@main.command()
@click.argument("which", nargs=-1, type=click.Choice(BENCHMARKS + SLOW_BENCHMARKS))
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Speed benchmarks: alternating rounds per arm; the median is reported.")
@click.option("--study", "study_file", default="studies/quickstart.yaml", show_default=True,
              help="decisions: the study to repeat on disjoint seed pools.")
@click.option("--pools", type=click.IntRange(min=2), default=None,
              help="decisions: how many disjoint seed pools (default 5); search: random seed pools (default 200).")
@click.option("--table", "table_dir", type=click.Path(file_okay=False), default=None,
              help="search: the tabular benchmark folder to replay searches from (see `alternas table`); "
                   "decisions: grade each pool's answers against it (its seeds outside the pool).")
@click.option("--pool-size", type=click.IntRange(min=1), default=3, show_default=True,
              help="search: seeds each replayed search may use, drawn from the table's; the rest judge it.")
@click.option("--strategies", default=",".join(("buildup", "tpe", "random", "qmc", "decision-rule")),
              show_default=True, help="search: the strategies to replay, comma-separated.")
@click.option("--out", "out_dir", default=None, help="decisions: folder of the per-pool studies (resumable).")
@click.option("--json", "as_json", is_flag=True, help="decisions: print the figures as one JSON object.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="decisions, search: override a study key, e.g. buildup.screen_at=0.4 (repeatable).")
@click.option("--workers", "worker_counts", default="1,2,4,8", show_default=True,
              help="buildup-workers: the worker counts to simulate, comma-separated.")
@click.option("--worlds", type=click.IntRange(min=1), default=5, show_default=True,
              help="buildup-workers: simulated seed-noise worlds to average over.")
@click.option("--min-seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="buildup-workers: seeds a comparison starts with (up to 5).")
def bench(which: tuple[str, ...], device: str | None, rounds: int, study_file: str, pools: int | None,
          table_dir: str | None, pool_size: int, strategies: str, out_dir: str | None, as_json: bool,
          sets: tuple[str, ...], worker_counts: str, worlds: int, min_seeds: int) -> None:
    """Speed, arms interleaved in one run: SDPA vs plain attention, NCHW vs channels_last training, in-memory vs
    DataLoader pipeline, an image folder in memory vs streamed from disk, Lanczos vs PyHessian (needs
    `pip install pyhessian==0.1`), Fourier profile vs forward.
    Default: all of them. `decisions` (only when named: minutes per pool) runs a study's build-up on disjoint
    seed pools and prints how often the final placements agree, seeds and candidate-epochs per decision and the
    wall time (with --table, each pool's answers graded against that table too). `buildup-workers` (only when
    named) simulates the build-up of PAPER.md §3.3 with 1, 2, 4 and 8 workers and prints the wall-time speedup,
    the wasted (speculative, unused) work and whether the decisions equal one worker's. `search` (only when
    named, with --table) replays the build-up (with any --set settings) and Optuna's samplers on random seed pools
    of a tabular benchmark and scores them against the held-out seeds: P(best), regret, false accepts/rejects and
    candidate-epochs, with 90 % intervals over the pools."""
    from alternas import bench as b

    for name in which or BENCHMARKS:
        if name == "search":
            import yaml

            from alternas.search.replay import describe, replay_search
            from alternas.search.study import load_study, with_overrides
            from alternas.search.table import Table

            if not table_dir:
                raise click.UsageError("bench search needs --table DIR (a folder written by `alternas table`)")
            table = Table.load(table_dir)
            config = with_overrides(load_study(Path(table_dir) / "study.yaml"),
                                    {key: yaml.safe_load(value) for key, value in _parse_sets(sets).items()})
            rows = replay_search(table, config, tuple(s.strip() for s in strategies.split(",") if s.strip()),
                                 pools=pools or 200, pool_size=pool_size, log=lambda line: click.echo(line, err=True))
            click.echo(json.dumps(rows) if as_json else describe(rows))
            continue
        if name == "buildup-workers":
            try:
                counts = tuple(int(c) for c in worker_counts.split(","))
            except ValueError:
                raise click.BadParameter(f"expected comma-separated integers, got {worker_counts!r}",
                                         param_hint="--workers") from None
            if min(counts) < 1 or not 1 <= min_seeds <= 5:
                raise click.BadParameter("worker counts must be >= 1 and --min-seeds between 1 and 5")
            rows = b.buildup_workers(counts, min_seeds=min_seeds, worlds=worlds,
                                     log=lambda line: click.echo(line, err=as_json))
            if as_json:
                click.echo(json.dumps(rows))
        elif name == "decisions":
            import yaml

            overrides = {key: yaml.safe_load(value) for key, value in _parse_sets(sets).items()}
            if device:
                overrides["device"] = device
            r = b.decision_agreement(study_file, pools or 5, out_dir, overrides,
                                     log=lambda line: click.echo(line, err=as_json), table=table_dir)
            click.echo(json.dumps(r) if as_json else b.describe("decisions", r))
        else:
            click.echo(b.describe(name, b.SPEED_BENCHMARKS[name](rounds=rounds, device=device)))


if __name__ == "__main__":
    main()
