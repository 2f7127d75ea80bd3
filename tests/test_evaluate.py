import csv
import json
import shutil
import types

import pytest
import torch

import evaluate
from common.checkpoint import data_for
from common.data import class_difference
from common.model import build_model


def independent_probs(ckpt, images):
    """A plain loop, one image at a time, sharing no code with evaluate.py's pass."""
    state = torch.load(ckpt, weights_only=True)
    model = build_model(len(state["classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    mean = torch.tensor(state["mean"]).view(3, 1, 1)  # the training set's own statistics
    std = torch.tensor(state["std"]).view(3, 1, 1)
    with torch.no_grad():
        return torch.stack([model(((img.float() / 255 - mean) / std)[None])[0].softmax(0) for img in images])


def test_counts_every_image_once_and_agrees_with_a_plain_loop(tmp_path, trained_run, tiny_folder, classes):
    ckpt = trained_run / "best.pt"
    assert (
        evaluate.main(
            [
                "--ckpt",
                str(ckpt),
                "--out",
                str(tmp_path),
                "--precision",
                "32-true",
                "--accelerator",
                "cpu",
                "--batch-size",
                "7",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert list(rows[0]) == ["index", "true", "true_name", "pred", "pred_name", "confidence"]
    assert [int(r["index"]) for r in rows] == list(range(30))  # batch 7 leaves a stub: still once each

    from common.data import load_splits

    test = load_splits(str(tiny_folder)).test
    probs = independent_probs(ckpt, test.images)
    assert [int(r["true"]) for r in rows] == test.labels.tolist()
    assert [r["true_name"] for r in rows] == [classes[i] for i in test.labels.tolist()]
    assert [int(r["pred"]) for r in rows] == probs.argmax(1).tolist()
    assert torch.allclose(
        torch.tensor([float(r["confidence"]) for r in rows]), probs.max(1).values, atol=1e-4
    )
    report = json.loads((tmp_path / "evaluation.json").read_text())
    expected = (probs.argmax(1) == test.labels).float().mean().item()
    assert report["n_images"] == 30 and abs(report["accuracy"] - expected) < 1e-9
    assert sum(c["images"] for c in report["per_class"].values()) == 30
    assert sum(map(sum, report["confusion_matrix"])) == 30
    assert 0 <= report["ece"] <= 1
    for name in ("confusion_matrix.png", "misclassified.png", "calibration.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 1000


def test_tta_is_reported_beside_the_plain_figure(tmp_path, trained_run, tiny_folder):
    args = ["--ckpt", str(trained_run / "best.pt"), "--precision", "32-true", "--accelerator", "cpu"]
    assert evaluate.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert evaluate.main([*args, "--out", str(tmp_path / "tta"), "--tta"]) == 0
    plain = json.loads((tmp_path / "plain" / "evaluation.json").read_text())
    tta = json.loads((tmp_path / "tta" / "evaluation.json").read_text())
    assert plain["tta"] is None and tta["accuracy"] == plain["accuracy"]
    assert set(tta["tta"]) == {"flip", "flip_translate"}
    # Computed independently: the flip average of the image, and of the image moved one pixel
    # up-left and down-right with its border mirrored, weighted 1/2, 1/4, 1/4.
    from common.data import load_splits

    test = load_splits(str(tiny_folder)).test

    def flip_average(images):
        ckpt = trained_run / "best.pt"
        return (independent_probs(ckpt, images) + independent_probs(ckpt, images.flip(-1))) / 2

    up_left = [*range(1, 32), 30]  # row (column) i of the moved picture is this row of the original
    down_right = [1, *range(0, 31)]
    flip = flip_average(test.images)
    moved = [flip_average(test.images[:, :, rows][:, :, :, rows]) for rows in (up_left, down_right)]
    expected = {"flip": flip, "flip_translate": flip / 2 + (moved[0] + moved[1]) / 4}
    for name, probs in expected.items():
        accuracy = (probs.argmax(1) == test.labels).float().mean().item()
        assert abs(tta["tta"][name]["accuracy"] - accuracy) < 1e-9, name
        loss = torch.nn.functional.nll_loss(probs.log(), test.labels).item()
        assert abs(tta["tta"][name]["loss"] - loss) < 1e-4, name


def test_refuses_data_with_other_class_names(tmp_path, trained_run, tiny_folder, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    for split in ("train", "test"):
        (other / split / "cat").rename(other / split / "kitten")
    assert (
        evaluate.main(["--ckpt", str(trained_run / "best.pt"), "--data", str(other), "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert "the data lacks 'cat'; the checkpoint has no 'kitten'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "theirs, said",
    [
        (["a", "b"], "the data lacks 'c'"),
        (["a", "b", "c", "d"], "the checkpoint has no 'd'"),
        ([f"x{i}" for i in range(12)], "the data lacks 'a', 'b', 'c'; the checkpoint has no 'x0', 'x1', "
         "'x2', 'x3', 'x4', 'x5', 'x6', 'x7' and 4 more"),
        (["a", "b", "c", "c"], "3 names against 4, some repeated"),
    ],
)  # fmt: skip
def test_a_class_mismatch_names_what_differs(theirs, said):
    assert class_difference(["a", "b", "c"], theirs) == said


def test_the_same_names_in_another_order_are_relabelled_not_refused(trained_run, tiny_folder):
    """A test set unpacked where its folders sort otherwise: each image keeps its class name."""
    state = torch.load(trained_run / "best.pt", weights_only=True)
    plain = data_for(state, str(tiny_folder)).test
    state["classes"] = state["classes"][::-1]
    reordered = data_for(state, str(tiny_folder)).test
    assert reordered.classes == state["classes"]
    # class by class in the checkpoint's order, each class's pictures in their own order
    by_class = [plain.images[plain.labels == plain.classes.index(name)] for name in state["classes"]]
    assert torch.equal(reordered.images, torch.cat(by_class))
    names = [plain.classes[k] for k in plain.labels]
    assert [reordered.classes[k] for k in reordered.labels] == sorted(names, key=state["classes"].index)


def test_a_class_never_predicted_has_no_precision_not_zero(tmp_path, capsys):
    """Precision is undefined for a class with no predictions; torchmetrics says 0."""
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    labels = torch.tensor([0, 1, 2, 2])  # class 2 is never predicted
    m = {**evaluate.class_metrics(probs, labels, 3), "temperature": None, "ece_calibrated": None}
    classes = ["cat", "dog", "frog"]
    report = evaluate.evaluation_report(
        types.SimpleNamespace(ckpt="best.pt"), "tiny", 4, m, None, "cpu", "32-true", classes
    )
    assert [report["per_class"][c]["precision"] for c in classes] == [0.5, 0.5, None]
    json.dumps(report, allow_nan=False)  # plain JSON: null, not NaN
    evaluate.print_summary({**report, "total_s": 1.0}, m, classes, 1.0, tmp_path)
    frog = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("frog"))
    assert frog.split() == ["frog", "2", "0.00%", "n/a", "0.00%"]
