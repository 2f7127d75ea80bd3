"""evaluate.py's whole run against a bare forward pass over the same test images.

    python benchmarks/evaluate_speed.py --data ../shared/data/cifar10-jpg.tar.gz [--ckpt best.pt]

Both see decoded data (the cache is warmed first) and use the same device, precision,
memory format and batch size. The bare pass is only the forward over the test tensor (with the
BatchNorms folded, as predict_probs runs it; the unfolded forward is timed beside it);
evaluate.py also loads the checkpoint and data, computes the metrics and writes its
pictures and files. Without --ckpt a freshly initialised model is saved and used (speed
does not depend on the weights). Last line: `bare_s=<s> evaluate_s=<s> ratio=<evaluate/bare>`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import evaluate  # noqa: E402
from common import hardware  # noqa: E402
from common.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from common.data import CIFAR10_MEAN, CIFAR10_STD, load_splits, normalize  # noqa: E402
from common.model import build_model  # noqa: E402
from common.options import Parser, UsageError, command, positive_int  # noqa: E402
from common.predict import predict_probs  # noqa: E402


@command
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="evaluate_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data source (default: torchvision download)")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: a freshly initialised model)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=1000)
    args = p.parse_args(argv)
    if args.ckpt:
        load_checkpoint(args.ckpt)  # a missing or broken file: one line now, not after decoding the data
    with tempfile.TemporaryDirectory(prefix="evaluate-speed-") as work:  # evaluate.py's files: not kept
        return measure(args, Path(work))


def measure(args, work: Path) -> int:
    splits = load_splits(args.data)  # decode once: both timings below read the cache
    ckpt = args.ckpt
    if ckpt is None:
        ckpt = work / "fresh.pt"
        save_checkpoint(
            {
                "model": build_model().state_dict(),
                "classes": splits.test.classes,
                "mean": list(CIFAR10_MEAN),
                "std": list(CIFAR10_STD),
                "epoch": 0,
                "config": {"data": args.data},
            },
            ckpt,
        )

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    precision = hardware.default_precision(accelerator)
    device = torch.device(accelerator)
    model = model_from_checkpoint(load_checkpoint(ckpt)).to(device, memory_format=torch.channels_last)
    images = splits.test.images.to(device)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)

    def bare() -> float:
        if accelerator == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_probs(model, images, mean, std, args.batch_size, hardware.autocast_dtype(precision))
        return time.perf_counter() - start

    def unfolded() -> float:
        """The same forward with the BatchNorms left unfolded: what predict_probs's folding gains."""
        autocast = hardware.autocast_dtype(precision)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            for i in range(0, len(images), args.batch_size):
                x = normalize(images[i : i + args.batch_size], mean.to(device), std.to(device))
                model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1).cpu()
        return time.perf_counter() - start

    bare()  # warm-up
    bare_s = min(bare() for _ in range(2))
    unfolded_s = min(unfolded() for _ in range(2))
    start = time.perf_counter()
    code = evaluate.main(
        [
            "--ckpt",
            str(ckpt),
            "--out",
            str(work),
            "--accelerator",
            accelerator,
            "--batch-size",
            str(args.batch_size),
        ]
        + (["--data", args.data] if args.data else [])
    )
    evaluate_s = time.perf_counter() - start
    if code != 0:
        raise UsageError(f"evaluate.py stopped with exit code {code} (its message is above)")
    print(
        f"\ndevice {accelerator}, precision {precision}, {len(images):,} test images, batch {args.batch_size}"
    )
    print(
        f"bare forward {bare_s:.2f}s ({len(images) / bare_s:,.0f} img/s; with the BatchNorms unfolded "
        f"{unfolded_s:.2f}s, {len(images) / unfolded_s:,.0f} img/s); evaluate.py {evaluate_s:.2f}s"
    )
    print(f"bare_s={bare_s:.2f} evaluate_s={evaluate_s:.2f} ratio={evaluate_s / bare_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
