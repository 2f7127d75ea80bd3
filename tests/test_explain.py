import json

import numpy as np
import pytest
from PIL import Image

import explain


@pytest.fixture
def explain_run(trained_run, tmp_path):
    """`explain_run(*flags)`: explain.py on the tiny run's best.pt, writing into tmp_path."""
    return lambda *flags: explain.main(
        ["--ckpt", str(trained_run / "best.pt"), "--out", str(tmp_path), *flags]
    )


def test_cams_npz_and_picture(tmp_path, explain_run):
    assert explain_run("--n", "4", "--layer", "layer4", "--accelerator", "cpu") == 0
    cams = np.load(tmp_path / "cams.npz")
    assert set(cams.files) == {"index", "true", "pred", "cam_pred", "cam_true"}
    n = len(cams["index"])
    assert 1 <= n <= 4 and (cams["true"] != cams["pred"]).all()
    for key in ("cam_pred", "cam_true"):
        assert cams[key].shape == (n, 32, 32) and cams[key].dtype == np.float32
        assert cams[key].min() >= 0 and cams[key].max() <= 1
    assert (tmp_path / "gradcam.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "explanations.json").read_text())["faithfulness"]
    assert [(r["method"], r["layer"], r["n"]) for r in rows] == [("GradCAM", "layer4", n)]
    assert isinstance(rows[0]["beats_random"], bool)
    assert "Faithfulness" in (tmp_path / "report.html").read_text()


def test_fewer_mistakes_than_n_is_not_an_error(tmp_path, explain_run, capsys):
    assert explain_run("--n", "500", "--order", "index", "--layer", "layer3.1.conv2") == 0
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


def test_several_methods_write_one_npz_each(tmp_path, explain_run):
    assert explain_run("--n", "2", "--method", "all", "--layer", "layer2", "--no-faithfulness") == 0
    for slug in ("gradcam", "gradcampp", "hirescam", "layercam", "eigencam", "scorecam"):
        cams = np.load(tmp_path / f"cams_{slug}_layer2.npz")
        assert cams["cam_pred"].shape == (2, 32, 32)
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
