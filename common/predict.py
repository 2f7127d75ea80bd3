"""Running a trained model over images: shared by evaluate.py and explain.py."""

from __future__ import annotations

import contextlib

import torch

from common.data import normalize


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 1000,
    autocast: torch.dtype | None = None,
    flip_tta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax probabilities (N, classes), float32, for uint8 images (N,3,32,32).

    `images` may live on the host: each batch is moved to the model's device. With
    `flip_tta` also returns the average of each image's and its mirror image's
    probabilities (else None), from the same pass.
    """
    device = next(model.parameters()).device
    mean, std = mean.to(device), std.to(device)
    plain, averaged = [], []
    for start in range(0, max(len(images), 1), batch_size):  # an empty set still gives (0, classes)
        x = normalize(images[start : start + batch_size].to(device, non_blocking=True), mean, std)
        x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            probs = model(x).float().softmax(1)
            plain.append(probs)
            if flip_tta:
                averaged.append((probs + model(x.flip(-1)).float().softmax(1)) / 2)
    return torch.cat(plain), (torch.cat(averaged) if flip_tta else None)
