import numpy as np
import pytest
import torch

import explain
import train
from common.checkpoint import load_checkpoint, model_from_checkpoint
from common.data import load_cifar10, normalize
from conftest import write_image_folder


def test_cams_npz_and_picture(tmp_path, trained_run):
    assert explain.main(["--ckpt", str(trained_run / "best.pt"), "--out", str(tmp_path),
                         "--n", "4", "--accelerator", "cpu"]) == 0
    cams = np.load(tmp_path / "cams.npz")
    assert set(cams.files) == {"index", "true", "pred", "cam_pred", "cam_true"}
    n = len(cams["index"])
    assert 1 <= n <= 4 and (cams["true"] != cams["pred"]).all()
    for key in ("cam_pred", "cam_true"):
        assert cams[key].shape == (n, 32, 32) and cams[key].dtype == np.float32
        assert cams[key].min() >= 0 and cams[key].max() <= 1
    assert (tmp_path / "gradcam.png").stat().st_size > 1000


def test_fewer_mistakes_than_n_is_not_an_error(tmp_path, trained_run, capsys):
    assert explain.main(["--ckpt", str(trained_run / "best.pt"), "--out", str(tmp_path),
                         "--n", "500", "--order", "index", "--layer", "layer3.1.conv2"]) == 0
    assert "fewer than --n 500" in capsys.readouterr().out
    index = np.load(tmp_path / "cams.npz")["index"]
    assert list(index) == sorted(index) and len(index) < 500


def test_unknown_layer_lists_the_valid_names(tmp_path, trained_run, capsys):
    assert explain.main(["--ckpt", str(trained_run / "best.pt"), "--layer", "layer9"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'layer9'" in err and "conv1, bn1, layer1, layer2, layer3, layer4, linear" in err
    assert err.count("\n") == 1


def object_images(n: int, seed: int):
    """Grey noise with one small coloured square; its colour (blue or red) is the class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 166, size=(n, 32, 32, 1)).repeat(3, axis=3).astype(np.uint8)
    labels = (np.arange(n) >= n // 2).astype(np.int64)  # sorted, so folder order = this order
    boxes = []
    for i in range(n):
        y, x = rng.integers(0, 32 - 6, size=2)
        images[i, y:y + 6, x:x + 6] = (30, 30, 220) if labels[i] == 0 else (220, 30, 30)
        boxes.append((y, x))
    return images, labels, boxes


def test_layer3_cam_peaks_on_the_evidence(tmp_path):
    train_images, train_labels, _ = object_images(200, seed=0)
    test_images, test_labels, boxes = object_images(40, seed=1)
    root = write_image_folder(tmp_path / "objects", {"train": (train_images, train_labels),
                                                     "test": (test_images, test_labels)},
                              ["blue", "red"])
    out = tmp_path / "run"
    assert train.main(["--data", str(root), "--epochs", "5", "--batch-size", "20", "--cutout", "0",
                       "--accelerator", "cpu", "--out", str(out)]) == 0
    state = load_checkpoint(out / "best.pt")
    model = model_from_checkpoint(state)
    test = load_cifar10(str(root)).test
    assert torch.equal(test.images, torch.from_numpy(test_images).permute(0, 3, 1, 2))
    x = normalize(test.images, torch.tensor(state["mean"]), torch.tensor(state["std"]))
    maps = explain.grad_cams(model, model.layer3, x, test.labels)
    hits = 0
    for cam, (y, x0) in zip(maps, boxes):
        peak_y, peak_x = np.unravel_index(cam.argmax(), cam.shape)
        # Inside the 6x6 square, allowing 2 px for the 8x8 map's upsampling.
        hits += (y - 2 <= peak_y < y + 8) and (x0 - 2 <= peak_x < x0 + 8)
    chance = 10 * 10 / (32 * 32)
    assert hits / len(boxes) >= 0.8, f"peak on the object in {hits}/{len(boxes)} (chance ~{chance:.0%})"
