"""A second pass of the JPEG copy's own compression: how much does one pass cost?

    python benchmarks/recompress.py ../shared/data/cifar10-jpg.tar.gz /tmp/cifar10-jpg2
    python benchmarks/time_to_accuracy.py --data /tmp/cifar10-jpg2 -- --epochs 8 --seed 2

The original CIFAR-10 is not on this machine, so the copy's cost (JPEG quality 75, colour at
4:2:0) cannot be measured against it. This writes the copy again with the same compression, on a
block grid moved by 3 px (odd, so the colour's 2x2 pairs move too; on the copy's own grid a
second pass changes almost nothing): every image is reflect-padded to 40x40 (3 px top and left,
5 px bottom and right), saved at quality 75 with 4:2:0, decoded and cropped back to its 32x32.
Training the same recipe on both copies gives what a second pass costs; a first pass, on
sharper images with more to lose, is expected to cost at least as much (expected, not shown).
It prints the mean PSNR between the copy and its second pass.
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

PAD_BEFORE, PAD_AFTER = 3, 5  # 32 + 8 = 40: whole 8x8 blocks, the grid 3 px off the image's


def second_pass(img: np.ndarray, quality: int = 75) -> np.ndarray:
    """img (32,32,3) uint8 -> the same compression again on a grid moved by PAD_BEFORE px."""
    padded = np.pad(img, ((PAD_BEFORE, PAD_AFTER), (PAD_BEFORE, PAD_AFTER), (0, 0)), mode="reflect")
    buf = io.BytesIO()
    Image.fromarray(padded).save(buf, "JPEG", quality=quality, subsampling=2)  # 2: 4:2:0
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return decoded[PAD_BEFORE : PAD_BEFORE + 32, PAD_BEFORE : PAD_BEFORE + 32]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", type=Path, help="the JPEG copy's .tar.gz (image-folder layout)")
    p.add_argument("out", type=Path, help="folder to write the second pass to (PNG, lossless)")
    args = p.parse_args()
    if not args.archive.is_file():
        p.error(f"no such file: {args.archive}")
    scores = []
    with tarfile.open(args.archive) as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".jpg")):
                continue
            img = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
            again = second_pass(img)
            scores.append(psnr(img, again))
            split, label, name = Path(member.name).parts[-3:]
            target = args.out / split / label / (Path(name).stem + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(again).save(target)
    finite = [s for s in scores if math.isfinite(s)]  # an image the pass left unchanged has none
    unchanged = len(scores) - len(finite)
    print(f"images={len(scores)} mean_psnr_db={sum(finite) / len(finite):.2f} unchanged={unchanged}")


if __name__ == "__main__":
    main()
