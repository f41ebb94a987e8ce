import numpy as np
import pytest
import torch

from alternas.data import DataConfig, load_data
from alternas.data.loader import TensorLoader, random_crop_flip
from alternas.data.synthetic import generate
from alternas.errors import DataError
from tests.helpers import write_cifar, write_imagefolder


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_python_pickle_layout(tmp_path, name: str) -> None:
    labels = write_cifar(tmp_path, name, n_train=60, n_test=20)
    data = load_data(DataConfig(name, root=str(tmp_path), val_fraction=0.0))
    assert data.num_classes == (10 if name == "cifar10" else 100)
    assert data.train.images.shape == (60, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert len(data.test) == 20
    assert sorted(data.train.labels.tolist()) == sorted(labels.tolist())
    assert data.class_names[:2] == ["class0", "class1"]


def test_cifar_extracts_a_tarball_and_uses_the_env_root(tmp_path, monkeypatch) -> None:
    write_cifar(tmp_path, "cifar10", tarball=True)
    monkeypatch.setenv("ALTERNAS_DATA", str(tmp_path))
    monkeypatch.setenv("ALTERNAS_OFFLINE", "1")
    data = load_data(DataConfig("cifar10", val_fraction=0.0))
    assert len(data.train) == 60


def test_missing_cifar_offline_says_where_to_put_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ALTERNAS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"put the extracted 'cifar-100-python/' folder .* in " + str(tmp_path)):
        load_data(DataConfig("cifar100", root=str(tmp_path)))


def test_imagefolder_reads_pngs_resized(tmp_path) -> None:
    write_imagefolder(tmp_path / "ds")
    data = load_data(DataConfig(f"imagefolder:{tmp_path / 'ds'}", image_size=32, val_fraction=0.25))
    assert data.num_classes == 3 and data.class_names == ["class_0", "class_1", "class_2"]
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert len(data.train) + len(data.val) == 12 and len(data.test) == 12
    assert len(data.val) == 3 and sorted(data.val.labels.tolist()) == [0, 1, 2]  # class-balanced
    brightness = [data.test.images[data.test.labels == c].float().mean().item() for c in range(3)]
    assert brightness == sorted(brightness)  # class c was drawn brighter than c-1


def test_imagefolder_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(f"imagefolder:{tmp_path / 'nope'}"))
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="needs 'val/'"):
        load_data(DataConfig(f"imagefolder:{tmp_path / 'ds'}"))


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'emnist'; choose .*fashion-mnist"):
        load_data(DataConfig("emnist"))


def test_builtin_generator_is_deterministic_by_seed() -> None:
    a, la = generate("shapes", 50, seed=3)
    b, lb = generate("shapes", 50, seed=3)
    c, _ = generate("shapes", 50, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (50, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.bincount(la, minlength=10).tolist() == [5] * 10


def test_a_builtin_set_is_generated_once_per_process_and_each_load_gets_its_own_copy() -> None:
    from alternas.data.datasets import BUILTIN_SEEDS, BUILTIN_SIZES, _generated

    config = DataConfig("textures", val_fraction=0.0)  # no subset, no split: the splits are the generated sets
    first = load_data(config)
    misses = _generated.cache_info().misses
    first.train.images.zero_()  # whatever a caller does to its tensors
    first.test.labels.fill_(0)
    second = load_data(config)
    assert _generated.cache_info().misses == misses  # not generated again
    images, labels = generate("textures", BUILTIN_SIZES["train"], seed=BUILTIN_SEEDS["train"])
    assert torch.equal(second.train.images, images) and torch.equal(second.train.labels, labels)
    assert torch.equal(second.test.labels, generate("textures", BUILTIN_SIZES["test"], seed=BUILTIN_SEEDS["test"])[1])


def _power_below(components: torch.Tensor, cutoff: float) -> float:
    """Share of spectral power at radial frequency < cutoff (in units of π rad/px), mean removed."""
    c = components - components.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(c).abs() ** 2
    f = torch.fft.fftfreq(c.shape[-1]) * 2
    radius = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2)
    return float(power[..., radius < cutoff].sum() / power.sum())


@pytest.mark.parametrize("kind", ["shapes", "textures"])
def test_builtin_components_sit_in_their_bands(kind: str) -> None:
    _, _, low, high = generate(kind, 200, seed=0, return_components=True)
    assert _power_below(low, 0.4) > 0.95  # the shape component is low-pass
    assert _power_below(high, 0.5) < 0.05  # the grating component is high-pass


def _band_features(images: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Translation-invariant features: log amplitude of the Hann-windowed spectrum in the band [lo, hi) x π."""
    hann = torch.hann_window(images.shape[-1], periodic=False)
    window = hann.view(-1, 1) * hann.view(1, -1)
    f = torch.fft.fftfreq(images.shape[-1]) * 2
    radius = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2)
    centred = images - images.mean(dim=(-2, -1), keepdim=True)
    spectrum = torch.fft.fft2(centred * window) * ((radius >= lo) & (radius < hi))
    return spectrum.abs().mean(1).log1p().flatten(1)


def _nearest_centroid_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    train, test = slice(0, 600), slice(600, None)
    centroids = torch.stack([features[train][labels[train] == k].mean(0) for k in range(10)])
    return (torch.cdist(features[test], centroids).argmin(1) == labels[test]).float().mean().item()


@pytest.mark.parametrize(("kind", "carrier"), [("shapes", "low"), ("textures", "high")])
def test_builtin_label_lives_in_one_frequency_band(kind: str, carrier: str) -> None:
    images, labels = generate(kind, 1000, seed=1)
    x = images.float() / 255
    accuracy = {"low": _nearest_centroid_accuracy(_band_features(x, 0.0, 0.35), labels),
                "high": _nearest_centroid_accuracy(_band_features(x, 0.5, 9.0), labels)}
    other = "high" if carrier == "low" else "low"
    assert accuracy[carrier] > 0.9, accuracy
    assert accuracy[other] < 0.2, accuracy  # chance is 0.1


def test_a_mirror_turns_a_texture_into_its_mirrored_class() -> None:
    """Why textures forbids flips: nearest-centroid on translation-invariant band features puts mirrored test
    images in the class of the mirrored orientation (36° <-> 144°, 72° <-> 108°), and keeps the unmirrored."""
    images, labels = generate("textures", 1000, seed=1)
    x = images.float() / 255
    train, test = slice(0, 600), slice(600, None)
    features = _band_features(torch.cat([x, x[test].flip(-1)]), 0.5, 9.0)
    centroids = torch.stack([features[train][labels[train] == k].mean(0) for k in range(10)])
    mirrored_class = torch.tensor([0, 4, 3, 2, 1, 5, 9, 8, 7, 6])  # TEXTURE_CLASSES: angle index 0, 36, .., 144
    predicted = torch.cdist(features[1000:], centroids).argmin(1)
    assert (predicted == mirrored_class[labels[test]]).float().mean() > 0.9
    moved = mirrored_class[labels[test]] != labels[test]
    assert (predicted[moved] == labels[test][moved]).float().mean() < 0.1
    assert load_data(DataConfig("textures", subset=100)).label_breaking == ("hflip", "rotate", "shear")
    assert load_data(DataConfig("shapes", subset=100)).label_breaking == ()
    with pytest.raises(DataError, match="data.label_breaking: unknown augmentation 'vflip'"):
        DataConfig("shapes", label_breaking=["vflip"])


def test_subset_and_validation_split_are_balanced_seeded_and_disjoint() -> None:
    a = load_data(DataConfig("shapes", subset=500, val_fraction=0.2, seed=1))
    b = load_data(DataConfig("shapes", subset=500, val_fraction=0.2, seed=1))
    c = load_data(DataConfig("shapes", subset=0.1, val_fraction=0.2, seed=2))
    assert len(a.train) == 400 and len(a.val) == 100 and len(c.train) + len(c.val) == 600
    assert torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [10] * 10
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in a.val.images)
    with pytest.raises(DataError, match="subset must be"):
        load_data(DataConfig("shapes", subset=-1))


def test_random_crop_flip_matches_the_per_sample_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    assert torch.equal(random_crop_flip(x, 0, False, gen), x)
    out = random_crop_flip(x, 2, True, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every output is some 6x6 window of the padded image, maybe flipped
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_tensor_loader_normalises_and_replays_from_its_state() -> None:
    data = load_data(DataConfig("shapes", subset=300))
    loader = TensorLoader(data.train, 64, mean=data.mean, std=data.std, shuffle=True, crop_padding=4, flip=True)
    state = loader.state_dict()
    first = [x for x, _ in loader]
    loader.load_state_dict(state)
    again = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(first) == len(loader) == 5
    x = torch.cat(first)
    assert abs(x.mean().item()) < 1.5 and x.dtype == torch.float32
    sharded = TensorLoader(data.train, 64, mean=data.mean, std=data.std, rank=1, world=2)
    assert sum(len(y) for _, y in sharded) == 135
    assert np.isclose(len(data.train) / 2, 135)


def test_cued_shapes_two_objects_two_colours_and_the_colour_says_nothing_alone() -> None:
    """The probe's layout: every image holds exactly two of the cue colours (the answer's shape and the cue share one,
    the other shape has the other), colour alone carries no label, and the generator is seeded and balanced."""
    from alternas.data.synthetic import CUE_COLOURS, cued_component

    a, la = generate("cued-shapes", 300, seed=3)
    b, lb = generate("cued-shapes", 300, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, generate("cued-shapes", 300, seed=4)[0])
    assert torch.bincount(la, minlength=10).tolist() == [30] * 10
    labels = torch.arange(400) % 10
    clean = cued_component(labels, torch.Generator().manual_seed(0))
    near = ((clean.unsqueeze(1) - CUE_COLOURS.view(1, -1, 3, 1, 1)).abs().amax(2) < 0.25).flatten(2).sum(-1)
    present = near >= 4  # (N, colours): pixels painted in that colour
    assert (present.sum(1) == 2).all()
    histogram = present.float()
    train, test = slice(0, 300), slice(300, None)
    centroids = torch.stack([histogram[train][labels[train] == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(histogram[test], centroids).argmin(1) == labels[test]).float().mean().item()
    assert accuracy < 0.25  # chance is 0.1: which colours appear is independent of the label


def _squares(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(present, brightness, hue) of each of the 16 cells of `brightest` images, read off the pixels: a square is
    the cell's pixels whose brightest channel stands above the dark background."""
    from alternas.data.synthetic import HUES

    n = len(images)
    cells = (images.float() / 255).view(n, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, 3, 64)
    peak = cells.amax(2)
    inside = peak > 0.2
    assert set(inside.sum(-1).unique().tolist()) <= {0, 36}  # whole 6 x 6 squares, each inside its own cell
    present = inside.sum(-1) == 36
    brightness = torch.where(inside, peak, torch.nan).nanmedian(-1).values.nan_to_num(0.0)
    rgb = torch.where(inside.unsqueeze(2), cells, torch.nan).nanmean(-1).nan_to_num(0.0)
    table = torch.nn.functional.normalize(torch.tensor(list(HUES.values())), dim=-1)
    hue = (torch.nn.functional.normalize(rgb, dim=-1) @ table.T).argmax(-1)
    return present, brightness, hue


def test_brightest_is_the_hue_of_the_brightest_square_and_an_average_of_evidence_cannot_tell() -> None:
    """The probe's rule, read off the pixels: eight squares per image, the label is the hue of the brightest.
    Adding up per-square evidence by hue, what a Conv stack followed by an average pool does, is right only when
    the evidence grows about exponentially with brightness: counting or summing brightness is right on about half
    the images, exp(5·b) barely more, and only exp(40·b), a softmax's sharpness, is always right."""
    images, labels = generate("brightest", 2000, seed=3)
    assert torch.equal(images, generate("brightest", 2000, seed=3)[0])
    assert not torch.equal(images, generate("brightest", 2000, seed=4)[0])
    assert torch.bincount(labels).tolist() == [500] * 4 and images.shape == (2000, 3, 32, 32)
    present, brightness, hue = _squares(images)
    assert (present.sum(1) == 8).all()
    brightest = torch.where(present, brightness, -1.0).argmax(1, keepdim=True)
    assert (hue.gather(1, brightest).squeeze(1) == labels).all()

    def summed(evidence: torch.Tensor) -> float:
        by_hue = torch.zeros(len(labels), 4).scatter_add_(1, hue, torch.where(present, evidence, 0.0))
        return (by_hue.argmax(1) == labels).float().mean().item()

    assert summed(torch.ones_like(brightness)) < 0.5 and summed(brightness) < 0.6  # counting, summing
    assert summed(torch.exp(5 * brightness)) < 0.65 and 0.6 < summed(torch.exp(10 * brightness)) < 0.8
    assert 0.9 < summed(torch.exp(20 * brightness)) < 0.99 and summed(torch.exp(40 * brightness)) > 0.99
    # the brightest's level is drawn per image, whatever the label: no fixed threshold finds it
    level = brightness.gather(1, brightest).squeeze(1)
    assert level.min() < 0.5 and level.max() > 0.9
    assert all(abs(level[labels == k].mean() - level.mean()) < 0.03 for k in range(4))
    for threshold in torch.arange(0.3, 0.95, 0.05):
        assert summed((brightness > threshold).float() + 1e-3 * brightness) < 0.8
