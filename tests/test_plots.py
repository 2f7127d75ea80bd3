"""The pictures take any class name a folder can have, and keep each caption under its picture."""

import pytest
import torch
from PIL import Image

from common import plots

ODD_NAMES = ["a$^$b", "price_$5-$10", "<b>&", "café"]


@pytest.mark.parametrize(
    "draw",
    [
        lambda path: plots.plot_confusion(torch.eye(4, dtype=torch.long) * 7, ODD_NAMES, path, "confusion"),
        lambda path: plots.plot_gallery(
            torch.zeros(4, 3, 32, 32, dtype=torch.uint8), ODD_NAMES, path, "mistakes"
        ),
    ],
    ids=["confusion", "gallery"],
)
def test_class_names_are_text_not_tex(tmp_path, draw):
    """A "$" would start matplotlib's mathtext: "a$^$b" stopped evaluate.py with a parse error."""
    draw(tmp_path / "picture.png")
    assert Image.open(tmp_path / "picture.png").size[0] > 100


@pytest.mark.parametrize("width", [20, 26])
def test_long_captions_wrap_to_their_picture(width):
    caption = "#56 true A very long class name with spaces\npred class_028_sweet_pepper_and_more 99%"
    wrapped = plots._fit(caption, width)
    assert max(len(line) for line in wrapped.split("\n")) <= width
    assert wrapped.split() == caption.split() or "".join(wrapped.split()) == "".join(caption.split())


@pytest.mark.parametrize("n", [10, 100])
def test_a_confusion_matrix_grows_with_its_classes(tmp_path, n):
    """CIFAR-100's names one per row, not a black band: about 0.22 in (26 px) a class."""
    plots.plot_confusion(
        torch.eye(n, dtype=torch.long), [f"class_{i}" for i in range(n)], tmp_path / "c.png", "t"
    )
    height = Image.open(tmp_path / "c.png").size[1]
    assert height >= 26 * n
