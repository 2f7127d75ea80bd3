"""The pictures: training curves, confusion matrix, image galleries."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.atomic import atomic_write  # noqa: E402

# Class names and file names are text, never TeX: a "$" in one would start mathtext (and an
# unbalanced one would stop the plot with a parse error).
plt.rcParams["text.parse_math"] = False


def _fit(caption: str, chars: int) -> str:
    """Each line of a caption wrapped to `chars` characters, so that long class names stay under
    their own picture instead of running into the next one."""
    return "\n".join(textwrap.fill(line, chars) or line for line in caption.split("\n"))


def _lines(texts: Sequence[str]) -> int:
    return max((t.count("\n") + 1 for t in texts), default=1)


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | os.PathLike, monitor_name: str) -> None:
    """Loss and accuracy per epoch, train against the monitor set."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["monitor_loss"] for r in history], "s-", label=monitor_name)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (train: label-smoothed)")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["monitor_acc"] for r in history], "s-", label=monitor_name)
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)  # whole epochs, even for a one-epoch run
    fig.suptitle("Training curves (train accuracy is on augmented images)", fontsize=10)
    _save(fig, path)


def plot_confusion(matrix: torch.Tensor, classes: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Uses torchmetrics' own confusion-matrix plot; rows are true classes."""
    from torchmetrics.utilities.plot import plot_confusion_matrix

    # Counts in the cells while they stay readable: CIFAR-100's 10,000 cells would not be. The
    # figure grows with the classes (CIFAR-100's names at 7 pt, one per cell), within limits.
    n = len(classes)
    side = min(24.0, max(7.0, 0.22 * n + 2))
    cell_pt = 0.75 * side * 72 / n
    fig, ax = plot_confusion_matrix(matrix.cpu(), add_text=n <= 20, labels=list(classes))
    fig.set_size_inches(side + 1, side)
    for text in fig.findobj(matplotlib.text.Text):  # made under torchmetrics' style, which parses "$"
        text.set_parse_math(False)
    digits = len(str(int(matrix.max()))) if matrix.numel() else 1
    for text in ax.texts:
        text.set_fontsize(min(12.0, cell_pt / (0.65 * digits + 0.6)))
    label_pt = min(10.0, cell_pt * 0.8)
    plt.setp(ax.get_xticklabels(), rotation=45 if n <= 20 else 90, ha="right" if n <= 20 else "center",
             rotation_mode="anchor" if n <= 20 else "default", fontsize=label_pt)  # fmt: skip
    plt.setp(ax.get_yticklabels(), rotation=0, fontsize=label_pt)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(fig, path)


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (3,H,W) tensor -> (H,W,3) array for imshow."""
    return image.permute(1, 2, 0).cpu().numpy()


def plot_gallery(
    images: torch.Tensor, captions: Sequence[str], path: str | os.PathLike, title: str, columns: int = 8
) -> None:
    """A grid of uint8 (N,3,H,W) images, each with a caption under it."""
    n = max(1, len(images))
    rows = math.ceil(n / columns)
    captions = [_fit(c, 26) for c in captions]
    row_height = 2.2 + 0.14 * _lines(captions)  # the picture, then its caption's lines above it
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, row_height * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(to_hwc(images[i]), interpolation="nearest")
            ax.set_title(captions[i], fontsize=7)
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=1.2)
    _save(fig, path)


def plot_cam_grid(
    rows: Sequence[tuple[np.ndarray, str, Sequence[tuple[np.ndarray, str]]]],
    path: str | os.PathLike,
    title: str,
    per_row: int = 4,
) -> None:
    """Groups of pictures: an image, then its CAM overlays (one per target).

    rows: (image HWC uint8, caption, [(overlay, heading), ...]), laid out `per_row` groups
    across with a gap between groups.
    """
    n = max(1, len(rows))
    width = 1 + max((len(maps) for _, _, maps in rows), default=2)
    per_row = max(1, min(per_row, n, 12 // width))
    grid_rows = math.ceil(n / per_row)
    # The pictures of a group plus a narrow spacer between groups.
    ratios = ([1] * width + [0.25]) * per_row
    ratios = ratios[:-1]
    # Room above each picture for its caption (a picture of yours has four lines), and a title
    # wrapped to the figure's width: a narrow figure must not cut it off or run it into them.
    rows = [(image, _fit(caption, 20), [(m, _fit(h, 20)) for m, h in maps]) for image, caption, maps in rows]
    lines = _lines([h for _, caption, maps in rows for h in [caption, *(h for _, h in maps)]])
    width_in = sum(ratios) * 1.45
    title = textwrap.fill(title, max(40, int(width_in * 11)))
    fig = plt.figure(figsize=(width_in, grid_rows * (1.35 + 0.13 * lines)))
    grid = fig.add_gridspec(
        grid_rows, len(ratios), width_ratios=ratios, wspace=0.05, hspace=0.12 * lines + 0.3,
        top=1 - (0.14 * lines + 0.05) / fig.get_figheight(), bottom=0.02,
    )  # fmt: skip
    for k, (image, caption, maps) in enumerate(rows):
        r, c = divmod(k, per_row)
        for j, (picture, heading) in enumerate([(image, caption), *maps]):
            ax = fig.add_subplot(grid[r, (width + 1) * c + j])
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(heading, fontsize=7)
            ax.axis("off")
    if not rows:
        ax = fig.add_subplot(grid[0, 0])
        ax.text(0.5, 0.5, "no images", ha="center", va="center")
        ax.axis("off")
    fig.suptitle(title, fontsize=10, y=1.0, va="bottom")  # above the captions; the saved bbox grows to it
    _save(fig, path)


def plot_reliability(
    panels: Sequence[tuple[str, torch.Tensor, torch.Tensor, float]], path: str | os.PathLike, bins: int = 15
) -> None:
    """Reliability diagrams: accuracy against confidence in equal-width bins, with the share of
    images per bin underneath. A calibrated model sits on the diagonal.

    panels: (title, confidence, correct, ece), side by side (e.g. before and after calibration).
    """
    edges = torch.linspace(0, 1, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1 / bins
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 6.5), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
    for (title, confidence, correct, ece), ax, ax_n in zip(panels, axes[0], axes[1]):
        which = torch.bucketize(confidence.clamp(1e-6, 1), edges[1:-1], right=False)
        counts = torch.bincount(which, minlength=bins).float()
        hits = torch.bincount(which, weights=correct.float(), minlength=bins)
        conf_sum = torch.bincount(which, weights=confidence.float(), minlength=bins)
        filled = counts > 0
        accuracy = torch.where(filled, hits / counts.clamp_min(1), torch.nan)
        mean_conf = torch.where(filled, conf_sum / counts.clamp_min(1), torch.nan)
        ax.bar(centres, accuracy.nan_to_num(0), width=width * 0.95, color="tab:blue", label="accuracy")
        ax.plot(centres[filled], mean_conf[filled], "_", color="tab:red", markersize=14, mew=2.5,
                label="mean confidence in bin")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(
            ylabel="accuracy in bin",
            xlim=(0, 1),
            ylim=(0, 1),
            title=f"{title}: ECE {100 * ece:.2f}% ({bins} bins)",
        )
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        ax_n.bar(centres, counts / counts.sum().clamp_min(1), width=width * 0.95, color="tab:gray")
        ax_n.set(xlabel="confidence (max softmax probability)", ylabel="share of images")
        ax_n.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_cam_comparison(
    images: Sequence[np.ndarray],
    overlays: Sequence[Sequence[np.ndarray]],
    row_captions: Sequence[str],
    column_titles: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> None:
    """One row per image: the image, then one CAM overlay per column (method and layer)."""
    n_rows, n_cols = max(1, len(images)), 1 + len(column_titles)
    row_captions = [_fit(c, 20) for c in row_captions]
    row_height = 1.36 + 0.12 * _lines(row_captions)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.45 * n_cols, row_height * n_rows + 0.9), squeeze=False
    )
    for r, image in enumerate(images):
        axes[r, 0].imshow(image, interpolation="nearest")
        axes[r, 0].set_title(row_captions[r], fontsize=6.5)
        for c, overlay in enumerate(overlays[r]):
            axes[r, c + 1].imshow(overlay, interpolation="nearest")
            if r == 0:
                axes[r, c + 1].set_title(column_titles[c], fontsize=7, fontweight="bold")
    for ax in axes.flat:
        ax.axis("off")
    if len(images) == 0:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=0.6, w_pad=0.3)
    _save(fig, path)
