import re
import shutil
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from common import data as data_module
from common.data import DataError, balanced_subset, cache_root, load_splits, split_off_validation


def assert_same(a, b):
    for split in ("train", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert x.classes == y.classes


def test_every_source_gives_the_same_tensors(tiny_folder, tiny_pickle, tiny_tarball, tiny_arrays, classes):
    folder = load_splits(str(tiny_folder))
    assert folder.train.images.shape == (60, 3, 32, 32) and folder.train.images.dtype == torch.uint8
    assert folder.train.labels.dtype == torch.int64 and folder.test.images.shape == (30, 3, 32, 32)
    assert folder.train.classes == classes
    # ImageFolder order: classes sorted, files sorted. Our arrays were written in that order.
    images, labels = tiny_arrays["train"]
    assert torch.equal(folder.train.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(folder.train.labels, torch.from_numpy(labels))
    assert_same(folder, load_splits(str(tiny_pickle)))
    assert_same(folder, load_splits(str(tiny_pickle / "cifar-10-batches-py")))
    assert_same(folder, load_splits(str(tiny_tarball)))


def test_matches_torchvision_imagefolder_order(tiny_folder):
    from torchvision.datasets import ImageFolder

    reference = ImageFolder(str(tiny_folder / "train"))
    ours = load_splits(str(tiny_folder)).train
    assert ours.classes == reference.classes
    assert ours.labels.tolist() == reference.targets
    first = np.array(reference[7][0])
    assert torch.equal(ours.images[7], torch.from_numpy(first).permute(2, 0, 1))


@pytest.mark.parametrize("extra", ["README.txt", ".DS_Store"])
def test_a_wrapper_folder_may_hold_files_beside_the_data(tmp_path, tiny_folder, extra):
    shutil.copytree(tiny_folder, tmp_path / "download" / "cifar10")
    (tmp_path / "download" / "cifar10" / extra).write_text("not a picture")
    assert_same(load_splits(str(tmp_path / "download")), load_splits(str(tiny_folder)))


def test_hidden_folders_are_not_classes(tmp_path, tiny_folder):
    """Jupyter leaves .ipynb_checkpoints in the folders it opens."""
    shutil.copytree(tiny_folder, tmp_path / "data")
    for split in ("train", "test"):
        (tmp_path / "data" / split / ".ipynb_checkpoints").mkdir()
        save_png(tmp_path / "data" / split / ".ipynb_checkpoints" / "x.png", (32, 32))
    assert_same(load_splits(str(tmp_path / "data")), load_splits(str(tiny_folder)))


@pytest.mark.parametrize("system_file", [".DS_Store", "Thumbs.db", "desktop.ini"])
def test_files_a_file_manager_leaves_are_not_pictures(tmp_path, tiny_folder, system_file):
    """macOS, Windows Explorer: folders opened with them hold these beside the pictures."""
    shutil.copytree(tiny_folder, tmp_path / "data")
    (tmp_path / "data" / "train" / "cat" / system_file).write_bytes(b"\0\1not a picture")
    assert_same(load_splits(str(tmp_path / "data")), load_splits(str(tiny_folder)))


def rename_cat(root, forms):
    for split, form in zip(("train", "test"), forms):
        (root / split / "cat").rename(root / split / unicodedata.normalize(form, "élan"))
    return root


def test_class_names_are_the_same_however_the_system_wrote_them(tmp_path, make_folder):
    """macOS writes "élan" decomposed (e + a combining accent), Linux composed: one class, named
    in composed form, in ImageFolder's order (train/'s folders sorted as written)."""
    mixed = load_splits(str(rename_cat(make_folder(tmp_path / "mixed"), ("NFD", "NFC"))))
    one_system = load_splits(str(rename_cat(make_folder(tmp_path / "macos"), ("NFD", "NFD"))))
    assert_same(mixed, one_system)
    assert mixed.train.classes[5] == unicodedata.normalize("NFC", "élan")  # between dog and frog


def test_one_class_name_written_two_ways_is_refused(tmp_path, make_folder):
    root = make_folder(tmp_path / "d")
    for split in ("train", "test"):
        (root / split / "cat").rename(root / split / unicodedata.normalize("NFD", "élan"))
        (root / split / "dog").rename(root / split / unicodedata.normalize("NFC", "élan"))
    with pytest.raises(DataError, match="one class name written two ways"):
        load_splits(str(root))


def test_second_start_reads_the_cache(tiny_folder, monkeypatch):
    load_splits(str(tiny_folder))
    assert list((cache_root() / "tensors").glob("*.pt"))
    monkeypatch.setattr(data_module, "_load_image_folder", lambda root: pytest.fail("decoded again"))
    load_splits(str(tiny_folder))


def test_a_copied_archive_is_not_unpacked_again(tmp_path, tiny_tarball, monkeypatch):
    load_splits(str(tiny_tarball))
    copy = tmp_path / "elsewhere" / "copy.tar.gz"
    copy.parent.mkdir()
    shutil.copy(tiny_tarball, copy)  # a new path and a new mtime, the same bytes
    monkeypatch.setattr(data_module, "_load_image_folder", lambda root: pytest.fail("decoded again"))
    assert str(copy) in load_splits(str(copy)).source


def test_changed_file_invalidates_the_cache(tmp_path, make_folder, classes):
    root = make_folder(tmp_path / "d")
    before = load_splits(str(root)).train.images[0].clone()
    first = sorted((root / "train" / classes[0]).iterdir())[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(first)
    assert not torch.equal(load_splits(str(root)).train.images[0], before)


def test_grayscale_is_converted(tmp_path, make_folder):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(root / "test" / "cat" / "00000_gray.png")
    test = load_splits(str(root)).test
    assert len(test) == 31 and test.images.shape[1] == 3


@pytest.mark.parametrize(
    "pixels, mode, read_as",
    [
        pytest.param(
            np.full((32, 32), 2000, np.uint16), "I;16", "integer (2000 to 2000) pixels", id="16-bit"
        ),
        pytest.param(np.full((32, 32), 200, np.int32), "I", 200, id="32-bit-in-0-255-taken"),
        pytest.param(np.full((32, 32), 2000, np.int32), "I", "integer (2000 to 2000) pixels", id="32-bit"),
        pytest.param(np.full((32, 32), 0.5, np.float32), "F", "float pixels", id="float-refused"),
    ],
)
def test_deep_pixels_are_refused_not_clipped(tmp_path, make_folder, pixels, mode, read_as):
    """PIL's conversion to RGB clips them (a 12-bit grayscale picture turned white); those that
    lie in 0..255 are taken as they are."""
    root = make_folder(tmp_path / "d")
    Image.fromarray(pixels).save(root / "test" / "cat" / "00000_deep.tif")
    assert Image.open(root / "test" / "cat" / "00000_deep.tif").mode == mode
    if isinstance(read_as, str):
        with pytest.raises(
            DataError, match=re.escape(f"{read_as} (PIL mode {mode}): save it as an 8-bit picture")
        ):
            load_splits(str(root))
    else:
        test = load_splits(str(root)).test
        cat = test.classes.index("cat")
        assert (test.images[(test.labels == cat).nonzero()[0, 0]] == read_as).all()  # the first cat


def test_subset_is_balanced_and_val_split_is_disjoint(tiny_folder):
    train = load_splits(str(tiny_folder)).train
    subset = balanced_subset(train, 25, seed=0)
    counts = torch.bincount(subset.labels, minlength=10)
    assert len(subset) == 25 and counts.max() - counts.min() <= 1
    rest, val = split_off_validation(train, 12, seed=0)
    assert len(rest) == 48 and len(val) == 12
    all_images = torch.cat([rest.images, val.images]).view(60, -1)
    assert len(torch.unique(all_images, dim=0)) == len(torch.unique(train.images.view(60, -1), dim=0))


def save_png(path, size):
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)


@pytest.mark.parametrize(
    "breaker, says",
    [
        pytest.param(
            lambda r: shutil.rmtree(r / "test" / "dog"), ["differ", "dog"], id="class-missing-from-test"
        ),
        pytest.param(
            lambda r: save_png(r / "train" / "cat" / "big.png", (28, 28)),
            ["28x28", "not 32x32"],
            id="wrong-size",
        ),
        pytest.param(
            lambda r: (r / "train" / "cat" / "notes.jpg").write_text("hi"),
            ["not an image", "notes.jpg"],
            id="not-an-image",
        ),
        pytest.param(
            lambda r: [p.unlink() for p in (r / "train" / "frog").iterdir()],
            ["empty class", "frog"],
            id="empty-class",
        ),
    ],
)
def test_bad_image_folder_gives_one_clear_line(tmp_path, make_folder, breaker, says):
    root = make_folder(tmp_path / "bad")
    breaker(root)
    with pytest.raises(DataError) as info:
        load_splits(str(root))
    for word in says:
        assert word in str(info.value)
    assert "\n" not in str(info.value)


def test_a_picture_too_large_for_pil_is_one_clear_line(tmp_path, make_folder, monkeypatch):
    root = make_folder(tmp_path / "bad")
    save_png(root / "train" / "cat" / "huge.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # PIL opens up to 3,000 px: 32x32, not 64x64
    with pytest.raises(DataError, match=r"^\S*huge.png is far larger than 32x32 [^\n]*$"):
        load_splits(str(root))


@pytest.mark.parametrize("wrapped", [False, True], ids=["class-folders", "in-a-wrapper-folder"])
def test_an_empty_class_folder_of_a_test_set_is_named(tmp_path, tiny_folder, wrapped):
    root = tmp_path / "set" / "by-class" if wrapped else tmp_path / "by-class"  # the CIFAR-10.1 layout
    shutil.copytree(tiny_folder / "test", root)
    for image in (root / "frog").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="empty class folder: .*frog"):
        load_splits(str(tmp_path / "set" if wrapped else root))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train/ and test/"):
        load_splits(str(tmp_path / "empty"))


@pytest.mark.parametrize("dataset, name", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_offline_download_says_what_to_do(monkeypatch, tmp_path, dataset, name):
    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, name.replace("-", ""), Offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"could not download {name}; pass --data PATH"):
        load_splits(None, dataset)


def test_real_cifar10_tarball(shared_tarball, classes):
    splits = load_splits(str(shared_tarball))
    assert splits.train.images.shape == (50000, 3, 32, 32)
    assert splits.test.images.shape == (10000, 3, 32, 32)
    assert splits.train.classes == classes
    assert torch.bincount(splits.train.labels).tolist() == [5000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    mean = splits.train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.01)
