"""What a person reads: a log redirected to a file holds lines, not progress-bar redraws, and no PyTorch warning about
more DataLoader workers than CPUs."""

import subprocess
import sys
import warnings

from alternas.data import load_data
from alternas.data.augment import build_train_transform
from alternas.data.loader import pil_loader, usable_cpus
from alternas.train import get_recipe


def test_a_log_file_gets_epoch_lines_without_progress_bars_or_worker_warnings(tmp_path) -> None:
    """The paper recipe's per-sample pipeline asks for 64 DataLoader workers on this machine (real process, output
    to a file as `> log 2>&1` makes it)."""
    log = tmp_path / "log"
    with open(log, "w") as out:
        res = subprocess.run([sys.executable, "-m", "alternas", "train", "--placement", "CC,CC,CC,CC", "--base", "tiny",
                              "--subset", "160", "--recipe", "paper", "--epochs", "2", "--set", "warmup_epochs=0",
                              "--set", "workers=64", "--batch-size", "32", "--out", str(tmp_path / "run")],
                             stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert res.returncode == 0, text
    assert "\r" not in text, "progress-bar redraws in a log file"
    assert [line.split()[0:2] for line in text.splitlines() if line.startswith("epoch ")] == [["epoch", "1/2"],
                                                                                          ["epoch", "2/2"]]
    assert "worker" not in text.lower(), text


def test_dataloader_workers_are_capped_by_the_usable_cpus() -> None:
    data = load_data("shapes")
    recipe = get_recipe("paper", {"batch_size": 16, "workers": 64})
    loader = pil_loader(data.val, build_train_transform(recipe, data), 16, shuffle=True, workers=64, seed=0)
    assert loader.num_workers == min(64, usable_cpus()) >= 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*worker")  # PyTorch's "will create N worker processes ..."
        x, y = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and len(y) == 16
    assert pil_loader(data.val, build_train_transform(recipe, data), 16, shuffle=False, workers=0,
                      seed=0).num_workers == 0
