"""Robustness on corrupted images: the released CIFAR-C format (files written here in it) and the generated set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alternas.data.datasets import DataConfig, load_data
from alternas.diagnostics.corruptions import (
    _GENERATED,
    CORRUPTIONS,
    GENERATED,
    generated_corruptions,
    released_corruptions,
)
from alternas.diagnostics.run import DiagnosticsConfig, diagnose
from alternas.errors import ConfigError, DataError
from alternas.models import build_model
from alternas.train.recipe import get_recipe
from tests.helpers import write_cifar


def write_cifar_c(root, per_severity: int = 40) -> np.ndarray:
    """CIFAR-10-C's layout: one (5 x N, 32, 32, 3) uint8 .npy per corruption, severities stacked in order, and
    labels.npy. Each image's pixels hold 40 x severity + its index within the block (mod 40), to check the rows."""
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    labels = np.tile(np.arange(per_severity) % 10, 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    rows = np.arange(5 * per_severity)
    value = (40 * (rows // per_severity + 1) + rows % per_severity % 40).astype(np.uint8)
    stack = np.broadcast_to(value[:, None, None, None], (len(rows), 32, 32, 3)).copy()
    for name in CORRUPTIONS:
        np.save(folder / f"{name}.npy", stack)
    return labels


def test_the_released_files_give_the_same_seeded_test_images_at_every_severity(tmp_path) -> None:
    labels = write_cifar_c(tmp_path)
    got = released_corruptions("cifar10", tmp_path, 12, (1, 3, 5), seed=4)
    assert got.source == "released CIFAR-10-C" and got.corruptions == list(CORRUPTIONS) and got.severities == [1, 3, 5]
    index = got.images["fog", 1][:, 0, 0, 0].long() - 40  # which test image each row is
    assert len(index) == 12 and len(set(index.tolist())) == 12
    for severity in (1, 3, 5):
        assert torch.equal(got.images["snow", severity][:, 0, 0, 0].long() - 40 * severity, index)
    assert torch.equal(got.labels, torch.from_numpy(labels[index.numpy()].astype(np.int64)))
    assert released_corruptions("cifar10", tmp_path, 12, (1,), seed=4).labels.tolist() == got.labels.tolist()
    assert released_corruptions("cifar100", tmp_path, 12, (1,), seed=4) is None  # no CIFAR-100-C here
    (tmp_path / "CIFAR-10-C" / "zoom_blur.npy").unlink()
    with pytest.raises(DataError, match=r"has labels.npy but no zoom_blur.npy"):
        released_corruptions("cifar10", tmp_path, 12, (1,), seed=4)


def test_generated_corruptions_are_seeded_and_grow_with_severity() -> None:
    data = load_data(DataConfig("shapes", subset=200, val_fraction=0.3))
    images = data.val.take(torch.arange(40))
    a = generated_corruptions(images, (1, 5), seed=0)
    assert a.corruptions == list(GENERATED) and "frost" not in GENERATED and "fog" not in GENERATED
    assert a.source.startswith("generated (albumentations ")
    _GENERATED.clear()  # generated again, not answered from the per-process cache
    again = generated_corruptions(images.take(torch.arange(40)), (1, 5), seed=0)
    assert all(torch.equal(a.images[k], again.images[k]) for k in a.images)
    other = generated_corruptions(images, (1, 5), seed=1)
    assert not torch.equal(a.images["gaussian_noise", 1], other.images["gaussian_noise", 1])
    clean = images.images.float()
    for name in GENERATED:
        change = [float((a.images[name, s].float() - clean).abs().mean()) for s in (1, 5)]
        assert 0 < change[0] < change[1], (name, change)


def test_diagnose_scores_robustness_from_the_source_the_data_root_holds(tmp_path) -> None:
    write_cifar(tmp_path, "cifar10", n_train=120, n_test=40)
    model = build_model("CC,CC,CC,CM", base="tiny", num_classes=10, image_size=32)
    config = DiagnosticsConfig(hessian=False, fourier=False, corruptions=True, corruption_images=16,
                               severities=(2, 4))
    data = load_data(DataConfig("cifar10", root=str(tmp_path), val_fraction=0.25))
    generated = diagnose(model, data, get_recipe("fast"), config)["corruptions"]
    assert generated["source"].startswith("generated") and generated["images"] == 16
    assert set(generated["per_corruption"]) == set(GENERATED) and generated["severities"] == [2, 4]
    write_cifar_c(tmp_path)
    released = diagnose(model, data, get_recipe("fast"), config)["corruptions"]
    assert released["source"] == "released CIFAR-10-C" and set(released["per_corruption"]) == set(CORRUPTIONS)
    for result in (generated, released):
        means = [np.mean(list(v.values())) for v in result["accuracy"].values()]
        assert result["robustness"] == pytest.approx(np.mean(means)) and 0 <= result["robustness"] <= 100


@pytest.mark.parametrize("values, fragment", [({"severities": [0, 3]}, "distinct severities 1-5"),
                                              ({"severities": [2, 2]}, "distinct severities 1-5"),
                                              ({"corruption_images": 0}, "corruption_images must be >= 1")])
def test_bad_corruption_settings_are_one_line(values, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        DiagnosticsConfig(**values)


def test_a_search_resumed_with_corruptions_on_measures_its_finished_runs_again_without_retraining(tmp_path) -> None:
    """The build-up reads finished evaluations from its storage; turning a diagnostic on must still reach them, or
    the report and claims would mix runs measured two ways."""
    import pandas as pd
    import yaml

    from tests.helpers import run_cli, small_study

    raw = small_study(tmp_path, seeds=[0, 1], diagnostics={"hessian": False},
                      buildup={"max_candidates": 2, "min_seeds": 2})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli("buildup", "--study", str(path), "--quiet").returncode == 0
    before = pd.read_csv(tmp_path / "study" / "results.csv")
    assert before["robustness"].isna().all() and len(before) == 4
    raw["diagnostics"].update(corruptions=True, corruption_images=16, severities=[2])
    path.write_text(yaml.safe_dump(raw))
    res = run_cli("buildup", "--study", str(path), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "measured the diagnostics of 4 finished run(s) again" in res.stdout + res.stderr
    assert "0 candidate-epochs trained by this worker" in res.stdout + res.stderr
    after = pd.read_csv(tmp_path / "study" / "results.csv")
    assert after["robustness"].between(0, 100).all() and len(after) == 4
    assert after.set_index("key")["val_acc"].equals(before.set_index("key")["val_acc"])  # the same runs


def test_runs_scored_on_generated_corruptions_are_scored_again_once_the_release_is_there(tmp_path) -> None:
    """The source is part of what a score means: after CIFAR-10-C lands beside the data, a resumed search scores its
    finished runs on the released files, so no study mixes the two."""
    import pandas as pd
    import yaml

    from tests.helpers import run_cli, small_study

    write_cifar(tmp_path / "data", "cifar10", n_train=200, n_test=40)
    raw = small_study(tmp_path, diagnostics={"hessian": False, "fourier": False, "corruptions": True,
                                             "corruption_images": 16, "severities": [1]},
                      data={"name": "cifar10", "root": str(tmp_path / "data"), "subset": None, "val_fraction": 0.3},
                      buildup={"max_candidates": 2})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli("buildup", "--study", str(path), "--quiet").returncode == 0
    before = pd.read_csv(tmp_path / "study" / "results.csv")
    assert before["robustness_source"].str.startswith("generated").all()
    write_cifar_c(tmp_path / "data")
    res = run_cli("buildup", "--study", str(path), "--quiet")
    assert res.returncode == 0 and f"measured the diagnostics of {len(before)} finished run(s) again" in res.stdout
    after = pd.read_csv(tmp_path / "study" / "results.csv")
    assert (after["robustness_source"] == "released CIFAR-10-C").all() and len(after) == len(before)
