import pytest
import torch

from common.augment import EpochPlan, augment, plan_epoch


def rows_of(shift: torch.Tensor, flip: torch.Tensor, cutout: torch.Tensor, pad: int) -> EpochPlan:
    """One step's rows with these augmentation parameters."""
    n = len(shift)
    return EpochPlan(torch.arange(n), shift, flip, cutout, n, pad)


@pytest.mark.parametrize("pad", [2, 4])  # train.py's default and the padding before it
def test_crop_and_flip_are_per_sample(pad):
    images = torch.arange(4 * 3 * 32 * 32, dtype=torch.int64).view(4, 3, 32, 32) % 251 + 1
    shift = torch.tensor([[0, 0], [pad, pad], [2 * pad, 1], [1, 2 * pad]])
    flip = torch.tensor([False, False, True, True])
    out = augment(images, rows_of(shift, flip, torch.zeros(4, 2, dtype=torch.int64), pad=pad), cutout_size=0)
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    for i in range(4):
        dy, dx = shift[i].tolist()
        expected = padded[i, :, dy : dy + 32, dx : dx + 32]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected), f"sample {i}"
    assert torch.equal(out[1], images[1])  # shift (pad, pad) without flip is the identity
    assert (out[0, :, :pad, :] == 0).all() and (out[0, :, pad:, pad:] > 0).all()  # zeros at the top-left


def test_cutout_blanks_one_square_per_sample():
    images = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    centres = torch.tensor([[10, 10], [0, 31]])
    out = augment(
        images, rows_of(torch.full((2, 2), 4), torch.tensor([False, False]), centres, pad=4), cutout_size=8
    )
    assert (out[0, :, 6:14, 6:14] == 0).all() and (out[0] == 0).sum() == 3 * 64
    assert (out[1, 0, :4, 27:] == 0).all() and (out[1] == 0).sum() == 3 * 4 * 5  # clipped at the corner
    assert out.dtype == torch.uint8


def test_epoch_plan_is_seeded_and_covers_every_image():
    a, b = plan_epoch(50, 16, seed=3, epoch=1), plan_epoch(50, 16, seed=3, epoch=1)
    assert torch.equal(a.order, b.order) and torch.equal(a.shift, b.shift)
    assert not torch.equal(a.order, plan_epoch(50, 16, seed=3, epoch=2).order)
    assert len(a.order) == 64 and set(a.order.tolist()) == set(range(50))
    assert a.shift.min() >= 0 and a.shift.max() <= 8
    assert 0.2 < a.flip.float().mean() < 0.8


def test_shards_are_disjoint_and_make_up_each_global_batch():
    plan = plan_epoch(40, 8, seed=0, epoch=0)
    shards = [plan.shard(rank, 2) for rank in range(2)]
    for step in range(5):
        rows = [s.order[step * 4 : (step + 1) * 4] for s in shards]
        assert set(rows[0].tolist()).isdisjoint(rows[1].tolist())
        assert sorted(torch.cat(rows).tolist()) == sorted(plan.order[step * 8 : (step + 1) * 8].tolist())


def flips_by_image(plan, n_images: int) -> torch.Tensor:
    flipped = torch.zeros(n_images, dtype=torch.bool)
    flipped[plan.order] = plan.flip
    return flipped


def test_alternate_flip_shows_each_image_both_ways_in_consecutive_epochs():
    plans = [plan_epoch(64, 16, seed=5, epoch=e, alternate_flip=True) for e in range(3)]
    flips = [flips_by_image(p, 64) for p in plans]
    assert 0.2 < flips[0].float().mean() < 0.8  # the first epoch is still a coin toss per image
    assert (flips[0] ^ flips[1]).all() and (flips[1] ^ flips[2]).all()
    random = plan_epoch(64, 16, seed=5, epoch=1)  # only the flips differ from the random plan
    assert torch.equal(random.order, plans[1].order) and torch.equal(random.shift, plans[1].shift)


@pytest.mark.parametrize("pad", [0, 2, 4])
def test_crop_pad_bounds_the_shift(pad):
    plan = plan_epoch(200, 50, seed=1, epoch=0, pad=pad)
    assert plan.shift.min() == 0 and plan.shift.max() == 2 * pad  # every offset in [0, 2 * pad] drawn
    images = torch.randint(1, 255, (4, 3, 32, 32), dtype=torch.uint8)
    rows = plan.rows(0)
    rows = rows_of(rows.shift[:4], torch.zeros(4, dtype=torch.bool), rows.cutout[:4], rows.pad)
    out = augment(images, rows, cutout_size=0)
    assert out.shape == images.shape and (pad > 0 or torch.equal(out, images))


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_reflect_padding_mirrors_the_image_at_its_edge(pad):
    images = torch.randint(1, 255, (5, 3, 32, 32), dtype=torch.uint8)  # no zero pixel anywhere
    shift = torch.tensor([[0, 0], [2 * pad, 2 * pad], [0, 2 * pad], [pad, 0], [pad, pad]])
    rows = rows_of(shift, torch.zeros(5, dtype=torch.bool), torch.zeros(5, 2, dtype=torch.int64), pad)
    out = augment(images, rows, cutout_size=0, padding="reflect")
    mirrored = torch.nn.functional.pad(images.float(), (pad,) * 4, mode="reflect").to(torch.uint8)
    for i, (dy, dx) in enumerate(shift.tolist()):
        assert torch.equal(out[i], mirrored[i, :, dy : dy + 32, dx : dx + 32]), f"sample {i}"
    assert (out > 0).all()  # nothing brought in is black, unlike zero padding
