import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alternas.data import DataConfig, load_data
from alternas.data.augment import build_train_transform, make_train_batches, randaugment_kind
from alternas.data.loader import normalize
from alternas.diagnostics.run import DiagnosticsConfig, _hessian_batches
from alternas.errors import ConfigError
from alternas.search import study_from_dict
from alternas.search.evaluator import training_settings
from alternas.train import PRESETS, Recipe, fit, get_recipe
from alternas.train.fit import _prepare
from alternas.train.run import model_for
from tests.helpers import interrupt_after_first_epoch, run_cli, small_study


@pytest.fixture(scope="module")
def textures():
    return load_data(DataConfig("textures", subset=1500, val_fraction=0.2, seed=0))


def test_paper_recipe_is_the_reference_cifar_recipe() -> None:
    r = PRESETS["paper"]
    assert (r.optimizer, r.lr, r.weight_decay, r.batch_size, r.eval_batch_size) == ("adamw", 1.25e-4, 0.05, 96, 256)
    assert (r.warmup_epochs, r.epochs, r.total_epochs, r.schedule) == (5, 300, 305, "cosine")
    assert (r.clip_grad, r.label_smoothing, r.mixup, r.cutmix, r.drop_path) == (5.0, 0.1, 1.0, 0.8, 0.1)
    assert r.randaugment == "rand-m9-n2-mstd1.0" and r.crop_padding == 4 and r.flip
    assert PRESETS["paper-imagenet"].clip_grad is None and PRESETS["paper-imagenet"].random_erasing == 0.25


def test_schedule_warms_up_per_iteration_then_cosine_per_epoch() -> None:
    r = PRESETS["paper"]
    assert r.lr_at(0, 0, 100) == 0.0
    assert r.lr_at(2, 50, 100) == pytest.approx(1.25e-4 * 250 / 500)
    assert r.lr_at(5, 0, 100) == pytest.approx(1.25e-4)
    assert r.lr_at(5, 99, 100) == pytest.approx(1.25e-4)  # constant within an epoch
    assert r.lr_at(155, 0, 100) == pytest.approx(1.25e-4 * 0.5)
    sgd = PRESETS["paper-sgd"]
    assert sgd.lr_at(1 + 60, 0, 10) == pytest.approx(0.1 * 0.2)
    assert sgd.lr_at(1 + 170, 0, 10) == pytest.approx(0.1 * 0.2**3)


def test_recipe_round_trips_through_yaml_and_rejects_bad_keys() -> None:
    for recipe in PRESETS.values():
        assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    r = get_recipe("fast", {"epochs": "3", "lr": "0.01", "flip": "false", "clip_grad": "none", "milestones": "2,4"})
    assert (r.epochs, r.lr, r.flip, r.clip_grad, r.milestones) == (3, 0.01, False, None, (2, 4))
    with pytest.raises(ConfigError, match="unknown recipe key 'learning_rate'"):
        get_recipe("fast", {"learning_rate": 1})
    with pytest.raises(ConfigError, match="unknown recipe 'slow'"):
        get_recipe("slow")
    with pytest.raises(ConfigError, match="lr must be > 0"):
        get_recipe("fast", {"lr": "-1"})
    with pytest.raises(ConfigError, match="epochs = 'x' is not allowed: input should be a valid integer"):
        get_recipe("fast", {"epochs": "x"})


def test_paper_transform_uses_timm_randaugment() -> None:
    from timm.data.auto_augment import RandAugment

    shapes = load_data(DataConfig("shapes", subset=200, seed=0))
    transform = build_train_transform(PRESETS["paper"], shapes)
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds[:3] == ["RandomCrop", "RandomHorizontalFlip", "RandAugment"]
    ra = transform.transforms[2]
    assert isinstance(ra, RandAugment) and ra.num_layers == 2 and len(ra.ops) == 15
    assert ra.ops[0].magnitude == 9 and ra.ops[0].magnitude_std == 1.0
    assert {"Rotate", "ShearX", "ShearY"} <= {op.name for op in ra.ops}


def test_recipes_skip_the_augmentations_that_change_a_datasets_labels(textures) -> None:
    """textures: a mirror maps a grating's orientation θ to 180° − θ (another class); rotations and shears blur the
    36° steps between classes. The dataset declares it, every recipe honours it, on both loader paths."""
    assert textures.label_breaking == ("hflip", "rotate", "shear") and not textures.allows("hflip")
    transform = build_train_transform(PRESETS["paper"], textures)
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds[:2] == ["RandomCrop", "RandAugment"]
    names = {op.name for op in transform.transforms[1].ops}
    assert len(names) == 12 and not names & {"Rotate", "ShearX", "ShearY"}
    weighted_recipe = get_recipe("paper", {"randaugment": "rand-m9-n2-tweights"})
    weighted = build_train_transform(weighted_recipe, textures).transforms[1]
    assert len(weighted.choice_weights) == 12 and sum(weighted.choice_weights) == pytest.approx(1.0)
    recipe = get_recipe("fast", {"crop_padding": 0, "flip": True})
    x, _ = next(iter(make_train_batches(textures, recipe, torch.device("cpu"), seed=0, rank=0, world=1)))
    rows = {bytes(normalize(img[None], textures.mean, textures.std).numpy()) for img in textures.train.images}
    assert all(bytes(img[None].numpy()) in rows for img in x)  # not one image mirrored
    user = load_data(DataConfig("shapes", subset=200, seed=0, label_breaking=["hflip"]))
    assert not user.allows("hflip") and user.allows("rotate")



def test_the_brightest_probe_trains_without_what_would_change_which_square_is_brightest(tmp_path) -> None:
    """brightest's label is the hue of its brightest square: RandAugment's ops (on pixel values: reordered levels;
    geometric: the square moved out), random erasing, mixup and cutmix would change it. Every recipe and the Hessian
    leave them out, and a cache key names them only where its recipe would have applied them (the shipped table's
    fast-recipe keys stay as they were)."""
    from timm.data.auto_augment import NAME_TO_OP

    geometric = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
    assert {name for name in NAME_TO_OP if randaugment_kind(name) != "photometric"} == geometric
    brightest = load_data(DataConfig("brightest", subset=200, seed=0))
    shapes = load_data(DataConfig("shapes", subset=200, seed=0))
    assert set(brightest.label_breaking) == {"rotate", "shear", "translate", "photometric", "erasing", "mixing"}
    paper = get_recipe("paper", {"random_erasing": 0.25})  # the paper's recipe erases nothing; timm's often do
    kinds = [type(t).__name__ for t in build_train_transform(paper, brightest).transforms]
    assert kinds == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    kinds = [type(t).__name__ for t in build_train_transform(paper, shapes).transforms]
    assert "RandAugment" in kinds and "RandomErasing" in kinds
    # weighted ops are drawn without replacement: never more than are left (timm would raise in a loader worker)
    weighted = get_recipe("paper", {"randaugment": "rand-m9-n6-tweights"})
    geometric_only = load_data(DataConfig("shapes", subset=200, seed=0, label_breaking=["photometric"]))
    randaugment = build_train_transform(weighted, geometric_only).transforms[2]
    assert type(randaugment).__name__ == "RandAugment" and randaugment.num_layers == len(randaugment.ops) == 5
    assert randaugment(geometric_only.train.pil_image(0)).size == (32, 32)
    config = DiagnosticsConfig(augment=True, hessian_batch_size=8)
    for data, mixed in ((brightest, False), (shapes, True)):
        model = model_for("CC,CC,CC,CC", "tiny", data, paper)
        assert (_prepare(model, data, paper, tmp_path, torch.device("cpu"), 0, 0, 1, None).mixup is not None) == mixed
        _, targets = next(_hessian_batches(model, data, paper, config, torch.device("cpu")))
        assert (targets.dim() == 2) == mixed  # Mixup's soft targets, or the labels

    def key_data(data: str, recipe: dict) -> dict:
        config = study_from_dict(small_study(tmp_path, data={"name": data}, recipe=recipe))
        return training_settings(config, config.recipe)["data"]

    assert "label_breaking" not in key_data("brightest", {"name": "fast", "flip": False})
    assert key_data("brightest", {"name": "paper"})["label_breaking"] == \
        ["rotate", "shear", "translate", "photometric", "mixing"]
    assert key_data("brightest", {"name": "fast", "random_erasing": 0.25})["label_breaking"] == ["erasing"]
    assert key_data("textures", {"name": "fast", "flip": True})["label_breaking"] == ["hflip"]


def test_two_epochs_learn_well_above_chance(tmp_path, textures) -> None:
    recipe = get_recipe("fast", {"epochs": 2, "warmup_epochs": 0})
    model = model_for("CC,CM,CM,CM", "tiny", textures, recipe)
    result = fit(model, textures, recipe, tmp_path / "run", quiet=True)
    assert result.status == "completed" and result.epochs_completed == 2
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # faster on the CPU
    assert result.val["acc"] > 80  # chance is 10%; 51% while flips swapped the mirrored classes
    assert result.test["acc"] > 80
    assert {"acc", "top5", "nll", "ece"} <= set(result.val)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "completed" and len(saved["history"]) == 2
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "lr", "train_loss", "val_acc", "val_top5", "val_nll", "val_ece", "images_per_s"} <= set(header)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["recipe"]["epochs"] == 2 and config["seed"] == 0
    assert set(load_file(tmp_path / "run" / "model.safetensors")) == set(model.state_dict())


def test_resume_continues_with_identical_results(tmp_path, textures) -> None:
    recipe = get_recipe("fast", {"epochs": 2, "warmup_epochs": 1, "drop_path": 0.1})
    straight = fit(model_for("CC,CM,CM,CM", "tiny", textures, recipe), textures, recipe, tmp_path / "a", quiet=True)

    with pytest.raises(KeyboardInterrupt):
        fit(model_for("CC,CM,CM,CM", "tiny", textures, recipe), textures, recipe, tmp_path / "b", quiet=True,
            epoch_callback=interrupt_after_first_epoch)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["status"] == "interrupted"
    with pytest.raises(ConfigError, match="pass --resume"):
        fit(model_for("CC,CM,CM,CM", "tiny", textures, recipe), textures, recipe, tmp_path / "b", quiet=True)
    resumed = fit(model_for("CC,CM,CM,CM", "tiny", textures, recipe), textures, recipe, tmp_path / "b", quiet=True,
                  resume=True)
    assert resumed.epochs_completed == 3
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_acc"] for h in straight.history] == [h["val_acc"] for h in resumed.history]
    again = fit(model_for("CC,CM,CM,CM", "tiny", textures, recipe), textures, recipe, tmp_path / "b", quiet=True,
                resume=True)
    assert again.test == resumed.test  # a finished run is read back, not retrained


def test_divergence_is_a_status_not_an_exception(tmp_path, textures) -> None:
    recipe = get_recipe("fast", {"epochs": 2, "warmup_epochs": 0, "lr": 1e30, "clip_grad": None})
    result = fit(model_for("CC,CC,CC,CC", "tiny", textures, recipe), textures, recipe, tmp_path / "d", quiet=True)
    assert result.status == "diverged" and "training loss became" in result.error
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["status"] == "diverged"


def _cli(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (sys.executable, "-m", "alternas")):
    full_env = {**os.environ, "ALTERNAS_OFFLINE": "1", **(env or {})}
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=600, env=full_env)


def test_data_parallel_with_two_cpu_processes(tmp_path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "alternas"]
    res = _cli("train", "--placement", "CC,CM,CM,CM", "--base", "tiny", "--data", "shapes", "--subset", "800",
               "--epochs", "1", "--quiet", "--out", str(tmp_path / "ddp"), prefix=tuple(torchrun))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("completed:") == 1  # only rank 0 reports and writes
    saved = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert saved["status"] == "completed" and len(saved["history"]) == 2
    # each rank trains on half of the 720 training images; the logged rate counts both ranks' images
    assert saved["result"]["epochs_completed"] == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--data", "emnist"], "unknown dataset 'emnist'"),
        (["--data", "cifar100"], "put the extracted 'cifar-100-python/' folder"),
        (["--set", "lr_warm=3"], "unknown recipe key 'lr_warm'"),
        (["--recipe", "slow"], "unknown recipe 'slow'"),
        (["--set", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_train_cli_errors(tmp_path, args: list[str], fragment: str) -> None:
    res = run_cli("train", "--placement", "CC,CM,CM,CM", "--base", "tiny", "--data-root", str(tmp_path), "--out",
                  str(tmp_path / "run"), *args, env={"ALTERNAS_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2


def test_train_cli_reads_a_recipe_file_and_refuses_one_that_is_not_a_mapping(tmp_path) -> None:
    (tmp_path / "recipe.yaml").write_text("epochs: 1\nwarmup_epochs: 0\nbatch_size: 32\n")
    (tmp_path / "list.yaml").write_text("- epochs\n")
    common = ["train", "--placement", "CC,CC,CC,CC", "--base", "tiny", "--subset", "96", "--quiet"]
    res = run_cli(*common, "--recipe-file", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["recipe"]["epochs"] == 1 and saved["recipe"]["batch_size"] == 32
    assert saved["data_config"]["subset"] == 96
    bad = run_cli(*common, "--recipe-file", str(tmp_path / "list.yaml"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "list.yaml: expected a mapping of recipe keys" in bad.stderr
