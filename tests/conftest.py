"""Tiny, deterministic CIFAR-like data in every source format, made by the tests."""
from __future__ import annotations

import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

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


def write_image_folder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                       classes: list[str]) -> Path:
    from PIL import Image

    for split, (images, labels) in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / split / classes[label] / f"{i:05d}.png")
    return root


def write_pickle_root(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                      classes: list[str]) -> Path:
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


def make_tarball(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="wrapped")
    return archive


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
    return make_tarball(tiny_folder, tmp_path_factory.mktemp("tiny-tar") / "tiny.tar.gz")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_folder) -> Path:
    """A finished 2-epoch training run on the tiny folder: best.pt, last.pt, metrics..."""
    import train

    out = tmp_path_factory.mktemp("run")
    code = train.main(["--data", str(tiny_folder), "--epochs", "2", "--batch-size", "20",
                       "--out", str(out), "--precision", "32-true", "--accelerator", "cpu"])
    assert code == 0
    return out


def pytest_configure(config):
    # NumPy 2 deprecation chatter from inside matplotlib/torchmetrics, not from this project.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:matplotlib.*")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:numpy.*")
