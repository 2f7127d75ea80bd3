"""What users of Lightning and torchvision expect: live logs, CIFAR-100, test-only sets, calibration."""

import csv
import json
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

import evaluate
import explain
import train
from common.data import load_splits


def test_csv_logger_writes_every_step_and_epoch(tmp_path, tiny_folder, train_flags):
    assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv")))
    steps = [r for r in rows if r["train/loss"]]
    epochs = [r for r in rows if r["epoch/monitor_acc"]]
    assert [int(r["step"]) for r in steps] == list(range(6))  # 2 epochs x 3 steps, each logged
    lrs = [float(r["train/lr"]) for r in steps]
    assert max(lrs) > 0 and lrs[-1] == min(lrs)  # the schedule, logged step by step, ends at its lowest
    assert [r["epoch/epoch"] for r in epochs] == ["1", "2"]
    # metrics.csv keeps its own columns, one row per epoch
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 2


def test_csv_log_is_on_disk_while_the_epoch_runs(tmp_path, tiny_folder, train_flags, monkeypatch):
    """Live logs: the steps reach logs/csv/.../metrics.csv every 10 steps, not at the epoch's end."""
    log, rows_seen, real_augment = tmp_path / "logs" / "csv" / "version_0" / "metrics.csv", [], train.augment

    def augment_and_look(*args, **kwargs):  # called once per step, before it
        rows_seen.append(len(list(csv.DictReader(open(log)))) if log.exists() else 0)
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(train, "augment", augment_and_look)
    args = ["--data", str(tiny_folder), *train_flags, "--epochs", "1", "--batch-size", "2"]  # 30 steps
    assert train.main([*args, "--out", str(tmp_path)]) == 0
    assert rows_seen[24] == 20  # before step 25 of 30: steps 1-20 are on disk


def test_a_resumed_run_logs_a_new_version(tmp_path, tiny_folder, train_flags, ctrl_c_at, monkeypatch):
    ctrl_c_at(5)
    assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path)]) == 130
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--logger", "csv"]) == 0
    versions = sorted(p.name for p in (tmp_path / "logs" / "csv").iterdir())
    assert versions == ["version_0", "version_1"]
    logged = [list(csv.DictReader(open(tmp_path / "logs" / "csv" / v / "metrics.csv"))) for v in versions]
    steps = [[int(r["step"]) for r in rows if r["train/loss"]] for rows in logged]
    assert steps == [[0, 1, 2, 3, 4], [5]]  # stopped after step 4 (epoch 2, step 2 of 3), resumed from there


def test_no_logger(tmp_path, tiny_folder, train_flags):
    assert (
        train.main(["--data", str(tiny_folder), *train_flags, "--logger", "none", "--out", str(tmp_path)])
        == 0
    )
    assert not (tmp_path / "logs").exists() and (tmp_path / "metrics.csv").exists()


def test_tensorboard_without_the_package_is_one_line(tmp_path, tiny_folder, one_line_error, capsys):
    pytest.importorskip("lightning")
    from lightning.fabric.loggers import tensorboard

    if tensorboard._TENSORBOARD_AVAILABLE or tensorboard._TENSORBOARDX_AVAILABLE:
        pytest.skip("TensorBoard is installed here")
    assert train.main(["--data", str(tiny_folder), "--logger", "tensorboard", "--out", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, "pip install tensorboard")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# --- CIFAR-100 and any number of classes -----------------------------------------------------


def write_cifar100_root(root, rng, n_train=40, n_test=20, classes=100):
    """The documented cifar-100-python layout: meta, train, test, fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"fine{c:02d}" for c in range(classes)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"x"]}, f)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [int(c) for c in rng.integers(0, classes, n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f)
    return root, names


def test_cifar100_python_root(tmp_path):
    root, names = write_cifar100_root(tmp_path, np.random.default_rng(0))
    splits = load_splits(str(root))
    assert splits.train.classes == names and len(splits.train) == 40 and len(splits.test) == 20
    assert splits.train.images.shape == (40, 3, 32, 32) and splits.train.labels.max() < 100


def test_train_on_cifar100_stores_its_own_normalisation(tmp_path):
    root, names = write_cifar100_root(tmp_path / "data", np.random.default_rng(1))
    args = ["--data", str(root), "--epochs", "2", "--batch-size", "10", "--precision", "32-true"]
    assert train.main([*args, "--out", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["classes"] == names and state["model"]["linear.weight"].shape == (100, 512)
    images = load_splits(str(root)).train.images.double() / 255
    assert np.allclose(state["mean"], images.mean(dim=(0, 2, 3)), atol=1e-6)
    assert np.allclose(state["std"], images.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    assert evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--precision", "32-true"]) == 0


# --- test-only sets ------------------------------------------------------------------------------


def class_folders(tiny_folder, target):
    """CIFAR-10.1's layout: a folder of class folders, here the tiny test split."""
    shutil.copytree(tiny_folder / "test", target)
    return target


def only_a_test_split(tiny_folder, target):
    shutil.copytree(tiny_folder / "test", target / "test")
    return target


def tarball_of_class_folders(tiny_folder, target):
    folder = class_folders(tiny_folder, target.parent / "cifar10.1")
    with tarfile.open(target.parent / "cifar10.1.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar10.1")
    return target.parent / "cifar10.1.tar.gz"


@pytest.mark.parametrize(
    "make, says",
    [
        pytest.param(class_folders, "class folders", id="class-folders"),
        pytest.param(only_a_test_split, "test set, image folder", id="test-folder-only"),
        pytest.param(tarball_of_class_folders, "class folders", id="tarball-of-class-folders"),
    ],
)
def test_evaluate_and_explain_a_test_only_set(tmp_path, tiny_folder, trained_run, make, says):
    data = make(tiny_folder, tmp_path / "set")
    assert load_splits(str(data)).train is None
    ckpt = str(trained_run / "best.pt")
    assert (
        evaluate.main(
            ["--ckpt", ckpt, "--data", str(data), "--out", str(tmp_path / "e"), "--precision", "32-true"]
        )
        == 0
    )
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert report["n_images"] == 30 and says in report["data"]
    reference = json.loads((tmp_path / "e" / "evaluation.json").read_text())["accuracy"]
    assert evaluate.main(["--ckpt", ckpt, "--out", str(tmp_path / "r"), "--precision", "32-true"]) == 0
    assert (
        json.loads((tmp_path / "r" / "evaluation.json").read_text())["accuracy"] == reference
    )  # same images
    assert says in (tmp_path / "e" / "report.html").read_text()
    assert explain.main(["--ckpt", ckpt, "--data", str(data), "--out", str(tmp_path / "x"), "--n", "2",
                         "--no-faithfulness"]) == 0  # fmt: skip


def test_a_test_only_set_cannot_train(tmp_path, tiny_folder, one_line_error, capsys):
    data = class_folders(tiny_folder, tmp_path / "set")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys.readouterr().err, "test set only", "train/")


def test_a_train_folder_given_for_its_parent_names_the_parent(tiny_folder, tmp_path, one_line_error, capsys):
    assert train.main(["--data", str(tiny_folder / "train"), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys.readouterr().err, "test set only", f"(such as {tiny_folder.resolve()}?)")


def test_a_test_set_with_other_classes_is_refused(tmp_path, tiny_folder, trained_run, one_line_error, capsys):
    data = class_folders(tiny_folder, tmp_path / "set")
    (data / "cat").rename(data / "kitten")
    assert (
        evaluate.main(["--ckpt", str(trained_run / "best.pt"), "--data", str(data), "--out", str(tmp_path)])
        == 2
    )
    one_line_error(capsys.readouterr().err, "the data lacks 'cat'", "the checkpoint has no 'kitten'")


# --- calibration ----------------------------------------------------------------------------------


def test_temperature_scaling_fits_the_validation_set(val_split_run, tiny_folder, tmp_path):
    state = torch.load(val_split_run / "best.pt", weights_only=True)
    temperature = state["temperature"]
    assert temperature > 0
    summary = json.loads((val_split_run / "summary.json").read_text())["calibration"]
    assert summary["temperature"] == temperature and summary["images"] == 20
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1e-3  # fitted, not left at T = 1
    ckpt = str(val_split_run / "best.pt")
    # On the CPU, like the reference below (a GPU's 32-true convolutions use TF32).
    args = ["--ckpt", ckpt, "--out", str(tmp_path), "--precision", "32-true", "--accelerator", "cpu"]
    assert evaluate.main(args) == 0
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["temperature"] == temperature and 0 <= report["ece_calibrated"] <= 1
    # the confidences shown are the calibrated ones: softmax(logits / T)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    plain = evaluate.predict_probs(
        train.model_from_checkpoint(state), load_splits(str(tiny_folder)).test.images,
        torch.tensor(state["mean"]), torch.tensor(state["std"]),
    ).plain  # fmt: skip
    calibrated = (plain.log() / temperature).softmax(1)
    assert np.allclose([float(r["confidence"]) for r in rows], calibrated.max(1).values, atol=1e-5)


def test_the_temperature_is_fitted_for_the_weights_best_pt_keeps(val_split_run, tiny_folder):
    """Fitted again here, on the same 20 held-out images: best.pt's weights (epoch 2 of 3) give
    its stored temperature, the last epoch's weights another."""
    from common.data import split_off_validation
    from common.predict import predict_probs

    best = torch.load(val_split_run / "best.pt", weights_only=True)
    last = torch.load(val_split_run / "last.pt", weights_only=True)
    _, val = split_off_validation(load_splits(str(tiny_folder)).train, 20, seed=0)
    mean, std = torch.tensor(best["mean"]), torch.tensor(best["std"])

    def fitted(state):
        probs = predict_probs(train.model_from_checkpoint(state), val.images, mean, std).plain
        return train.fit_temperature(probs.clamp_min(1e-12).log(), val.labels)

    assert abs(fitted(best) - best["temperature"]) < 1e-4
    assert abs(fitted(last) - best["temperature"]) > 1e-2


def test_temperature_scaling_recovers_a_known_temperature():
    """Labels drawn from softmax(z) and logits 3z: the fitted temperature is 3."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 10, generator=generator) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    assert abs(train.fit_temperature((3 * z).log_softmax(1), labels) - 3) < 0.15


def test_no_temperature_when_every_held_out_image_is_right():
    """Then the loss falls as T falls to 0: no temperature, not one near 0 that would show every
    mistake on the test set as 100 % certain."""
    log_probs = torch.tensor([[2.0, 0.5, 0.0], [0.0, 0.3, 0.2], [0.1, 0.0, 1.0]]).log_softmax(1)
    assert train.fit_temperature(log_probs, torch.tensor([0, 1, 2])) is None
    assert train.fit_temperature(log_probs, torch.tensor([0, 2, 2])) > 0.05  # one mistake: a finite T


def test_no_validation_split_no_temperature(trained_run):
    assert "temperature" not in torch.load(trained_run / "best.pt", weights_only=True)
