"""Image folders on disk: streamed (decoded per sample by DataLoader workers) or decoded into memory, chosen by
size; the same evaluation crop either way; training, resuming and diagnosing on streamed data; a memory cap the
in-memory path cannot meet."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from alternas.data import DataConfig, load_data
from alternas.data.augment import eval_batches, make_train_batches
from alternas.data.datasets import ImageData, ImageFiles
from alternas.errors import DataError
from alternas.search import study_from_dict
from alternas.search.evaluator import candidate_key
from alternas.train import fit, get_recipe
from alternas.train.run import model_for
from tests.helpers import interrupt_after_first_epoch, run_cli, small_study, write_imagefolder


def _batches(data, split, **kwargs) -> torch.Tensor:
    return torch.cat([x for x, _ in eval_batches(data, split, 5, "cpu", **kwargs)])


def test_streamed_evaluation_is_the_in_memory_crop_bit_for_bit(tmp_path) -> None:
    write_imagefolder(tmp_path / "ds", per_class=8, size=(40, 56))
    cfg = {"name": f"imagefolder:{tmp_path / 'ds'}", "image_size": 32, "val_fraction": 0.25}
    in_memory = load_data(DataConfig(**cfg, stream="never"))
    streamed = load_data(DataConfig(**cfg, stream="always"))
    assert isinstance(in_memory.train, ImageData) and not in_memory.streamed
    assert isinstance(streamed.train, ImageFiles) and streamed.streamed and "streamed from disk" in streamed.summary()
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(in_memory, split).labels, getattr(streamed, split).labels)
    for split in ("val", "test"):  # the same split, the same crop: identical inputs, in-process or from workers
        assert torch.equal(_batches(in_memory, getattr(in_memory, split)),
                           _batches(streamed, getattr(streamed, split), workers=2))
    assert torch.equal(streamed.val.load().images, in_memory.val.images)
    # the training images keep their whole centre square (crop_pct 1): what the recipe's crops cut from
    assert torch.equal(streamed.train.load(crop_pct=1.0).images, in_memory.train.images)
    recorded = streamed.val.digest()
    assert recorded == load_data(DataConfig(**cfg, stream="always")).val.digest()
    Image.new("RGB", (40, 56)).save(streamed.val.paths[0], compress_level=0)  # the same name, other content
    assert streamed.val.digest() != recorded


def test_evaluation_resizes_the_shorter_side_then_centre_crops(tmp_path) -> None:
    """crop_pct 0.875 at 56 px: resize to 64, keep the centre 56 — a 4-pixel frame is cut off (224/256 alike)."""
    for split in ("train", "val"):
        (tmp_path / "ds" / split / "a").mkdir(parents=True)
        arr = np.zeros((64, 96, 3), np.uint8)
        arr[..., 2] = 255
        arr[:4], arr[-4:], arr[:, :20], arr[:, -20:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
        Image.fromarray(arr).save(tmp_path / "ds" / split / "a" / "x.png")
    cfg = {"name": f"imagefolder:{tmp_path / 'ds'}", "image_size": 56, "val_fraction": 0.0}
    cropped = load_data(DataConfig(**cfg)).test.images[0].int()
    assert cropped.shape == (3, 56, 56)
    assert (cropped[0] < 30).all() and (cropped[2] > 225).all()  # no frame left: all blue
    whole = load_data(DataConfig(**cfg, crop_pct=1.0)).test.images[0].int()
    assert (whole[0, :2] > 200).all() and (whole[0, 28, 28] < 30)  # resized to 56: the frame is in


def test_auto_streams_above_the_budget_and_the_cache_key_says_so(tmp_path) -> None:
    write_imagefolder(tmp_path / "ds", per_class=4)
    name = f"imagefolder:{tmp_path / 'ds'}"
    # 12 train + 12 test images at 32 px: 73,728 bytes decoded
    assert not DataConfig(name).streams()
    assert DataConfig(name, max_in_memory_gb=73_728 / 2**30 * 0.99).streams()
    assert not DataConfig(name, max_in_memory_gb=73_728 / 2**30 * 1.01).streams()
    assert not DataConfig(name, subset=6, max_in_memory_gb=73_728 / 2**30 * 0.99).streams()  # only the subset
    assert load_data(DataConfig(name, max_in_memory_gb=1e-6)).streamed

    def key(**data) -> str:
        config = study_from_dict(small_study(tmp_path, data={"name": name, **data}), "test")
        return candidate_key(config.buildup.start or "CC,CC,CC,CC", config, config.recipe, 0)

    assert key() == key(stream="never") == key(max_in_memory_gb=100)  # in memory either way: one experiment
    assert key(stream="always") == key(max_in_memory_gb=1e-6) != key()
    assert key(crop_pct=1.0) != key() == key(crop_pct=0.875)
    shapes = study_from_dict(small_study(tmp_path), "test")
    assert candidate_key("CC,CC,CC,CC", shapes, shapes.recipe, 0) == candidate_key(
        "CC,CC,CC,CC", study_from_dict(small_study(tmp_path, data={"stream": "never"}), "test"), shapes.recipe, 0)

    for bad, fragment in [({"stream": "always"}, "needs a dataset of image files (imagefolder:PATH, torch/flowers102"),
                          ({"stream": "sometimes"}, "data.stream must be"),
                          ({"crop_pct": 1.5}, "data.crop_pct must be in (0, 1]"),
                          ({"max_in_memory_gb": 0}, "max_in_memory_gb must be > 0")]:
        with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            DataConfig("shapes", **bad)


def test_a_streamed_folder_trains_and_resumes_bit_identically(tmp_path) -> None:
    write_imagefolder(tmp_path / "ds", per_class=8, size=(44, 36), ext="jpg")
    data = load_data(DataConfig(f"imagefolder:{tmp_path / 'ds'}", image_size=32, val_fraction=0.25, stream="always"))
    recipe = get_recipe("fast", {"epochs": 2, "warmup_epochs": 1, "batch_size": 6, "workers": 2})
    batches = make_train_batches(data, recipe, torch.device("cpu"), 0, 0, 1)
    x, y = next(iter(batches))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and len(batches) == 3

    straight = fit(model_for("CC,CM,CM,CM", "tiny", data, recipe), data, recipe, tmp_path / "a", quiet=True)
    assert straight.status == "completed" and np.isfinite(straight.val["nll"]) and "acc" in straight.test

    with pytest.raises(KeyboardInterrupt):
        fit(model_for("CC,CM,CM,CM", "tiny", data, recipe), data, recipe, tmp_path / "b", quiet=True,
            epoch_callback=interrupt_after_first_epoch)
    resumed = fit(model_for("CC,CM,CM,CM", "tiny", data, recipe), data, recipe, tmp_path / "b", quiet=True,
                  resume=True)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the workers' augmentations replayed from the checkpoint
    assert [h["val_acc"] for h in straight.history] == [h["val_acc"] for h in resumed.history]


def test_cli_trains_and_diagnoses_a_streamed_run_and_names_a_bad_image(tmp_path) -> None:
    write_imagefolder(tmp_path / "ds", per_class=6, size=(40, 40), ext="jpg")
    run = tmp_path / "run"
    args = ["train", "--placement", "CC,CM,CM,CM", "--base", "tiny", "--data", f"imagefolder:{tmp_path / 'ds'}",
            "--stream", "always", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.5",
            "--set", "workers=2", "--quiet"]
    res = run_cli(*args, "--out", str(run))
    assert res.returncode == 0, res.stderr
    saved = __import__("yaml").safe_load((run / "config.yaml").read_text())["data_config"]
    assert saved["stream"] == "always" and saved["image_size"] == 32
    diag = run_cli("diagnose", str(run), "--fourier", "--json")
    assert diag.returncode == 0, diag.stderr
    assert set(json.loads(diag.stdout)["delta_high"]) == {"c1", "c2", "c3", "c4"}
    assert json.loads((run / "diagnostics" / "diagnostics.json").read_text())["fourier"]["images"] == 9

    (tmp_path / "ds" / "train" / "class_1" / "img_0.jpg").write_bytes(b"not a jpeg")
    bad = run_cli(*args, "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2, bad.stderr
    assert "cannot read image" in bad.stderr and "img_0.jpg" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr

    (run / "config.yaml").write_text("")
    empty = run_cli("diagnose", str(run))
    assert empty.returncode == 2 and "damaged (not a mapping)" in empty.stderr


_CAPPED = textwrap.dedent("""
    import resource, sys
    import torch
    from alternas.data import DataConfig, load_data
    from alternas.data.augment import eval_batches, make_train_batches
    from alternas.errors import DataError
    from alternas.train import get_recipe

    folder, stream, headroom_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize")][0]
    cap = size + headroom_mb * 2**20  # address space: what is mapped now (torch, timm) plus the headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        data = load_data(DataConfig("imagefolder:" + folder, image_size=512, val_fraction=0.1, stream=stream,
                                    max_in_memory_gb=0.1))
    except DataError as err:
        print("DataError:", err)
        sys.exit(3)
    recipe = get_recipe("fast", {"batch_size": 8, "workers": 2})
    seen = sum(len(y) for _, y in make_train_batches(data, recipe, torch.device("cpu"), 0, 0, 1))
    seen += sum(len(y) for _, y in eval_batches(data, data.test, 8, "cpu", workers=2))
    print(data.summary(), "|", seen)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_folder_larger_than_the_memory_cap_streams_where_decoding_it_fails(tmp_path) -> None:
    """960 small JPEGs evaluated at 512 px: 0.70 GiB to decode into memory, with 0.47 GiB of address space to spare.

    Under RLIMIT_AS every DataLoader worker is capped too: its address space is the parent's (forked) plus its
    decoded samples, the shared-memory batch it fills, and glibc's heap, which with the default dynamic mmap
    threshold kept growing from freed 3 MiB samples (a worker's peak over the parent's start: 0.14 to 0.40 GiB
    between identical runs; the earlier 0.23 GiB headroom failed in a worker now and then). A fixed threshold
    returns large buffers at once (0.15-0.20 GiB, both measured with 2 workers, batch 8 at 512 px); small source
    images upscaled to 512 px keep the set large to decode and quick to read."""
    write_imagefolder(tmp_path / "big", classes=2, per_class=450, val_per_class=30, size=(64, 64), ext="jpg")
    script = tmp_path / "capped.py"
    script.write_text(_CAPPED)
    # what glibc maps beside the data: thread stacks and malloc arenas (few threads, two arenas), and a heap that
    # grows when freed 3 MiB samples move its dynamic mmap threshold up (a fixed threshold returns them at once)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(2**20)}

    def run(stream: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(tmp_path / "big"), stream, "480"], env=env,
                              capture_output=True, text=True, timeout=300)

    never = run("never")  # 810 training images x 3 x 512 x 512 = 0.59 GiB, allocated before decoding: fails
    assert never.returncode == 3, never.stdout + never.stderr
    assert "GiB in memory, more than this process can allocate" in never.stdout
    auto = run("auto")  # 0.70 GiB > max_in_memory_gb 0.1: streamed
    assert auto.returncode == 0, auto.stdout + auto.stderr
    # 808 training images (full batches of 8) + 60 test
    assert "streamed from disk" in auto.stdout and auto.stdout.strip().endswith("| 868")


def test_the_streaming_benchmark_times_both_paths_on_one_generated_folder() -> None:
    from alternas.bench import SPEED_BENCHMARKS, describe
    from alternas.bench.speed import streaming_epoch_time
    from alternas.cli import BENCHMARKS

    assert set(BENCHMARKS) == set(SPEED_BENCHMARKS)  # the CLI's choices are the library's benchmarks
    r = streaming_epoch_time(rounds=1, images=80, size=32, batch=16, device="cpu")
    assert r["images"] == 72 and set(r["epoch_s"]) == {"in_memory", "streamed"}  # 80 minus the 10 % val split
    assert r["slowdown"] == pytest.approx(r["epoch_s"]["streamed"] / r["epoch_s"]["in_memory"])
    assert all(t > 0 for t in [*r["epoch_s"].values(), *r["pipeline_s"].values(), r["decode_into_memory_s"]])
    assert describe("streaming", r).startswith("streaming: tiny base, image folder of 72 JPEGs at 32 px")
    with pytest.raises(Exception, match="no benchmark named 'nope'"):
        describe("nope", r)
