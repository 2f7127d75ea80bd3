"""Train the CIFAR ResNet-18 on CIFAR-10 with Lightning Fabric.

    python train.py                                  # torchvision download, defaults
    python train.py --data ../shared/data/cifar10-jpg.tar.gz --subset 2000 --epochs 2
    torchrun --nproc_per_node=2 train.py --accelerator cpu
    python train.py --resume last.pt                 # continue an interrupted run

Reads top to bottom: arguments, data, model, the epoch loop, save, summary.
The training set lives on the device as one uint8 tensor; augmentation runs batched there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import enum
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from tqdm import tqdm

from common import hardware, results
from common.atomic import atomic_write, remove_stale_temporaries
from common.augment import EpochPlan, augment, plan_epoch
from common.checkpoint import (
    CheckpointError,
    git_commit,
    in_checkpoint_order,
    library_versions,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from common.data import (
    DATASETS,
    DOWNLOADED,
    Dataset,
    balanced_subset,
    channel_stats,
    load_training_splits,
    normalize,
    split_off_validation,
)
from common.lock import hold_folder, remove_if_unused
from common.model import build_model, folded_for_inference, summary_lines
from common.options import (
    Parser,
    UsageError,
    add_accelerator_option,
    add_data_option,
    command,
    non_negative_int,
    positive_float,
    positive_int,
)
from common.plots import plot_curves
from common.predict import predict_probs
from common.report import write_report

BATCH = 128  # the default global batch on a full training set (benchmarks/recipes.md)
LR_PER_BATCH = 0.2  # the default peak lr at that batch, scaled with the square root of the batch
WHITEN_IMAGES = 5000  # at most this many training images' patches measure --whiten-stem (airbench's)
MIN_STEPS = 50  # optimizer steps per epoch below which the default batch is halved
REFRESH_EVERY = 10  # steps between progress-bar refreshes on a GPU, the only host syncs in an epoch
LOGGERS = ("csv", "tensorboard", "none")
FLIPS = ("random", "alternate")
PADDINGS = ("zero", "reflect")
METRIC_COLUMNS = "epoch train_loss train_acc monitor_loss monitor_acc lr epoch_s img_per_s score_s".split()


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings, checked once. Stored in the checkpoint as a plain dict, so that
    `torch.load(..., weights_only=True)` reads it and `--resume` restores it."""

    epochs: int = 20
    batch_size: int | None = None  # None: BATCH, or smaller for a small training set (batch_for)
    lr: float | None = None  # the peak; None: default_lr(batch_size)
    warmup: float = 0.2  # share of the steps over which the lr rises to the peak
    lr_start: float = 0.2  # the first step's lr, as a share of the peak
    lr_end: float = 0.0  # the last step's lr, as a share of the peak
    weight_decay: float = 5e-4
    decay_norms: bool = True  # weight decay on BatchNorm weights and on biases too
    norm_bias_lr: float = 4.0  # the BatchNorm biases' lr, as a multiple of the others' (airbench's)
    momentum: float = 0.9
    label_smoothing: float = 0.1
    cutout: int = 0
    crop_pad: int = 2  # padding before the random crop; 2 px beat 4 on the mean at every set size measured
    padding: str = "zero"  # what the crop shifts bring in at the edge: zeros or the mirrored image
    flip: str = "random"  # random: each image a coin toss per epoch; alternate: see plan_epoch
    data: str | None = None  # None: torchvision's download of `dataset`
    dataset: str = "cifar10"  # what torchvision downloads: cifar10 or cifar100
    subset: int | None = None
    val_split: int | None = None
    seed: int = 0
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int = 1
    compile: bool | None = None  # None: on for CUDA
    dist_timeout: int = 300
    ema: float = 0.0
    lookahead: bool = False
    whiten_stem: bool = False  # start conv1 as a whitening of the training images' 3x3 patches
    logger: str = "csv"  # live logs: csv, tensorboard or none

    def __post_init__(self) -> None:
        checks = [
            (
                0 <= self.label_smoothing < 1,
                f"--label-smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 < self.warmup < 1, f"--warmup must be in (0, 1), got {self.warmup}"),
            (0 <= self.lr_start <= 1, f"--lr-start must be in [0, 1], got {self.lr_start}"),
            (0 <= self.lr_end <= 1, f"--lr-end must be in [0, 1], got {self.lr_end}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (
                math.isfinite(self.norm_bias_lr) and self.norm_bias_lr > 0,
                f"--norm-bias-lr must be a number > 0, got {self.norm_bias_lr}",
            ),
            (self.padding in PADDINGS, f"--padding must be one of {', '.join(PADDINGS)}, got {self.padding}"),
            (
                self.padding != "reflect" or self.crop_pad < 32,
                f"--padding reflect mirrors at most 31 px of a 32 px image, got --crop-pad {self.crop_pad}",
            ),
            (self.flip in FLIPS, f"--flip must be one of {', '.join(FLIPS)}, got {self.flip}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """A checkpoint's config. Keys this version does not know are ignored; keys an older
        version did not write take the values that version used."""
        names = {f.name for f in fields(cls)}
        return cls(**{**LEGACY, **{k: v for k, v in saved.items() if k in names}})

    def for_device(self) -> TrainConfig:
        """'auto' choices made for this machine (printed at start, stored in the checkpoint)."""
        accelerator = hardware.resolve_accelerator(self.accelerator)
        precision = hardware.default_precision(accelerator) if self.precision == "auto" else self.precision
        if accelerator == "cpu" and precision == "16-mixed":
            raise UsageError("--precision 16-mixed needs a CUDA GPU; on the CPU use bf16-mixed or 32-true")
        compile_model = accelerator == "cuda" if self.compile is None else self.compile
        return replace(self, accelerator=accelerator, precision=precision, compile=compile_model)

    def for_data(self, n_train: int, world: int) -> tuple[TrainConfig, str]:
        """The batch and lr the user left to us, for this training set: (config, why, in words)."""
        batch, why = (self.batch_size, "") if self.batch_size else batch_for(n_train, world)
        if batch % world:
            raise UsageError(f"--batch-size {batch} must divide evenly over {world} processes")
        reasons = [why] if why else []
        lr = default_lr(batch) if self.lr is None else self.lr
        if self.lr is None and batch != BATCH:
            reasons.append(f"peak lr {lr:.3g}, {LR_PER_BATCH:g} x sqrt(batch/{BATCH})")
        return replace(self, batch_size=batch, lr=lr), "; ".join(reasons)


def default_lr(batch: int) -> float:
    """LR_PER_BATCH scaled with the square root of the batch: on the smoke run (2,000 images,
    batch 32) it learned more than linear scaling did (benchmarks/recipes.md)."""
    return LR_PER_BATCH * math.sqrt(batch / BATCH)


def batch_for(n_train: int, world: int) -> tuple[int, str]:
    """BATCH, halved while an epoch would have fewer than MIN_STEPS steps (not below 16 images
    per process), and rounded down to a multiple of the processes: a small run still takes
    enough optimizer steps to learn. Returns (batch, why in words; '' for BATCH)."""
    if world > BATCH:
        raise UsageError(f"the default batch of {BATCH} does not split over {world} processes: "
                         "pass --batch-size")  # fmt: skip
    halved = BATCH
    while math.ceil(n_train / halved) < MIN_STEPS and halved // 2 >= 16 * world:
        halved //= 2
    batch = halved - halved % world
    reasons = []
    if halved != BATCH:
        steps = math.ceil(n_train / batch)
        reasons.append(
            f"so that an epoch of {n_train:,} images has {steps} steps (at least {MIN_STEPS} where it can)"
        )
    if batch != halved:
        reasons.append(f"a multiple of the {world} processes")
    return batch, f"batch {batch}, not {BATCH}, " + " and ".join(reasons) if reasons else ""


CONFIG_FLAGS = {f.name for f in fields(TrainConfig)}
# What runs written before these settings existed used: their --resume continues the same way.
LEGACY = {
    "crop_pad": 4,
    "flip": "random",
    "padding": "zero",
    "warmup": 0.25,
    "lr_start": 1 / 20,
    "lr_end": 1 / 4000,
    "decay_norms": True,
    "dataset": "cifar10",
    "norm_bias_lr": 1.0,
}
RESUME_FREE = {"dist_timeout", "logger"}  # may change on --resume


def parse_args(argv: list[str] | None) -> dict:
    """The flags the user typed, and only those: defaults come from TrainConfig (or --resume)."""
    d = TrainConfig()
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    data = p.add_argument_group("data")
    add_data_option(
        data, "default: download the original CIFAR-10 (or --dataset) into ./data", argparse.SUPPRESS
    )
    data.add_argument(
        "--dataset", choices=DATASETS, help=f"what to download without --data (default {d.dataset})"
    )
    data.add_argument(
        "--subset", type=positive_int, metavar="N", help="train on N training images, balanced over classes"
    )
    data.add_argument(
        "--val-split",
        type=positive_int,
        metavar="N",
        help="hold N training images out for validation: best.pt is then the best validation epoch, "
        "and a temperature is fitted on them for calibrated confidences",
    )
    recipe = p.add_argument_group("the recipe (README: What the choices are)")
    recipe.add_argument("--epochs", type=positive_int, metavar="N", help=f"epochs (default {d.epochs})")
    recipe.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help=f"global batch, split over processes (default {BATCH}, halved while an epoch would "
        f"have fewer than {MIN_STEPS} steps)",
    )
    recipe.add_argument(
        "--lr", type=positive_float, help=f"peak learning rate (default {LR_PER_BATCH} x sqrt(batch/{BATCH}))"
    )
    shares = {
        "--warmup": "share of the steps over which the lr rises to its peak",
        "--lr-start": "the first step's lr, as a share of the peak",
        "--lr-end": "the last step's lr, as a share of the peak",
    }
    for flag, text in shares.items():
        default = getattr(d, flag[2:].replace("-", "_"))
        recipe.add_argument(flag, type=float, metavar="SHARE", help=f"{text} (default {default:g})")
    recipe.add_argument(
        "--weight-decay", type=float, metavar="WD", help=f"SGD weight decay (default {d.weight_decay})"
    )
    recipe.add_argument(
        "--decay-norms",
        action=argparse.BooleanOptionalAction,
        help=f"weight decay on BatchNorm weights and biases too (default {'on' if d.decay_norms else 'off'})",
    )
    recipe.add_argument(
        "--norm-bias-lr",
        type=float,
        metavar="SCALE",
        help=f"the BatchNorm biases' lr as a multiple of the others', their weight decay divided by it "
        f"(default {d.norm_bias_lr:g})",
    )
    recipe.add_argument(
        "--label-smoothing",
        type=float,
        metavar="EPS",
        help=f"label smoothing of the training loss (default {d.label_smoothing})",
    )
    recipe.add_argument(
        "--cutout",
        type=non_negative_int,
        metavar="PX",
        help=f"side of the square cut out of each image, 0 = off (default {d.cutout})",
    )
    recipe.add_argument(
        "--crop-pad",
        type=non_negative_int,
        metavar="PX",
        help="padding around each image before the random 32x32 crop (--padding), i.e. shifts of up to "
        f"PX pixels, 0 = no crop (default {d.crop_pad})",
    )
    recipe.add_argument(
        "--padding",
        choices=PADDINGS,
        help=f"what crop shifts bring in at the edge: zeros or the mirrored image (default {d.padding})",
    )
    recipe.add_argument(
        "--flip",
        choices=FLIPS,
        help="horizontal flips: a coin toss per image and epoch, or alternate (random in the first "
        f"epoch, then each image the other way round from its last epoch) (default {d.flip})",
    )
    recipe.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help=f"keep a moving average of the weights, decaying by DECAY a step, and score and save it "
        f"(default {d.ema:g}{': off' if not d.ema else ''})",
    )
    recipe.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        help="every 5 steps pull the weights back toward a slow average of themselves, harder as the "
        f"run goes on (airbench's lookahead; default {'on' if d.lookahead else 'off'})",
    )
    recipe.add_argument(
        "--whiten-stem",
        action=argparse.BooleanOptionalAction,
        help="start the stem's 3x3 convolution as a whitening of the training images' 3x3 patches: "
        "54 of its 64 filters are the patches' principal directions, each + and -, scaled by "
        f"1/sqrt(variance) (airbench's init; default {'on' if d.whiten_stem else 'off'})",
    )
    recipe.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    run = p.add_argument_group("the run")
    run.add_argument(
        "--out", metavar="DIR", help="results folder (default: the current one, or the --resume checkpoint's)"
    )
    run.add_argument("--resume", metavar="CKPT", help="continue from this last.pt")
    run.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    run.add_argument(
        "--logger",
        choices=LOGGERS,
        help=f"live logs in --out/{results.LOGS}/ through Fabric's loggers: each step's loss and lr, "
        f"each epoch's metrics (default {d.logger}; tensorboard needs `pip install tensorboard`)",
    )
    device = p.add_argument_group("device and processes")
    device.add_argument(
        "--precision",
        choices=hardware.PRECISIONS,
        help="default auto: the fastest correct one for the device (printed at start)",
    )
    add_accelerator_option(device, argparse.SUPPRESS)
    device.add_argument(
        "--devices",
        type=positive_int,
        metavar="N",
        help="processes on this machine (default 1; under torchrun, torchrun decides)",
    )
    device.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model (default: on for CUDA, off on the CPU, where it was slower)",
    )
    device.add_argument(
        "--dist-timeout",
        type=positive_int,
        metavar="SECONDS",
        help=f"how long a rank waits for the others before giving up (default {d.dist_timeout})",
    )
    return vars(p.parse_args(argv))  # fmt: skip


def build_config(args: dict, resumed: dict | None) -> TrainConfig:
    """TrainConfig's defaults, or the resumed run's config, overridden by what the user typed."""
    given = {k: v for k, v in args.items() if k in CONFIG_FLAGS}
    if given.get("data") is not None:  # absolute, so evaluate/explain/--resume work from anywhere
        given["data"] = os.path.abspath(given["data"])
    if resumed is None:
        return TrainConfig(**given)
    saved = TrainConfig.from_dict(resumed["config"])
    for key, value in given.items():
        if key in RESUME_FREE or (key in ("precision", "accelerator") and value == "auto"):
            continue
        if key == "accelerator":
            value = hardware.resolve_accelerator(value)
        if value != getattr(saved, key):
            raise UsageError(
                f"--{key.replace('_', '-')} {args[key]} conflicts with the resumed run's "
                f"{getattr(saved, key)}; drop the flag to continue that run"
            )
    return replace(saved, **{k: v for k, v in given.items() if k in RESUME_FREE})


# --- the pieces a run is made of -------------------------------------------------------------


def make_loggers(name: str, out: Path) -> list:
    """Fabric's own loggers, writing under out/logs/<name>/version_N/ (a resumed run starts
    the next version, as Lightning does)."""
    if name == "none":
        return []
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    root = out / results.LOGS
    try:
        if name == "csv":  # on disk as the steps reach it (Lightning's default: every 100 steps)
            return [CSVLogger(root_dir=root, name=name, flush_logs_every_n_steps=REFRESH_EVERY)]
        return [TensorBoardLogger(root_dir=root, name=name)]
    except ModuleNotFoundError:
        raise UsageError("--logger tensorboard needs TensorBoard: pip install tensorboard") from None


def make_fabric(config: TrainConfig, out: Path) -> Fabric:
    # Fabric announces its precision on stderr; the plan printed at the start says it, on stdout.
    for name in ("lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    world = hardware.torchrun_world()
    devices, num_nodes = world if world else (config.devices, 1)
    strategy = "auto"
    if devices * num_nodes > 1:
        strategy = DDPStrategy(timeout=timedelta(seconds=config.dist_timeout))
    if config.accelerator == "cuda" and world is None and devices > torch.cuda.device_count():
        raise UsageError(f"--devices {devices} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return Fabric(
        accelerator=config.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=config.precision,
        loggers=make_loggers(config.logger, out),
    )


def carry_best(source: Path, out: Path) -> None:
    """A run resumed into another folder takes its best.pt along: later epochs may not beat it."""
    if not (out / results.BEST).exists() and (source / results.BEST).exists():
        save_checkpoint(load_checkpoint(source / results.BEST), out / results.BEST)


def out_folder(args: dict, resumed: dict | None) -> Path:
    return Path(args.get("out") or (Path(args["resume"]).parent if resumed else "."))


@contextlib.contextmanager
def results_folder(fabric: Fabric, args: dict, resumed: dict | None) -> Iterator[Path]:
    """The results folder, held by this run for its duration (rank 0 holds the lock; every rank
    learns whether it could). Refused when another train.py holds it or when it holds another
    run (a finished one, or with --resume into it, not the run resumed). Nothing in it is
    touched here: clear_folder() does that once the run has passed every check. A folder made
    here (with any parents made for it) for a run refused before it wrote anything is removed
    again."""
    out = out_folder(args, resumed)
    if resumed and args.get("overwrite"):
        raise UsageError("--overwrite would delete the run --resume continues; drop one of them")
    made_here = [p for p in (out, *out.parents) if not p.exists()]  # out and the parents made for it
    out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as held:
            refusal = ""
            if fabric.is_global_zero:
                try:
                    held.enter_context(hold_folder(out))
                except UsageError as err:
                    refusal = str(err)
            if fabric.world_size > 1:
                refusal = fabric.broadcast(refusal)
            if refusal:
                raise UsageError(refusal)
            refuse_another_run(out, args, resumed)
            yield out
    except BaseException:
        if made_here and fabric.is_global_zero:
            remove_if_unused(*made_here)  # a run refused (bad data, say) leaves no empty folder behind
        raise


def refuse_another_run(out: Path, args: dict, resumed: dict | None) -> None:
    """A folder holding a run is trained in again only by --overwrite or by that run's --resume."""
    last = out / results.LAST
    if not last.exists():
        return
    if resumed is None and not args.get("overwrite"):
        raise UsageError(f"{last} exists: {what_to_do_with(last)}")
    if resumed and out.resolve() != Path(args["resume"]).resolve().parent:
        raise UsageError(
            f"{last} exists: --out {out} holds another run; to continue {args['resume']} elsewhere, "
            "pass a new --out"
        )
    if resumed and Path(args["resume"]).resolve() != last.resolve():
        refuse_rewinding(last, resumed, args["resume"])


def refuse_rewinding(last: Path, resumed: dict, path: str) -> None:
    """--resume best.pt (an earlier epoch) into its own folder would retrain over last.pt's later
    epochs: refused while last.pt is ahead of it."""
    try:
        later = load_checkpoint(last)
        theirs, ours = (
            (int(later["epoch"]), int(later["step"])),
            (int(resumed["epoch"]), int(resumed["step"])),
        )
    except (CheckpointError, KeyError, TypeError, ValueError):
        return  # an unreadable last.pt holds nothing to lose
    if theirs > ours:
        raise UsageError(
            f"{last} beside {path} is further on (epochs done, steps: {theirs} against {ours}): "
            f"resuming {path} here would train over it; resume {quoted(last)}, or pass another --out"
        )


def what_to_do_with(last: Path) -> str:
    """For a folder that holds a run: resume it if it is unfinished; otherwise start elsewhere."""
    try:
        ckpt = load_checkpoint(last)
        done, planned = int(ckpt["epoch"]), TrainConfig.from_dict(ckpt["config"]).epochs
    except (CheckpointError, UsageError, KeyError, TypeError, ValueError):
        return (
            f"pass --resume {quoted(last)} to continue that run, --overwrite to replace it, or another --out"
        )
    if done >= planned and (last.parent / results.SUMMARY).exists():
        return f"it holds a finished run ({planned} epochs): pass --overwrite to replace it, or another --out"
    if done >= planned:  # stopped after its last epoch, before the final writes
        return (f"its {planned} epochs are done but not its final writes: pass --resume {quoted(last)} to "
                "finish them, --overwrite to replace it, or another --out")  # fmt: skip
    return (f"pass --resume {quoted(last)} to continue that run (at epoch {done + 1} of {planned}) or "
            "--overwrite to replace it")  # fmt: skip


def quoted(path: Path | str) -> str:
    """A path as it must be typed in a shell command (spaces and all)."""
    return shlex.quote(str(path))


def clear_folder(fabric: Fabric, args: dict, resumed: dict | None, out: Path) -> None:
    """What --overwrite and --resume do to the results folder, once the data and the config have
    passed every check: a run refused for bad input has deleted nothing."""
    if fabric.is_global_zero:
        remove_stale_temporaries(out)
        if args.get("overwrite"):
            results.remove_results(out)
        if resumed:
            carry_best(Path(args["resume"]).parent, out)
    fabric.barrier()


@dataclass
class TrainingData:
    train: Dataset  # uint8 images, on the training device
    monitor: Dataset  # scored every epoch: the test set, or the validation split
    monitor_name: str  # "test", or "val" with --val-split
    source: str  # where the data came from, in words
    mean: list[float]  # per channel, of the training images used: the normalisation
    std: list[float]


def load_training_data(config: TrainConfig, device: torch.device, resumed: dict | None) -> TrainingData:
    splits = load_training_splits(config.data, config.dataset)
    if resumed:  # labelled as the run began
        splits = in_checkpoint_order(splits, list(resumed["classes"]))
    train, monitor, monitor_name = splits.train, splits.test, "test"
    if config.val_split:
        train, monitor = split_off_validation(train, config.val_split, config.seed)
        monitor_name = "val"
    if config.subset:
        train = balanced_subset(train, config.subset, config.seed)
    # A resumed run goes on normalising as it began (checkpoints from before the statistics were
    # measured hold CIFAR-10's published ones).
    mean, std = (resumed["mean"], resumed["std"]) if resumed else channel_stats(train.images)
    return TrainingData(train.to(device), monitor.to(device), monitor_name, splits.source, mean, std)


def one_cycle(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, start: float, end: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """OneCycle-style, stepped per batch: linear from `start` x the peak up to the peak (each
    group's lr) over the first `warmup` share of the steps, then linear down to `end` x the
    peak at the last step. Momentum stays at the optimizer's.
    """
    if total_steps < 3:
        raise UsageError(
            f"only {total_steps} optimizer step(s) in all; a warm-up and a decay need 3 or more: "
            "lower --batch-size or raise --epochs"
        )
    top = min(max(1, round(warmup * (total_steps - 1))), total_steps - 2)

    def factor(step: int) -> float:
        if step <= top:
            return start + (1 - start) * step / top
        return 1 + (end - 1) * min(1.0, (step - top) / (total_steps - 1 - top))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def whiten_stem(conv: torch.nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the first 2 x C*k*k filters of `conv` (C channels in, k x k) to the eigenvectors
    of the second-moment matrix of the k x k patches of `images` (normalised, N,C,H,W), each
    scaled by 1/sqrt(eigenvalue + eps), and to their negatives: each output channel then sees
    one principal direction of the patches at unit variance, the largest first (KellerJordan/
    airbench's whitening init, there frozen, here trained). Filters past 2 x C*k*k keep theirs
    (the stem has 64 for a 3x3x3 patch's 27 dimensions)."""
    k = conv.kernel_size
    dims = images.shape[1] * k[0] * k[1]
    moment, count = torch.zeros(dims, dims, dtype=torch.float64, device=images.device), 0
    for chunk in images.split(500):  # a chunk's patches at a time, not all 4.5 M of 5,000 images
        patches = F.unfold(chunk, k).transpose(1, 2).reshape(-1, dims).double()
        moment, count = moment + patches.T @ patches, count + len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0)  # one a row, largest first
    filters = filters.reshape(dims, *conv.weight.shape[1:]).to(conv.weight)
    conv.weight[: 2 * dims] = torch.cat([filters, -filters])


def parameter_groups(net: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """Weight decay on the convolution and linear weights; on BatchNorm weights and on
    biases only with `decay_norms` (they set scales and offsets, which decay only shrinks).
    With `norm_bias_lr` != 1 the BatchNorm biases get a group of their own, at that multiple
    of the lr and with the weight decay divided by it, so that a step decays them as much as
    the others (airbench's scaled BatchNorm biases). `config.lr` must be resolved (for_data)."""
    scaled = config.norm_bias_lr != 1
    norm_biases = [m.bias for m in net.modules() if scaled and isinstance(m, torch.nn.BatchNorm2d)]
    apart = {id(p) for p in norm_biases}
    rest = [p for p in net.parameters() if id(p) not in apart]
    decayed = [p for p in rest if p.ndim > 1 or config.decay_norms]
    others = [p for p in rest if not (p.ndim > 1 or config.decay_norms)]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    groups += [{"params": others, "weight_decay": 0.0}] if others else []
    if norm_biases:
        decay = config.weight_decay / config.norm_bias_lr if config.decay_norms else 0.0
        groups.append({"params": norm_biases, "lr": config.lr * config.norm_bias_lr, "weight_decay": decay})
    return groups


class WeightAverage:
    """An exponential moving average of the weights and of the BatchNorm statistics.

    The decay warms up, (1 + t) / (10 + t) after t updates until it reaches `decay`, so the
    random initial weights are forgotten at once: with a constant 0.999, 37 % of a
    1,000-step average would still be them. torch.optim.swa_utils.AveragedModel tests
    `n_averaged == 0` on the host at every update, a device sync per step; these fused
    lerps need none.
    """

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(net).eval()
        self.decay = decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, updates: int) -> None:
        """Fold in `net`'s weights; `updates` is how many updates came before this one."""
        weight = 1 - self.decay_at(updates)
        floats = [(a, b) for a, b in zip(self.model.buffers(), net.buffers()) if a.is_floating_point()]
        torch._foreach_lerp_(list(self.model.parameters()), list(net.parameters()), weight)
        torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], weight)
        for mine, theirs in zip(self.model.buffers(), net.buffers()):
            if not mine.is_floating_point():
                mine.copy_(theirs)


class Lookahead:
    """Lookahead (Zhang et al. 2019) as KellerJordan/airbench schedules it: every EVERY steps a
    slow copy of the weights and BatchNorm statistics moves `1 - decay` of the way to the
    trained ones, which then restart from it. decay = 0.95**EVERY * (steps done / total)**3:
    nothing early, while the weights should roam, a strong average by the end. The last step
    syncs too, so the run ends on the slow weights.
    """

    EVERY = 5

    def __init__(self, net: torch.nn.Module, total_steps: int) -> None:
        self.total_steps = total_steps
        self.slow = {name: t.detach().clone() for name, t in float_state(net).items()}

    def decay_at(self, steps_done: int) -> float:
        return 0.95**self.EVERY * (steps_done / self.total_steps) ** 3

    @torch.no_grad()
    def update(self, net: torch.nn.Module, steps_done: int) -> None:
        """After the optimizer step that made `steps_done` steps of the run."""
        if steps_done % self.EVERY and steps_done != self.total_steps:
            return
        fast, slow = list(float_state(net).values()), list(self.slow.values())
        torch._foreach_lerp_(slow, fast, 1 - self.decay_at(steps_done))
        torch._foreach_copy_(fast, slow)


def float_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights and float buffers (BatchNorm statistics), sharing `net`'s storage."""
    return {name: t for name, t in net.state_dict().items() if t.is_floating_point()}


@dataclass
class Training:
    """What the epoch loop works with, built once."""

    fabric: Fabric
    config: TrainConfig
    net: torch.nn.Module  # the plain model: its state_dict is what gets saved
    model: torch.nn.Module  # the same weights, set up by Fabric (DDP, precision, compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: WeightAverage | None
    lookahead: Lookahead | None
    data: TrainingData
    mean: torch.Tensor
    std: torch.Tensor
    steps_per_epoch: int
    out: Path


def build_training(fabric: Fabric, config: TrainConfig, data: TrainingData, out: Path) -> Training:
    fabric.seed_everything(config.seed, verbose=False)
    mean, std = (torch.tensor(v, device=fabric.device) for v in (data.mean, data.std))
    net = build_model(len(data.train.classes)).to(fabric.device)
    if config.whiten_stem:  # every k-th image, so that every class is in: folders are read class by class
        sample = data.train.images[:: math.ceil(len(data.train) / WHITEN_IMAGES)]
        whiten_stem(net.conv1, normalize(sample, mean, std))
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        parameter_groups(net, config), lr=config.lr, momentum=config.momentum, nesterov=True
    )
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = one_cycle(optimizer, total_steps, config.warmup, config.lr_start, config.lr_end)
    model, optimizer = fabric.setup(torch.compile(net) if config.compile else net, optimizer)
    ema = WeightAverage(net, config.ema) if config.ema else None
    lookahead = Lookahead(net, total_steps) if config.lookahead else None
    return Training(
        fabric=fabric,
        config=config,
        net=net,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        lookahead=lookahead,
        data=data,
        mean=mean,
        std=std,
        steps_per_epoch=steps_per_epoch,
        out=out,
    )


# --- the run's state and its checkpoint ------------------------------------------------------


@dataclass
class EpochSums:
    """Running sums of an epoch over all ranks: what a stopped epoch resumes from."""

    loss: float = 0.0  # sum of the per-image training loss
    correct: float = 0.0
    images: float = 0.0
    seconds: float = 0.0  # in training steps


@dataclass
class RunState:
    """Where a run is: saved in every checkpoint, restored by --resume."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps done in the epoch after those
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    best_acc: float = -1.0
    partial: EpochSums = field(default_factory=EpochSums)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        partial = ckpt["partial"]
        if isinstance(partial, (list, tuple)):  # written before the sums had names
            partial = dict(zip(("loss", "correct", "images", "seconds"), partial))
        return cls(ckpt["epoch"], ckpt["step"], list(ckpt["history"]), ckpt["best_acc"], EpochSums(**partial))


def restore(t: Training, ckpt: dict) -> RunState:
    t.net.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    restore_schedule(t.scheduler, ckpt["scheduler"])
    if t.ema:
        t.ema.model.load_state_dict(ckpt["ema"])
    if t.lookahead:
        for name, slow in t.lookahead.slow.items():
            slow.copy_(ckpt["lookahead"][name])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return RunState.from_checkpoint(ckpt)


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, saved: dict) -> None:
    """The schedule where the checkpoint left it. Runs written before the schedule was a
    LambdaLR saved a OneCycleLR: their step count carries over onto this run's schedule."""
    if "lr_lambdas" in saved:
        scheduler.load_state_dict(saved)
        return
    scheduler.last_epoch = saved["last_epoch"]
    lrs = [
        base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def best_rule(config: TrainConfig) -> str:
    if config.val_split:
        return "best validation accuracy"
    return "final weights (no --val-split: the test set never chooses the model)"


def checkpoint(t: Training, state: RunState) -> dict:
    """A plain dict: tensors, numbers, strings, lists and dicts only."""
    return {
        "model": t.net.state_dict(),
        **({"ema": t.ema.model.state_dict()} if t.ema else {}),
        **({"lookahead": t.lookahead.slow} if t.lookahead else {}),  # for an exact --resume
        "scored": "ema" if t.ema else "model",  # the weights best.pt was chosen with
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "partial": asdict(state.partial),
        "history": state.history,
        "best_acc": state.best_acc,
        "best_rule": best_rule(t.config),
        "rng": {"torch": torch.get_rng_state()},
        "config": asdict(t.config),
        "classes": t.data.train.classes,
        "mean": t.data.mean,
        "std": t.data.std,
        "argv": sys.argv,
        "versions": library_versions(),
        "git_commit": git_commit(),
    }


def save(t: Training, name: str, state: RunState) -> None:
    """Rank 0 writes (atomically); every rank waits, so no rank runs ahead of the file."""
    ckpt = checkpoint(t, state)
    if t.fabric.is_global_zero:
        save_checkpoint(ckpt, t.out / name)
    t.fabric.barrier()


# --- one step, one epoch ---------------------------------------------------------------------


def training_batch(
    train: Dataset, rows: EpochPlan, mean: torch.Tensor, std: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented, normalised batch that `rows` picks from the device-resident set."""
    images = train.images[rows.order]
    x = augment(images, rows, cutout_size=config.cutout, padding=config.padding)
    x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
    return x, train.labels[rows.order]


def train_step(
    fabric: Fabric, model, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step. Returns (loss, number correct) as device tensors: reading them
    would sync the host."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    fabric.backward(loss)
    optimizer.step()
    scheduler.step()
    return loss.detach().double(), (logits.detach().argmax(1) == y).sum().double()


def agree(fabric: Fabric, stop_requested: bool, bad_step: torch.Tensor) -> tuple[bool, int]:
    """One reduce, so that every rank takes the same decision: (stop here, first non-finite
    step or -1)."""
    flags = torch.stack([torch.tensor(float(stop_requested), device=fabric.device), bad_step.double()])
    if fabric.world_size > 1:
        flags = fabric.all_reduce(flags, reduce_op="max")
    stop, first_bad = flags.tolist()
    return bool(stop), int(first_bad)


class Outcome(enum.Enum):
    FINISHED = "finished"
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: last.pt is exact to the step
    NON_FINITE = "non-finite loss"
    LOST_PEER = "lost another process"


EXIT_CODES = {Outcome.FINISHED: 0, Outcome.INTERRUPTED: 130, Outcome.NON_FINITE: 1, Outcome.LOST_PEER: 1}


@dataclass
class EpochEnd:
    """How an epoch ended: FINISHED, INTERRUPTED after `step` steps, or NON_FINITE."""

    outcome: Outcome
    sums: EpochSums  # over all ranks
    step: int = 0
    lr: float = 0.0  # the rate of the last step
    bad_step: int = -1  # first non-finite step of the run
    stop_requested: bool = False  # on the last step: the epoch is finished, then the run stops


def run_epoch(t: Training, state: RunState, stop: StopRequest) -> EpochEnd:
    fabric, world = t.fabric, t.fabric.world_size
    # The whole epoch's order and augmentation, drawn from (seed, epoch); this rank's part.
    c = t.config
    alternate = c.flip == "alternate"
    plan = plan_epoch(
        len(t.data.train), c.batch_size, c.seed, state.epoch, pad=c.crop_pad, alternate_flip=alternate
    )
    plan = plan.shard(fabric.global_rank, world).to(fabric.device)
    restored = state.partial if fabric.is_global_zero else EpochSums()  # the saved sums are over all ranks
    sums = torch.tensor([restored.loss, restored.correct], device=fabric.device, dtype=torch.float64)
    images = restored.images
    bad_step = torch.tensor(-1, device=fabric.device)
    bar = progress_bar(t, state)
    timer = StepTimer(state.partial.seconds)
    steps_to_log: list[tuple[int, torch.Tensor, float]] = []  # (run step, loss, lr) since the last sync
    # The ranks agree (stop? a non-finite loss?) at each progress-bar refresh: every 10 steps on a
    # GPU, where it is the loop's one host sync; every step on the CPU, which has no queue to
    # drain and whose steps take seconds (torchrun kills its workers 30 s after a Ctrl-C).
    agree_every = 1 if fabric.device.type == "cpu" else REFRESH_EVERY
    for step in range(state.step, t.steps_per_epoch):
        lr = t.scheduler.get_last_lr()[0]  # the rate this step uses
        x, y = training_batch(t.data.train, plan.rows(step), t.mean, t.std, t.config)
        loss, correct = train_step(fabric, t.model, t.optimizer, t.scheduler, x, y, t.config.label_smoothing)
        sums += torch.stack([loss * plan.batch, correct])  # on the device: no host sync
        images += plan.batch
        run_step = state.epoch * t.steps_per_epoch + step
        if t.lookahead:
            t.lookahead.update(t.net, run_step + 1)
        if t.ema:
            t.ema.update(t.net, run_step)
        bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(loss), run_step)
        steps_to_log += [(run_step, loss, lr)] if fabric.loggers else []
        bar.update(1)
        last = step + 1 == t.steps_per_epoch
        if (step + 1) % agree_every and not last and not (world == 1 and stop.signal):
            continue
        stop_now, first_bad = agree(fabric, stop.signal is not None, bad_step)
        if first_bad >= 0:
            bar.close()
            return EpochEnd(Outcome.NON_FINITE, EpochSums(), bad_step=first_bad)
        show_progress(bar, sums, images, lr, timer.lap(step + 1 - state.step, plan.batch * world))
        log_steps(fabric, steps_to_log)
        if stop_now and not last:
            bar.close()
            return EpochEnd(
                Outcome.INTERRUPTED, reduce_sums(fabric, sums, images, timer), step=step + 1, lr=lr
            )
    bar.close()
    return EpochEnd(
        Outcome.FINISHED, reduce_sums(fabric, sums, images, timer), lr=lr, stop_requested=stop_now
    )


def log_steps(fabric: Fabric, steps: list[tuple[int, torch.Tensor, float]]) -> None:
    """Each step's loss (this rank's share of the batch) and lr, to Fabric's loggers; emptied."""
    if steps:
        losses = torch.stack([loss for _, loss, _ in steps]).tolist()  # one host sync for them all
        for (step, _, lr), loss in zip(steps, losses):
            fabric.log_dict({"train/loss": loss, "train/lr": lr}, step=step)
        steps.clear()


def reduce_sums(fabric: Fabric, sums: torch.Tensor, images: float, timer: StepTimer) -> EpochSums:
    """This epoch's sums so far, over all ranks."""
    totals = torch.cat([sums, torch.tensor([images], device=fabric.device, dtype=torch.float64)])
    loss, correct, images = (
        fabric.all_reduce(totals, reduce_op="sum") if fabric.world_size > 1 else totals
    ).tolist()
    return EpochSums(loss, correct, images, timer.seconds)


@torch.no_grad()
def score(t: Training, model: torch.nn.Module, batch: int = 1000) -> tuple[float, float]:
    """(loss, accuracy) on the monitor set, each rank scoring its own shard, reduced over ranks."""
    fabric = t.fabric
    model = folded_for_inference(model)  # an eval copy, BatchNorms folded: the same outputs, faster
    shard = slice(fabric.global_rank, None, fabric.world_size)
    images, labels = t.data.monitor.images[shard], t.data.monitor.labels[shard]
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    starts = range(0, len(labels), batch)
    quiet = not fabric.is_global_zero or len(starts) < 2
    scoring = f"scoring the {t.data.monitor_name} set"
    for start in tqdm(starts, desc=scoring, unit="batch", leave=False, disable=quiet):
        x = normalize(images[start : start + batch], t.mean, t.std).contiguous(
            memory_format=torch.channels_last
        )
        y = labels[start : start + batch]
        with fabric.autocast():  # the folded copy is not wrapped by Fabric
            logits = model(x).float()
        totals += torch.stack(
            [F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()]
        ).double()
    count = torch.tensor([float(len(labels))], device=fabric.device, dtype=torch.float64)
    totals = torch.cat([totals, count])
    totals = fabric.all_reduce(totals, reduce_op="sum") if fabric.world_size > 1 else totals
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def share_rank_zero_statistics(t: Training) -> None:
    """DDP hands rank 0's BatchNorm statistics to the other ranks at the start of each forward
    pass, so after an epoch's last step each rank holds its own: every rank then scores the
    statistics that rank 0 saves."""
    if t.fabric.world_size > 1:
        for model in [t.net, t.ema.model] if t.ema else [t.net]:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)


def finish_epoch(t: Training, state: RunState, end: EpochEnd) -> None:
    """Score the monitor set, record the epoch, write the checkpoints, metrics and pictures."""
    share_rank_zero_statistics(t)
    scoring_began = time.perf_counter()
    loss, acc = score(t, t.ema.model if t.ema else t.net)
    score_s = time.perf_counter() - scoring_began
    s = end.sums
    row = {
        "epoch": state.epoch + 1,
        "train_loss": s.loss / s.images,
        "train_acc": s.correct / s.images,
        "monitor_loss": loss,
        "monitor_acc": acc,
        "lr": end.lr,
        "epoch_s": s.seconds,
        "img_per_s": s.images / max(s.seconds, 1e-9),
        "score_s": score_s,  # a forward pass over the monitor set: on a CPU it can outlast the epoch
    }
    t.fabric.print(
        f"epoch {row['epoch']:>3}/{t.config.epochs}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_acc']:5.2f}%  {t.data.monitor_name} loss {loss:.4f} acc {100 * acc:5.2f}%  "
        f"{s.seconds:6.1f}s  {row['img_per_s']:,.0f} img/s  scored in {score_s:.1f}s"
    )
    state.history.append(row)
    step = (state.epoch + 1) * t.steps_per_epoch - 1
    t.fabric.log_dict({f"epoch/{k}": v for k, v in row.items()}, step=step)
    for logger in t.fabric.loggers:
        logger.save()  # live: each epoch is on disk when it ends
    state.epoch, state.step, state.partial = state.epoch + 1, 0, EpochSums()
    # With a validation split, keep its best epoch; without, the test set must not choose.
    # best.pt goes first: a kill between the two writes replays this epoch.
    if not t.config.val_split or acc > state.best_acc:
        state.best_acc = acc
        save(t, results.BEST, state)
    save(t, results.LAST, state)
    if t.fabric.is_global_zero:
        write_metrics(state.history, t.out / results.METRICS)
        plot_curves(state.history, t.out / results.CURVES, t.data.monitor_name)
        write_report(t.out)


def fit(t: Training, state: RunState, stop: StopRequest) -> Outcome:
    """The epoch loop: train an epoch, score it, save; stop early on Ctrl-C or a bad loss."""
    while state.epoch < t.config.epochs:
        end = run_epoch(t, state, stop)
        if end.outcome is Outcome.NON_FINITE:
            rank_zero_error(
                t.fabric,
                f"loss became non-finite at step {end.bad_step + 1} (epoch {state.epoch + 1}); "
                "try a lower --lr. last.pt keeps the previous epoch.",
            )
            return end.outcome
        if end.outcome is Outcome.INTERRUPTED:
            state.step, state.partial = end.step, end.sums
            save(t, results.LAST, state)
            say_interrupted(t, f"at epoch {state.epoch + 1}, step {state.step}")
            return end.outcome
        finish_epoch(t, state, end)
        if end.stop_requested and state.epoch < t.config.epochs:
            say_interrupted(t, f"after epoch {state.epoch}")
            return Outcome.INTERRUPTED
    return Outcome.FINISHED


def run(t: Training, state: RunState, started: float) -> Outcome:
    """fit(), then (finished) calibrate and summarise: with Ctrl-C turned into a clean stop and a
    lost peer, at any collective, into one line."""
    try:
        with StopRequest() as stop:
            outcome = fit(t, state, stop)
        if outcome is Outcome.FINISHED:
            calibration = calibrate(t) if t.config.val_split else None
            write_summary(t, state, calibration, time.perf_counter() - started)
        return outcome
    except RuntimeError as err:  # gloo/NCCL report a dead or silent peer this way
        if t.fabric.world_size == 1 or not lost_peer(err):
            raise
        print(
            f"error: rank {t.fabric.global_rank} lost contact with the other processes "
            f"({str(err).splitlines()[0][:160]}); last.pt holds the last finished epoch",
            file=sys.stderr,
            flush=True,
        )
        return Outcome.LOST_PEER
    finally:
        for logger in t.fabric.loggers:
            logger.finalize("success")  # what is buffered goes to disk, however the run ends


# --- after training: a temperature for calibrated confidences ---------------------------------


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The temperature T that minimises the held-out cross-entropy of softmax(logits / T)
    (temperature scaling, Guo et al. 2017); log-probabilities serve as logits. None when every
    image is predicted right: the loss then falls as T falls to 0, so there is no T to find (and
    one near 0 would show every prediction, mistakes included, as certain)."""
    if bool((log_probs.argmax(1) == labels).all()):
        return None
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(log_probs / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibrate(t: Training) -> dict | None:
    """Fit a temperature on the validation images for best.pt's weights and store it there
    (rank 0; the others wait). Returns what it did, for the summary."""
    found = None
    if t.fabric.is_global_zero:
        best = load_checkpoint(t.out / results.BEST)
        model = model_from_checkpoint(best).to(t.fabric.device, memory_format=torch.channels_last)
        val = t.data.monitor
        autocast = hardware.autocast_dtype(t.config.precision)
        mean, std = torch.tensor(t.data.mean), torch.tensor(t.data.std)
        log_probs = (
            predict_probs(model, val.images, mean, std, autocast=autocast).plain.clamp_min(1e-12).log()
        )
        labels = val.labels.cpu()
        temperature = fit_temperature(log_probs, labels)
        found = {"temperature": temperature, "images": len(labels)}
        if temperature is None:
            print(f"no calibration temperature: all {len(labels):,} validation images are predicted right, "
                  "so none can be fitted; the confidences shown stay the model's own")  # fmt: skip
        else:
            best["temperature"] = temperature
            save_checkpoint(best, t.out / results.BEST)
            before, after = (F.cross_entropy(log_probs / T, labels).item() for T in (1.0, temperature))
            found |= {"val_loss_before": before, "val_loss_after": after}
            print(
                f"calibration temperature {temperature:.3f}, fitted on the {len(labels):,} validation "
                f"images (their loss {before:.4f} -> {after:.4f}); stored in {t.out / results.BEST}"
            )
    t.fabric.barrier()
    return found


# --- what the user sees ----------------------------------------------------------------------


class StopRequest:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step, never inside it,
    so last.pt is exact to the step. The previous handlers come back on exit."""

    def __enter__(self) -> StopRequest:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.signal = signum


class StepTimer:
    """Seconds spent in training steps, and the images/s since the last lap."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self._tick, self._steps = seconds, time.perf_counter(), 0

    def lap(self, steps_so_far: int, images_per_step: int) -> float:
        now = time.perf_counter()
        self.seconds += now - self._tick
        rate = (steps_so_far - self._steps) * images_per_step / max(now - self._tick, 1e-9)
        self._tick, self._steps = now, steps_so_far
        return rate


def progress_bar(t: Training, state: RunState) -> tqdm:
    return tqdm(
        total=t.steps_per_epoch,
        initial=state.step,
        desc=f"epoch {state.epoch + 1}/{t.config.epochs}",
        disable=not t.fabric.is_global_zero,
        leave=False,
        dynamic_ncols=True,
        file=sys.stdout,
    )


def show_progress(bar: tqdm, sums: torch.Tensor, images: float, lr: float, img_per_s: float) -> None:
    loss, correct = sums.tolist()  # a host sync (on a GPU): once per REFRESH_EVERY steps
    bar.set_postfix(  # drawn at the bar's own pace (tqdm's mininterval), not at every call
        loss=f"{loss / images:.3f}",
        acc=f"{correct / images:.3f}",
        lr=f"{lr:.3g}",
        img_s=f"{img_per_s:.0f}",
        refresh=False,
    )


def rank_zero_error(fabric: Fabric, message: str) -> None:
    if fabric.is_global_zero:
        print(f"\nerror: {message}", file=sys.stderr, flush=True)


def say_interrupted(t: Training, where: str) -> None:
    last = t.out / results.LAST
    t.fabric.print(
        f"\ninterrupted: saved {last} {where}; continue with: python train.py --resume {quoted(last)}"
    )


def print_plan(
    t: Training, state: RunState, explicit: set[str], resumed_from: str | None, chosen: str
) -> None:
    c, d, p = t.config, t.data, t.fabric.print
    p(
        f"data      {d.source}: train {len(d.train):,} images{' (balanced subset)' if c.subset else ''}, "
        f"{d.monitor_name} {len(d.monitor):,}"
    )
    p(
        f"device    {c.accelerator} x{t.fabric.world_size}, precision {c.precision}"
        f"{' (auto)' if 'precision' not in explicit and not resumed_from else ''}, channels_last, "
        f"compile {'on' if c.compile else 'off'}"
    )
    lr = f"peak lr {c.lr:g}, from {c.lr_start:g}x over the first {c.warmup:.0%} of steps, to {c.lr_end:g}x"
    p(
        f"schedule  {c.epochs} epochs x {t.steps_per_epoch} steps of {c.batch_size} "
        f"({c.batch_size // t.fabric.world_size} per process), {lr}"
    )
    p(
        f"optimizer SGD Nesterov, momentum {c.momentum}, weight decay {c.weight_decay:g}"
        f"{'' if c.decay_norms else ' (not on BatchNorm and biases)'}"
        f"{f', BatchNorm biases at {c.norm_bias_lr:g}x the lr' if c.norm_bias_lr != 1 else ''}, "
        f"label smoothing {c.label_smoothing}, "
        f"crops padded by {c.crop_pad}px ({c.padding}), cutout {c.cutout}px, {c.flip} flips"
        f"{f', EMA of the weights {c.ema}' if c.ema else ''}{', lookahead' if c.lookahead else ''}"
        f"{', stem whitened' if c.whiten_stem else ''}"
    )
    p("model     CIFAR ResNet-18, parameters per module:\n" + "\n".join(summary_lines(t.net)))
    if chosen:
        p(f"chosen    {chosen}")
    if c.epochs * t.steps_per_epoch < 100:
        p(
            f"note      only {c.epochs * t.steps_per_epoch} optimizer steps: too few for the warm-up and "
            "for BatchNorm's running statistics, so expect low test accuracy; a smaller --batch-size "
            "gives more steps"
        )
    counts = torch.bincount(d.train.labels.cpu(), minlength=len(d.train.classes)).tolist()
    unseen = [name for name, count in zip(d.train.classes, counts) if count == 0]
    if unseen:  # --val-split draws at random: a class of few images can lose them all
        p(f"note      no training images of {', '.join(unseen)} (all held out by --val-split or --subset): "
          "the model never sees them")  # fmt: skip
    if resumed_from and state.epoch >= c.epochs:  # killed after its last epoch, before the summary
        p(f"resume    from {resumed_from}: its {c.epochs} epochs are done; the final writes only")
    elif resumed_from:
        p(f"resume    from {resumed_from}: epoch {state.epoch + 1}, step {state.step}")


def write_metrics(history: list[dict], path: Path) -> None:
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in history:
            values = {k: row.get(k) for k in METRIC_COLUMNS}  # rows resumed from older runs lack score_s
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in values.items()})


def ranks_agree(t: Training) -> bool | None:
    """DDP keeps every rank's weights identical: check it rather than assume it."""
    if t.fabric.world_size == 1:
        return None
    sums = torch.stack([p.detach().double().sum() for p in t.net.parameters()])
    highest = t.fabric.all_reduce(sums.clone(), reduce_op="max")
    lowest = t.fabric.all_reduce(sums.clone(), reduce_op="min")
    return bool(torch.equal(highest, lowest))


def summarise(t: Training, state: RunState, total_s: float) -> dict:
    history = state.history
    train_s = sum(r["epoch_s"] for r in history)
    images = sum(r["img_per_s"] * r["epoch_s"] for r in history)
    timed_scoring = bool(history) and all("score_s" in r for r in history)  # not in runs resumed from before
    known = [results.LAST, results.BEST, results.METRICS, results.CURVES, results.REPORT, results.LOGS]
    written = [name for name in known if (t.out / name).exists()] + [results.SUMMARY]
    return {
        "final_monitor_acc": history[-1]["monitor_acc"] if history else None,
        "monitor_set": t.data.monitor_name,
        "best_rule": best_rule(t.config),
        "best_monitor_acc": state.best_acc if t.config.val_split else None,
        "epochs": len(history),
        "total_s": total_s,
        "train_s": train_s,
        "score_s": sum(r["score_s"] for r in history) if timed_scoring else None,
        "img_per_s": images / train_s if train_s else None,
        "world_size": t.fabric.world_size,
        "ranks_agree": ranks_agree(t),
        "config": asdict(t.config),
        "files": sorted(str(t.out / name) for name in written),
    }


def write_summary(t: Training, state: RunState, calibration: dict | None, total_s: float) -> None:
    summary = {**summarise(t, state, total_s), "calibration": calibration}  # every rank: it compares weights
    if t.fabric.is_global_zero:
        with atomic_write(t.out / results.SUMMARY) as f:
            json.dump(summary, f, indent=2)
        write_report(t.out)
        print_summary(summary, t.out)


def print_summary(summary: dict, out: Path) -> None:
    monitor = summary["monitor_set"]
    print("\nsummary")
    if summary["final_monitor_acc"] is not None:
        print(f"  final {monitor} accuracy  {100 * summary['final_monitor_acc']:.2f}%")
    best = summary["best_monitor_acc"]
    print(
        f"  best.pt rule          {summary['best_rule']}"
        + (f" ({100 * best:.2f}%)" if best is not None else "")
    )
    if summary["world_size"] > 1:
        agreed = "identical on every rank" if summary["ranks_agree"] else "DIFFER between ranks"
        print(f"  ranks                 {summary['world_size']}, final weights {agreed}")
    parts = [f"{summary['train_s']:.1f}s in training steps"]
    if summary["score_s"] is not None:
        parts.append(f"{summary['score_s']:.1f}s scoring the {monitor} set")
    print(f"  total time            {summary['total_s']:.1f}s ({', '.join(parts)})")
    if summary["img_per_s"]:
        print(f"  throughput            {summary['img_per_s']:,.0f} img/s")
    print("  files                 " + "\n                        ".join(summary["files"]))
    print(f"next: python evaluate.py --ckpt {quoted(out / results.BEST)}")


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another process died, hung or left."""
    text = str(err).lower()
    markers = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe", "nccl", "gloo")
    return isinstance(err, torch.distributed.DistError) or any(m in text for m in markers)


# --- the script ------------------------------------------------------------------------------


@command
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    resumed = load_checkpoint(args["resume"]) if "resume" in args else None
    config = build_config(args, resumed).for_device()

    hardware.prepare_backend()
    fabric = make_fabric(config, out_folder(args, resumed))
    fabric.launch()
    with results_folder(fabric, args, resumed) as out:
        data = load_training_data(config, fabric.device, resumed)
        # evaluate.py and explain.py find a download from any folder: record where it went.
        config = config if config.data else replace(config, data=os.path.abspath(DOWNLOADED[config.dataset]))
        config, chosen = config.for_data(len(data.train), fabric.world_size)
        t = build_training(fabric, config, data, out)
        state = restore(t, resumed) if resumed else RunState()
        clear_folder(fabric, args, resumed, out)
        print_plan(t, state, set(args), resumed and args["resume"], chosen)
        outcome = run(t, state, started)
    return EXIT_CODES[outcome]


if __name__ == "__main__":
    sys.exit(main())
