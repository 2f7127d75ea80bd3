"""Training throughput: train.py's real step against a bare loop, in one process.

    python benchmarks/throughput.py                      # CPU here, the GPU where there is one
    python benchmarks/throughput.py --batch-size 512 --steps 20 --compile
    python benchmarks/throughput.py --blocks 1 --profile     # where the step's time goes

(a) bare: forward, backward and optimizer step on one fixed, already normalised batch.
(b) train: train.py's `train_step` (indexing the device-resident uint8 set, per-sample
    crop/flip/cutout, normalisation, the step, the one-cycle schedule) plus the loop's on-device sums.
Both use the same Fabric precision, memory format and model. Blocks of (a) and (b) are
interleaved and the median block is reported, so drift in the machine's speed hits both.
The last line is `bare=<img/s> train=<img/s> ratio=<train/bare>`. A line above it (above
`--profile`'s table, when asked) puts the bare step against the device's own arithmetic: the
step's FLOPs (convolutions and matmuls, forward and backward, counted by
torch.utils.flop_counter) per second, as a fraction of what one large matmul in the step's
dtype reaches on the same device.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402  (the real training step)
from common import hardware  # noqa: E402
from common.augment import plan_epoch  # noqa: E402
from common.data import CIFAR10_MEAN, CIFAR10_STD, Dataset  # noqa: E402
from common.model import build_model  # noqa: E402
from common.options import Parser, command, positive_int  # noqa: E402


@command
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default="auto", choices=hardware.PRECISIONS)
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: 128 on CPU, 512 on GPU")
    p.add_argument(
        "--steps", type=positive_int, default=None, help="steps per timed block (default: 4 CPU, 50 GPU)"
    )
    p.add_argument("--blocks", type=positive_int, default=3, help="timed blocks of each kind (default 3)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: as train.py, on for CUDA)",
    )
    p.add_argument("--profile", action="store_true", help="print the top ops of one bare block")
    args = p.parse_args(argv)

    hardware.prepare_backend()
    config = train.TrainConfig(
        accelerator=args.accelerator,
        precision=args.precision,
        compile=args.compile,
        batch_size=args.batch_size or 1,
    ).for_device()
    on_gpu = config.accelerator == "cuda"
    batch = args.batch_size or (512 if on_gpu else 128)
    steps = args.steps or (50 if on_gpu else 4)
    config = replace(config, batch_size=batch, lr=0.01)
    accelerator, precision, compile_model = config.accelerator, config.precision, config.compile

    fabric = train.make_fabric(replace(config, logger="none"), Path("."))
    fabric.launch()
    device = fabric.device
    torch.manual_seed(0)
    net = build_model().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n_images = batch * steps
    total_steps = (args.blocks + 1) * steps * 2 + 10
    scheduler = train.one_cycle(optimizer, total_steps, config.warmup, config.lr_start, config.lr_end)
    model, optimizer = fabric.setup(torch.compile(net) if compile_model else net, optimizer)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n_images,), generator=gen)
    synthetic = Dataset(images, labels, [str(c) for c in range(10)]).to(device)
    mean, std = torch.tensor(CIFAR10_MEAN, device=device), torch.tensor(CIFAR10_STD, device=device)
    first = plan_epoch(n_images, batch, seed=0, epoch=0, pad=config.crop_pad).to(device).rows(0)
    fixed_x, fixed_y = train.training_batch(synthetic, first, mean, std, config)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def bare_block() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(fixed_x), fixed_y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
        sync()
        return batch * steps / (time.perf_counter() - start)

    epoch = [0]

    def train_block() -> float:
        plan = plan_epoch(n_images, batch, seed=0, epoch=epoch[0], pad=config.crop_pad).to(device)
        epoch[0] += 1
        totals = torch.zeros(2, device=device, dtype=torch.float64)
        sync()
        start = time.perf_counter()
        for step in range(steps):
            x, y = train.training_batch(synthetic, plan.rows(step), mean, std, config)
            loss, correct = train.train_step(
                fabric, model, optimizer, scheduler, x, y, config.label_smoothing
            )
            totals += torch.stack([loss * batch, correct])
        totals.tolist()  # the epoch's one read of the sums
        sync()
        return batch * steps / (time.perf_counter() - start)

    flops_per_image = step_flops(net, fixed_x, fixed_y) / batch
    print(
        f"device {accelerator} ({torch.cuda.get_device_name() if on_gpu else hardware.cpu_name()}), "
        f"precision {precision}, channels_last, compile {'on' if compile_model else 'off'}, "
        f"batch {batch}, {steps} steps x {args.blocks} blocks each",
        flush=True,
    )
    start = time.perf_counter()
    bare_block(), train_block()  # warm-up: allocator, cudnn autotune, compile
    print(f"warm-up {time.perf_counter() - start:.1f}s", flush=True)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    bare, real = [], []
    for block in range(args.blocks):
        bare.append(bare_block())
        real.append(train_block())
        print(f"block {block + 1}: bare {bare[-1]:,.1f} img/s, train {real[-1]:,.1f} img/s", flush=True)
    if on_gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(
            f"peak process memory (RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        )
    b, t = statistics.median(bare), statistics.median(real)
    size, dtype = (8192 if on_gpu else 2048), hardware.autocast_dtype(precision) or torch.float32
    peak = matmul_rate(device, dtype, size, sync)
    step_rate = b * flops_per_image
    print(
        f"bare step {flops_per_image / 1e9:.2f} GFLOP an image, {step_rate / 1e9:,.1f} GFLOP/s: "
        f"{step_rate / peak:.2f} of a {size}x{size} {str(dtype).removeprefix('torch.')} matmul here "
        f"({peak / 1e9:,.1f} GFLOP/s)"
    )
    if args.profile:
        print_profile(bare_block, on_gpu)
    print(f"bare={b:.1f} train={t:.1f} ratio={t / b:.3f}")
    return 0


def print_profile(block, on_gpu: bool) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        block()
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=36))


def step_flops(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Forward and backward FLOPs of one batch (2 per multiply-add), counted on the eager model."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, sync) -> float:
    """FLOP/s of an n x n matmul, repeated for at least a second."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
        sync()
    return reps * 2 * n**3 / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
