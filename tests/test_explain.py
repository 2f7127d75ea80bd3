import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import explain


@pytest.fixture
def explain_run(trained_run, tmp_path):
    """`explain_run(*flags)`: explain.py on the tiny run's best.pt, writing into tmp_path."""
    return lambda *flags: explain.main(
        ["--ckpt", str(trained_run / "best.pt"), "--out", str(tmp_path), *flags]
    )


def test_cams_npz_and_picture(tmp_path, explain_run):
    # GradCAM: this test is about the files; SESS, layer4's default, costs ~60 s more on 2 cores.
    flags = ["--n", "4", "--layer", "layer4", "--method", "gradcam", "--accelerator", "cpu"]
    assert explain_run(*flags, "--road-sample", "12") == 0
    cams = np.load(tmp_path / "cams.npz")
    assert {
        "index",
        "true",
        "pred",
        "cam_pred",
        "cam_true",
        "cam_contrast",
        "contrast_class",
        "images",
    } <= set(cams.files)
    n = len(cams["index"])
    assert 1 <= n <= 4 and (cams["true"] != cams["pred"]).all()
    # a mistake's contrast is the predicted class against the true one
    assert (cams["contrast_class"] == cams["true"]).all()
    for key in ("cam_pred", "cam_true", "cam_contrast"):
        assert cams[key].shape == (n, 32, 32) and cams[key].dtype == np.float32
        assert cams[key].min() >= 0 and cams[key].max() <= 1
    assert cams["images"].shape == (n, 32, 32, 3) and cams["images"].dtype == np.uint8
    assert (tmp_path / "gradcam.png").stat().st_size > 1000
    report = json.loads((tmp_path / "explanations.json").read_text())
    rows = report["faithfulness"]
    assert [(r["method"], r["layer"], r["n"]) for r in rows] == [("GradCAM", "layer4", n)]
    assert isinstance(rows[0]["beats_random"], bool)
    sample = report["road_sample"]
    assert [(r["method"], r["layer"], r["n"]) for r in sample] == [("GradCAM", "layer4", 12)]
    assert sample[0]["diff_low"] <= sample[0]["diff_mean"] <= sample[0]["diff_high"]
    assert sample[0]["verdict"] in ("beats RandomCAM", "no clear difference", "worse than RandomCAM")
    page = (tmp_path / "report.html").read_text()
    assert "Faithfulness" in page and "Explore the maps" in page


@pytest.mark.parametrize(
    "flags, check",
    [
        pytest.param(["--index", "7", "3", "7"], lambda c: list(c["index"]) == [7, 3], id="index"),
        pytest.param(["--class", "cat", "--correct"], lambda c: list(c["true"]) == [3, 3, 3],
                     id="class-right-or-wrong"),
        pytest.param(["--correct", "--n", "30"], lambda c: len(c["index"]) == 30, id="correct"),
        pytest.param(["--sample", "5"], lambda c: len(set(c["index"])) == 5, id="sample"),
    ],
)  # fmt: skip
def test_which_images(tmp_path, explain_run, flags, check):
    assert explain_run(*flags, "--no-faithfulness") == 0
    cams = np.load(tmp_path / "cams.npz")
    assert check(cams), dict(cams)
    right = cams["pred"] == cams["true"]
    # the contrast is against the true class for a mistake, the runner-up for a right prediction
    assert (cams["contrast_class"][~right] == cams["true"][~right]).all()
    runner_up = np.argsort(-cams["probs"], axis=1)[:, 1]
    assert (cams["contrast_class"][right] == runner_up[right]).all()


def test_sample_is_seeded(tmp_path, explain_run):
    picks = []
    for seed in ("1", "1", "2"):
        assert explain_run("--sample", "6", "--seed", seed, "--no-faithfulness") == 0
        picks.append(list(np.load(tmp_path / "cams.npz")["index"]))
    assert picks[0] == picks[1] != picks[2]


def test_fewer_mistakes_than_n_is_not_an_error(tmp_path, explain_run, capsys):
    flags = ["--n", "500", "--order", "index", "--layer", "layer3.1.conv2", "--method", "gradcam"]
    assert explain_run(*flags, "--no-faithfulness") == 0  # the faithfulness score is not the point here
    assert "fewer than --n 500" in capsys.readouterr().out
    index = np.load(tmp_path / "cams.npz")["index"]
    assert list(index) == sorted(index) and len(index) < 500


@pytest.mark.parametrize(
    "flags, says",
    [
        pytest.param(["--layer", "layer9"], ["unknown layer 'layer9'", "conv1, bn1, layer1, layer2, layer3, "
                     "layer4, linear"], id="unknown-layer"),
        pytest.param(["--method", "magic"], ["unknown --method 'magic'"], id="unknown-method"),
        pytest.param(["--layer", "linear"], ["no spatial map"], id="layer-without-a-map"),
        pytest.param(["--layer", "layer4+"], ["unknown layer ''"], id="empty-fused-part"),
        pytest.param(["--layer", ""], ["unknown layer ''"], id="empty-layer"),
        pytest.param(["--index", "30"], ["--index 30 is out of range", "30 images"], id="index-out-of-range"),
        pytest.param(["--class", "kitten"], ["unknown --class 'kitten'", "airplane"], id="unknown-class"),
        pytest.param(["--target", "both"], ["--target"], id="unknown-target"),
        pytest.param(["--layer", "layer4", "--aug-smooth"], ["--aug-smooth does not apply to SESS, the "
                     "default method at layer4: name", "--method gradcam / "], id="aug-smooth-of-sess"),
        pytest.param(["--method", "refinecam", "--eigen-smooth"],
                     ["--eigen-smooth does not apply to RefineCAM: name"], id="eigen-smooth-of-refinecam"),
    ],
)  # fmt: skip
def test_bad_layer_or_method_is_one_line(explain_run, flags, says, one_line_error, capsys):
    assert explain_run(*flags) == 2
    one_line_error(capsys.readouterr().err, *says)


def test_pointing_game_cams_point_at_the_evidence(tmp_path):
    """The reduced pointing game: layer3 Grad-CAM's peak lands on the object that decides the
    class far more often than chance."""
    from benchmarks import pointing_game

    assert pointing_game.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "selfcheck.json").read_text())
    rates = {(r["method"], r["layer"]): r["rate"] for r in report["rows"]}
    assert rates["GradCAM", "layer3"] >= 0.8, report
    assert rates["GradCAM", "layer3"] > 5 * report["chance"]
    assert "Self-check" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize(
    "layer, method",
    [
        ("layer1", "gradcam"),
        ("layer2", "gradcam"),
        ("layer3", "sess"),
        ("layer4", "sess"),
        ("layer3+layer4", "sess"),
    ],
)
def test_default_method_follows_the_map_size(trained_run, layer, method):
    """GradCAM where the layer's map is 16x16 or finer, SESS where it is coarser (the pointing game)."""
    model = explain.model_from_checkpoint(torch.load(trained_run / "best.pt", weights_only=True))
    s = explain.Subject(model, {layer: explain.find_layers(model, layer)}, ["auto"], (False, False), None)
    assert s.combos() == [(method, layer)]


@pytest.mark.parametrize("method", ["sess", "refinecam", "xgradcam", "fullgrad", "shapleycam"])
def test_sharper_methods_give_full_resolution_maps(tmp_path, explain_run, method):
    assert (
        explain_run(
            "--n", "2", "--method", method, "--layer", "layer4", "--target", "pred", "--no-faithfulness"
        )
        == 0
    )
    cams = np.load(tmp_path / "cams.npz")
    assert cams["cam_pred"].shape == (2, 32, 32) and np.isfinite(cams["cam_pred"]).all()
    assert np.isnan(cams["cam_true"]).all()  # not asked for


@pytest.mark.parametrize("option", ["--aug-smooth", "--eigen-smooth"])
def test_smoothing_changes_the_maps(tmp_path, explain_run, option):
    assert (
        explain_run("--n", "2", "--target", "pred", "--no-faithfulness", "--out", str(tmp_path / "plain"))
        == 0
    )
    assert explain_run("--n", "2", "--target", "pred", "--no-faithfulness", option) == 0
    plain, smoothed = np.load(tmp_path / "plain" / "cams.npz"), np.load(tmp_path / "cams.npz")
    assert not np.allclose(plain["cam_pred"], smoothed["cam_pred"])


def test_several_methods_write_one_npz_each(tmp_path, explain_run):
    assert (
        explain_run(
            "--n", "2", "--method", "all", "--layer", "layer2", "--no-faithfulness", "--target", "pred"
        )
        == 0
    )
    slugs = (
        "gradcam gradcampp hirescam xgradcam layercam eigencam scorecam shapleycam fullgrad refinecam sess"
    )
    for slug in slugs.split():
        found = list(tmp_path.glob(f"cams_{slug}_*.npz"))
        assert len(found) == 1 and np.load(found[0])["cam_pred"].shape == (2, 32, 32), slug
    assert (tmp_path / "gradcam.png").exists() and not (tmp_path / "cams.npz").exists()


def test_user_images(tmp_path, explain_run, capsys):
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "gray.png")
    assert explain_run("--image", str(tmp_path / "wide.png"), str(tmp_path / "gray.png")) == 0
    out = capsys.readouterr().out
    assert "resized from 64x48 to 32x32" in out and out.count("%, ") >= 4  # top-3 per picture
    cams = np.load(tmp_path / "user_cams.npz")
    assert list(cams["true"]) == [-1, -1] and np.isnan(cams["cam_true"]).all()
    assert cams["cam_pred"].shape == (2, 32, 32) and (tmp_path / "user_gradcam.png").exists()
    # the contrast of a picture with no true class: the top class against the runner-up
    assert (cams["contrast_class"] == np.argsort(-cams["probs"], axis=1)[:, 1]).all()
    assert np.isfinite(cams["cam_contrast"]).all()
    assert list(cams["files"]) == ["wide.png", "gray.png"]
    report = (tmp_path / "report.html").read_text()
    assert "Your pictures" in report and "wide.png: <b" in report and "gray.png: <b" in report


def test_a_picture_too_large_for_pil_is_one_line(tmp_path, explain_run, one_line_error, capsys, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # PIL opens up to 3,000 px: not 64x64
    assert explain_run("--image", str(tmp_path / "huge.png")) == 2
    one_line_error(capsys.readouterr().err, "huge.png has more than 3,000 pixels", "scale it down")


def test_mistakes_are_ranked_by_the_confidence_they_show(val_split_run, tmp_path):
    """With a fitted temperature the captions show calibrated confidences, and the most confident
    mistakes are chosen and ordered by them: the mistakes evaluate.py lists first (a temperature
    can reorder confidences across images)."""
    ckpt = str(val_split_run / "best.pt")
    flags = ["--n", "15", "--method", "gradcam", "--target", "pred", "--no-faithfulness"]
    assert explain.main(["--ckpt", ckpt, "--out", str(tmp_path), *flags]) == 0
    assert evaluate.main(["--ckpt", ckpt, "--out", str(tmp_path / "evaluate")]) == 0
    cams = np.load(tmp_path / "cams.npz")
    confidences = cams["probs"].max(1)
    assert len(confidences) == 15 and (np.diff(confidences) <= 0).all(), confidences
    with open(tmp_path / "evaluate" / "predictions.csv") as f:
        mistakes = [r for r in csv.DictReader(f) if r["true"] != r["pred"]]
    first = sorted(mistakes, key=lambda r: -float(r["confidence"]))[:15]
    assert sorted(cams["index"]) == sorted(int(r["index"]) for r in first)
