"""Batched, per-sample augmentation on the training device (the airbench design).

Random crop with zero (or reflect) padding, horizontal flip and cutout run as a few tensor ops over
the whole batch: no per-image Python work and no worker processes. The random numbers of
a whole epoch are drawn at its start from a generator seeded by (seed, epoch), so sample
i of epoch e is augmented the same way whatever the world size, and a resumed run
replays the same epoch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class EpochPlan:
    """Order and augmentation parameters of one epoch, one row per position."""

    order: torch.Tensor  # int64 (steps*batch,), indices into the training set
    shift: torch.Tensor  # int64 (steps*batch, 2), crop offsets in [0, 2*pad]
    flip: torch.Tensor  # bool (steps*batch,)
    cutout: torch.Tensor  # int64 (steps*batch, 2), cutout centres in [0, 32)
    batch: int  # images per step in these rows
    pad: int  # the zero padding the shifts were drawn for: augment pads by exactly this

    def _map(self, fn, batch: int | None = None) -> EpochPlan:
        order, shift, flip, cutout = (fn(t) for t in (self.order, self.shift, self.flip, self.cutout))
        return replace(self, order=order, shift=shift, flip=flip, cutout=cutout, batch=batch or self.batch)

    def to(self, device: torch.device) -> EpochPlan:
        return self._map(lambda t: t.to(device))

    def rows(self, step: int) -> EpochPlan:
        """The rows of one step."""
        part = slice(step * self.batch, (step + 1) * self.batch)
        return self._map(lambda t: t[part])

    def shard(self, rank: int, world: int) -> EpochPlan:
        """This rank's rows: each global batch is cut into `world` consecutive pieces."""

        def mine(t: torch.Tensor) -> torch.Tensor:
            steps = len(self.order) // self.batch
            t = t.view(steps, world, self.batch // world, *t.shape[1:])[:, rank]
            return t.reshape(-1, *t.shape[2:])

        return self._map(mine, batch=self.batch // world)


def plan_epoch(
    n_images: int,
    global_batch: int,
    seed: int,
    epoch: int,
    pad: int = 4,
    size: int = 32,
    alternate_flip: bool = False,
) -> EpochPlan:
    """Shuffle and draw augmentation for one epoch.

    The order is padded by wrapping around so every step has exactly `global_batch` images
    (as DistributedSampler pads): the last batch is never a stub of a few images.
    With `alternate_flip` (airbench's derandomised flip) each image is flipped at random in
    epoch 0 and then every other epoch: any two consecutive epochs show it both ways round.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = -(-n_images // global_batch)
    perm = torch.randperm(n_images, generator=gen)
    order = perm.repeat(-(-steps * global_batch // n_images))[: steps * global_batch]
    n = len(order)
    shift = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    if alternate_flip:  # drawn once per run, from the seed alone; crops and cutout stay as drawn
        first = torch.rand(n_images, generator=torch.Generator().manual_seed(seed)) < 0.5
        flip = first[order] ^ bool(epoch % 2)
    cutout = torch.randint(0, size, (n, 2), generator=gen)
    return EpochPlan(order, shift, flip, cutout, global_batch, pad)


def augment(
    images: torch.Tensor, rows: EpochPlan, cutout_size: int = 8, padding: str = "zero"
) -> torch.Tensor:
    """Crop (after padding by `rows.pad`: zeros, or the image mirrored at its edge with
    `padding="reflect"`), flip and cut out, each sample with its own parameters, the ones
    `rows` holds for it.

    images: (B,C,H,W) of any dtype on any device; returns the same shape and dtype.
    """
    shift, flip, cutout, pad = rows.shift, rows.flip, rows.cutout, rows.pad
    b, c, h, w = images.shape
    device = images.device
    if pad > 0:
        mode = "reflect" if padding == "reflect" else "constant"  # reflect: as evaluate.py's TTA shifts
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode=mode)
        row_idx = (shift[:, 0:1] + torch.arange(h, device=device)).view(b, 1, h, 1)
        col_idx = (shift[:, 1:2] + torch.arange(w, device=device)).view(b, 1, 1, w)
        batch_idx = torch.arange(b, device=device).view(b, 1, 1, 1)
        chan_idx = torch.arange(c, device=device).view(1, c, 1, 1)
        images = padded[batch_idx, chan_idx, row_idx, col_idx]
    images = torch.where(flip.view(b, 1, 1, 1), images.flip(-1), images)
    if cutout_size > 0:
        ys = torch.arange(h, device=device).view(1, h, 1)
        xs = torch.arange(w, device=device).view(1, 1, w)
        cy, cx = cutout[:, 0].view(b, 1, 1), cutout[:, 1].view(b, 1, 1)
        half = cutout_size // 2
        # A square of side cutout_size around the centre, clipped at the border.
        hole = (
            (ys >= cy - half)
            & (ys < cy - half + cutout_size)
            & (xs >= cx - half)
            & (xs < cx - half + cutout_size)
        )
        images = images.masked_fill(hole.unsqueeze(1), 0)
    return images
