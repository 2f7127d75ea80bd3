"""Running a trained model over images: shared by evaluate.py and explain.py."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.data import normalize
from common.model import folded_for_inference


@dataclass
class Predictions:
    """Softmax probabilities (N, classes), float32, on the host."""

    plain: torch.Tensor
    flip: torch.Tensor | None = None  # the image and its mirror image, averaged
    flip_translate: torch.Tensor | None = None  # and both shifted by one pixel up-left and down-right


def with_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T), from softmax(logits): the calibrated probabilities."""
    return (probs.clamp_min(1e-12).log() / temperature).softmax(1)


def _probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().softmax(1)


def _flip_average(model: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    return ((_probs(model, x) if probs is None else probs) + _probs(model, x.flip(-1))) / 2


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) pixels, the border filled by reflection."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 1000,
    autocast: torch.dtype | None = None,
    tta: bool = False,
    desc: str = "",
) -> Predictions:
    """Class probabilities for uint8 images (N,3,32,32), which may live on the host: each
    batch is moved to the model's device.

    With `tta` also the test-time-augmented probabilities, from the same pass: the flip
    average, and (as airbench's ResNet-18 baseline does) half of it plus a quarter each of
    the flip averages of the image shifted by one pixel up-left and down-right. The model runs
    with its BatchNorms folded into its convolutions (the same outputs, faster). With `desc`,
    a progress bar over more than one batch (10,000 images take minutes on a small CPU).
    """
    model = folded_for_inference(model)
    device = next(model.parameters()).device
    mean, std = mean.to(device), std.to(device)
    plain, flip, flip_translate = [], [], []
    starts = range(0, max(len(images), 1), batch_size)  # an empty set still gives (0, classes)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not desc or len(starts) < 2):
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
        x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            probs = _probs(model, x)
            plain.append(probs.cpu())
            if tta:
                mirrored = _flip_average(model, x, probs)
                shifts = (_flip_average(model, _shifted(x, dy, dy)) for dy in (-1, 1))
                flip.append(mirrored.cpu())
                flip_translate.append((mirrored / 2 + sum(shifts) / 4).cpu())
    if not tta:
        return Predictions(torch.cat(plain))
    return Predictions(torch.cat(plain), torch.cat(flip), torch.cat(flip_translate))
