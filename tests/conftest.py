"""Shared fixtures: tiny, deterministic CIFAR-like data in every source format, a finished
training run, and the helpers several test files use (as fixtures: tests import nothing
from here)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.data import write_image_folder  # noqa: E402

SHARED_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The common flags of a short, exact CPU run on the tiny data. Peak lr and cutout are fixed so that
# these runs, and the tolerances measured on them, do not move with the recipe's defaults.
TRAIN_FLAGS = ["--epochs", "2", "--batch-size", "20", "--lr", "0.04", "--cutout", "8", "--crop-pad", "4"]
TRAIN_FLAGS += ["--precision", "32-true", "--accelerator", "cpu"]

# Denormals made CPU steps ~50x slower once an easy batch's loss collapsed.
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Decoded-data cache in a temp folder: tests never touch the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield


def easy_images(n_per_class: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,32,32,3) uint8 images whose class shows in their colour, plus noise; labels."""
    palette = np.random.default_rng(0).integers(30, 226, size=(n_classes, 3))  # same for all splits
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            noise = rng.integers(-30, 31, size=(32, 32, 3))
            images.append(np.clip(palette[c] + noise, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


def write_pickle_root(
    root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]
) -> Path:
    """The documented cifar-10-batches-py layout, in ImageFolder order (by class, then file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes]}, f)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(labels, kind="stable")  # image-folder order
        data = images[order].transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels[order].tolist()}, f)

    train_images, train_labels = splits["train"]
    half = len(train_images) // 2
    dump("data_batch_1", train_images[:half], train_labels[:half])
    dump("data_batch_2", train_images[half:], train_labels[half:])
    dump("test_batch", *splits["test"])
    return root


# --- values and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def root() -> Path:
    """The project's root folder, where the scripts are."""
    return ROOT


@pytest.fixture(scope="session")
def classes() -> list[str]:
    return list(CLASSES)


@pytest.fixture(scope="session")
def train_flags() -> list[str]:
    """The common flags of a short, exact CPU run on the tiny data."""
    return list(TRAIN_FLAGS)


@pytest.fixture(scope="session")
def shared_tarball() -> Path:
    """The real CIFAR-10 (JPEG copy) where this checkout has ../shared beside it."""
    if not SHARED_TARBALL.exists():
        pytest.skip("shared CIFAR-10 JPEG tarball not here")
    return SHARED_TARBALL


@pytest.fixture(scope="session")
def same_weights() -> Callable[[dict, dict], None]:
    """Asserts that two state dicts hold the same tensors, bit for bit."""

    def check(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

    return check


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., None]:
    """`one_line_error(stderr, *words)`: exactly one `error:` line, holding every word, and no
    traceback: how every refusal looks to the user."""

    def check(stderr: str, *words: str) -> None:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr
        assert "Traceback" not in stderr
        for word in words:
            assert word in lines[0], (word, lines[0])

    return check


@pytest.fixture(scope="session")
def run_script() -> Callable[..., subprocess.CompletedProcess]:
    """`run_script("train.py", *flags)`: the script as a user runs it, in a real process."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    return run


@pytest.fixture
def ctrl_c_at(monkeypatch) -> Callable[[int], None]:
    """`ctrl_c_at(n)`: the n-th training batch of this process sends itself SIGINT, as a
    user's Ctrl-C in the middle of an epoch would."""
    import train

    def arm(n: int) -> None:
        calls = {"n": 0}
        real_augment = train.augment

        def augment_then_ctrl_c(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real_augment(*args, **kwargs)

        monkeypatch.setattr(train, "augment", augment_then_ctrl_c)

    return arm


@pytest.fixture(scope="session")
def make_folder(tiny_arrays) -> Callable[[Path], Path]:
    """`make_folder(path)`: a fresh copy of the tiny image folder at `path`, to break."""
    return lambda path: write_image_folder(path, tiny_arrays, CLASSES)


# --- data and a finished run ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_arrays():
    return {"train": easy_images(6, 10, seed=1), "test": easy_images(3, 10, seed=2)}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_arrays) -> Path:
    """60 training and 30 test PNG images, 10 classes."""
    return write_image_folder(tmp_path_factory.mktemp("tiny-folder"), tiny_arrays, CLASSES)


@pytest.fixture(scope="session")
def tiny_pickle(tmp_path_factory, tiny_arrays) -> Path:
    return write_pickle_root(tmp_path_factory.mktemp("tiny-pickle"), tiny_arrays, CLASSES)


@pytest.fixture(scope="session")
def tiny_tarball(tmp_path_factory, tiny_folder) -> Path:
    archive = tmp_path_factory.mktemp("tiny-tar") / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_folder, arcname="wrapped")
    return archive


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_folder) -> Path:
    """A finished 2-epoch training run on the tiny folder: best.pt, last.pt, metrics..."""
    import train

    out = tmp_path_factory.mktemp("run")
    assert train.main(["--data", str(tiny_folder), *TRAIN_FLAGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def val_split_run(tmp_path_factory, tiny_folder) -> Path:
    """A finished 3-epoch run that held 20 training images out for validation."""
    import train

    out = tmp_path_factory.mktemp("val-run")
    args = ["--data", str(tiny_folder), *TRAIN_FLAGS, "--epochs", "3", "--val-split", "20", "--out", str(out)]
    assert train.main(args) == 0
    return out
