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
import csv
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from tqdm import tqdm

from common import hardware
from common.augment import EpochPlan, augment, plan_epoch
from common.checkpoint import (git_commit, library_versions, load_checkpoint, save_checkpoint)
from common.data import (CIFAR10_MEAN, CIFAR10_STD, balanced_subset, load_cifar10, normalize,
                         split_off_validation)
from common.model import build_model, summary_lines
from common.options import (Parser, UsageError, add_accelerator_option, add_data_option, command,
                            non_negative_int, positive_float, positive_int)
from common.plots import plot_curves
from common.report import write_report

DEFAULTS = {
    "epochs": 20, "batch_size": 512, "lr": None, "weight_decay": 5e-4, "momentum": 0.9,
    "label_smoothing": 0.1, "cutout": 8, "data": None, "subset": None, "val_split": None,
    "seed": 0, "precision": "auto", "accelerator": "auto", "devices": 1, "compile": None,
    "dist_timeout": 300, "ema": 0.0,
}
# Flags that are not part of a run's config, and flags that may change on --resume.
NOT_CONFIG = {"out", "resume", "overwrite"}
RESUME_FREE = NOT_CONFIG | {"dist_timeout"}
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "monitor_loss", "monitor_acc", "lr",
                  "epoch_s", "img_per_s"]
LR_PER_512 = 0.4  # peak lr for a global batch of 512, scaled linearly with the batch
REFRESH_EVERY = 10  # steps between progress-bar refreshes, the only host syncs in an epoch


def parse_args(argv: list[str] | None) -> tuple[dict, set[str]]:
    """Returns (flags as given, names given explicitly); defaults are filled in later."""
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0],
               argument_default=argparse.SUPPRESS)
    p.add_argument("--epochs", type=positive_int, help=f"epochs (default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"global batch, split over processes (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=positive_float,
                   help=f"OneCycle peak learning rate (default {LR_PER_512} x batch-size/512)")
    p.add_argument("--weight-decay", type=float, help=f"SGD weight decay (default {DEFAULTS['weight_decay']})")
    p.add_argument("--label-smoothing", type=float,
                   help=f"label smoothing of the training loss (default {DEFAULTS['label_smoothing']})")
    p.add_argument("--cutout", type=non_negative_int, help=f"cutout square side in px, 0 = off (default {DEFAULTS['cutout']})")
    # No defaults in the parser: what the user typed is told apart from DEFAULTS (for --resume).
    add_data_option(p, "default: download the original CIFAR-10 into ./data", argparse.SUPPRESS)
    p.add_argument("--subset", type=positive_int, help="train on N training images, balanced over classes")
    p.add_argument("--val-split", type=positive_int,
                   help="hold N training images out as a validation set; best.pt is then the best validation epoch")
    p.add_argument("--out", help="output folder (default: the current directory, or the --resume checkpoint's)")
    p.add_argument("--seed", type=int, help=f"random seed (default {DEFAULTS['seed']})")
    p.add_argument("--precision", choices=hardware.PRECISIONS,
                   help="default auto: the fastest correct one for the device (printed at start)")
    add_accelerator_option(p, argparse.SUPPRESS)
    p.add_argument("--devices", type=positive_int,
                   help="processes on this machine (default 1; under torchrun, torchrun decides)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on for CUDA, off on CPU)")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay per step, "
                        "e.g. 0.999 (default 0: off); the monitor set then scores the average")
    p.add_argument("--dist-timeout", type=positive_int,
                   help=f"seconds a rank waits for the others before giving up (default {DEFAULTS['dist_timeout']})")
    p.add_argument("--resume", metavar="CKPT", help="continue from this last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    args = vars(p.parse_args(argv))
    return args, set(args)


def build_config(args: dict, explicit: set[str], resumed: dict | None) -> dict:
    """Defaults, or the resumed run's config, overridden by what the user typed."""
    if resumed is None:
        config = {**DEFAULTS, **{k: v for k, v in args.items() if k not in NOT_CONFIG}}
    else:
        config = {**DEFAULTS, **resumed["config"]}
        if "dist_timeout" in explicit:
            config["dist_timeout"] = args["dist_timeout"]
        for key in explicit - RESUME_FREE:
            given = args[key]
            if key == "accelerator" and given != "auto":
                given = hardware.resolve_accelerator(given)
            if key == "data" and given is not None:
                given = os.path.abspath(given)
            if given != config.get(key) and not (key in ("precision", "accelerator") and given == "auto"):
                raise UsageError(f"--{key.replace('_', '-')} {args[key]} conflicts with the resumed "
                                 f"run's {config.get(key)}; drop the flag to continue that run")
    if config["data"] is not None:  # absolute, so evaluate/explain/--resume work from anywhere
        config["data"] = os.path.abspath(config["data"])
    if not 0 <= config["label_smoothing"] < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {config['label_smoothing']}")
    if config["weight_decay"] < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {config['weight_decay']}")
    if not 0 <= config["seed"] < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {config['seed']}")
    if not 0 <= config["ema"] < 1:
        raise UsageError(f"--ema must be in [0, 1), got {config['ema']}")
    if config["lr"] is None:
        config["lr"] = LR_PER_512 * config["batch_size"] / 512
    return config


# What the three scripts write into a run's folder; --overwrite clears it first.
RESULT_FILES = ("last.pt", "best.pt", "metrics.csv", "curves.png", "summary.json", "evaluation.json",
                "predictions.csv", "confusion_matrix.png", "calibration.png", "misclassified.png",
                "explanations.json", "selfcheck.json", "report.html")


def remove_old_results(out: Path) -> None:
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in ("gradcam*.png", "cams*.npz", "user_*"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def make_fabric(config: dict) -> Fabric:
    accelerator = hardware.resolve_accelerator(config["accelerator"])
    world = hardware.torchrun_world()
    devices, num_nodes = world if world else (config["devices"], 1)
    strategy = "auto"
    if devices * num_nodes > 1:
        strategy = DDPStrategy(timeout=timedelta(seconds=config["dist_timeout"]))
    if accelerator == "cpu" and config["precision"] == "16-mixed":
        raise UsageError("--precision 16-mixed needs a CUDA GPU; on the CPU use bf16-mixed or 32-true")
    if accelerator == "cuda" and world is None and devices > torch.cuda.device_count():
        raise UsageError(f"--devices {devices} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                  strategy=strategy, precision=config["precision"])


def one_cycle(optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int):
    """OneCycle, stepped per batch: a linear rise from peak/20 to `peak_lr` over the first
    quarter, then a linear fall to peak/4000; momentum stays at the optimizer's.

    OneCycleLR divides by zero when a phase has no step (2 or 4 steps in all), so very short
    runs get a longer warm-up share and fewer than 3 steps are refused.
    """
    if total_steps < 3:
        raise UsageError(f"only {total_steps} optimizer step(s) in all; OneCycle needs 3 or more: "
                         "lower --batch-size or raise --epochs")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=peak_lr, total_steps=total_steps, pct_start=min(0.5, max(0.25, 1.5 / total_steps)),
        anneal_strategy="linear", div_factor=20, final_div_factor=200, cycle_momentum=False)


def train_step(fabric: Fabric, model, optimizer, scheduler, images: torch.Tensor,
               labels: torch.Tensor, plan: EpochPlan, mean: torch.Tensor, std: torch.Tensor,
               config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch `plan` picks from the device-resident training set.

    Returns (loss, number correct) as device tensors: reading them would sync the host.
    """
    x = augment(images[plan.order], plan.shift, plan.flip, plan.cutout, cutout_size=config["cutout"])
    x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
    y = labels[plan.order]
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=config["label_smoothing"])
    optimizer.zero_grad(set_to_none=True)
    fabric.backward(loss)
    optimizer.step()
    scheduler.step()
    return loss.detach().double(), (logits.detach().argmax(1) == y).sum().double()


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another process died, hung or left."""
    text = str(err).lower()
    return isinstance(err, torch.distributed.DistError) or any(
        marker in text for marker in ("connection closed", "connection reset", "timed out",
                                      "timeout", "broken pipe", "nccl", "gloo"))


class WeightAverage:
    """An exponential moving average of the weights (and a copy of the BatchNorm buffers).

    torch.optim.swa_utils.AveragedModel does this too, but tests `n_averaged == 0` on the
    host at every update, a device sync per step; one fused lerp needs none.
    """

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        import copy

        self.model = copy.deepcopy(net).eval()
        self.decay = decay
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), list(net.parameters()), 1 - self.decay)
        for mine, theirs in zip(self.model.buffers(), net.buffers()):
            mine.copy_(theirs)


@torch.no_grad()
def score(model, images: torch.Tensor, labels: torch.Tensor, mean, std, fabric: Fabric,
          batch: int = 1000) -> tuple[float, float]:
    """(loss, accuracy) over a set, each rank scoring its own shard, reduced over ranks."""
    was_training = model.training
    model.eval()
    shard = slice(fabric.global_rank, None, fabric.world_size)
    images, labels = images[shard], labels[shard]
    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
    for start in range(0, len(labels), batch):
        x = normalize(images[start:start + batch], mean, std).contiguous(memory_format=torch.channels_last)
        y = labels[start:start + batch]
        with fabric.autocast():  # the EMA model is not wrapped by Fabric
            logits = model(x).float()
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum"),
                               (logits.argmax(1) == y).sum()]).double()
    count = torch.tensor([float(len(labels))], device=fabric.device, dtype=torch.float64)
    totals = fabric.all_reduce(torch.cat([totals, count]), reduce_op="sum")
    model.train(was_training)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


class StopRequest:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step, never inside it,
    so last.pt is exact to the step. The previous handlers come back on exit."""

    def __enter__(self) -> "StopRequest":
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


def write_metrics(history: list[dict], out: Path) -> None:
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in METRIC_COLUMNS})
    os.replace(tmp, out / "metrics.csv")


@command
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, explicit = parse_args(argv)
    resumed = load_checkpoint(args["resume"]) if "resume" in args else None
    config = build_config(args, explicit, resumed)
    out = Path(args.get("out") or (Path(args["resume"]).parent if resumed else "."))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.pt.tmp*"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    if (out / "last.pt").exists() and resumed is None and not args.get("overwrite"):
        raise UsageError(f"{out / 'last.pt'} exists: pass --resume {out / 'last.pt'} to continue "
                         "that run or --overwrite to replace it")
    if args.get("overwrite") and int(os.environ.get("RANK", 0)) == 0:
        remove_old_results(out)  # so report.html never mixes the old run's files in

    # --- data: decoded once, then one uint8 tensor per split ----------------------------
    splits = load_cifar10(config["data"])
    train_set, monitor_set, monitor_name = splits.train, splits.test, "test"
    if config["val_split"]:
        train_set, monitor_set = split_off_validation(train_set, config["val_split"], config["seed"])
        monitor_name = "val"
    if config["subset"]:
        train_set = balanced_subset(train_set, config["subset"], config["seed"])

    # --- device, precision, processes ---------------------------------------------------
    hardware.prepare_backend()
    config["accelerator"] = hardware.resolve_accelerator(config["accelerator"])
    if config["precision"] == "auto":
        config["precision"] = hardware.default_precision(config["accelerator"])
    if config["compile"] is None:
        config["compile"] = config["accelerator"] == "cuda"
    fabric = make_fabric(config)
    fabric.launch()
    world, rank = fabric.world_size, fabric.global_rank
    if config["batch_size"] % world:
        raise UsageError(f"--batch-size {config['batch_size']} must divide evenly over {world} processes")
    local_batch = config["batch_size"] // world
    device = fabric.device

    fabric.seed_everything(config["seed"], verbose=False)
    net = build_model(len(train_set.classes)).to(memory_format=torch.channels_last)
    if resumed:
        net.load_state_dict(resumed["model"])
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=config["momentum"],
                                nesterov=True, weight_decay=config["weight_decay"])
    steps_per_epoch = math.ceil(len(train_set) / config["batch_size"])
    scheduler = one_cycle(optimizer, config["lr"], config["epochs"] * steps_per_epoch)
    model = torch.compile(net) if config["compile"] else net
    model, optimizer = fabric.setup(model, optimizer)
    ema = WeightAverage(net, config["ema"]) if config["ema"] else None

    history: list[dict] = []
    start_epoch, start_step, best_acc, partial = 0, 0, -1.0, [0.0, 0.0, 0, 0.0]
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        if ema:
            ema.model.load_state_dict(resumed["ema"])
        scheduler.load_state_dict(resumed["scheduler"])
        torch.set_rng_state(resumed["rng"]["torch"])
        history, best_acc = list(resumed["history"]), resumed["best_acc"]
        start_epoch, start_step, partial = resumed["epoch"], resumed["step"], list(resumed["partial"])

    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    monitor_images, monitor_labels = monitor_set.images.to(device), monitor_set.labels.to(device)
    mean = torch.tensor(CIFAR10_MEAN, device=device)
    std = torch.tensor(CIFAR10_STD, device=device)

    fabric.print(f"data      {splits.source}: train {len(train_set):,} images"
                 f"{' (balanced subset)' if config['subset'] else ''}, {monitor_name} {len(monitor_set):,}")
    fabric.print(f"device    {config['accelerator']} x{world}, precision {config['precision']}"
                 f"{' (auto)' if 'precision' not in explicit and not resumed else ''}, channels_last, "
                 f"compile {'on' if config['compile'] else 'off'}")
    fabric.print(f"schedule  {config['epochs']} epochs x {steps_per_epoch} steps of {config['batch_size']} "
                 f"({local_batch} per process), OneCycle peak lr {config['lr']}, SGD Nesterov, "
                 f"wd {config['weight_decay']}, label smoothing {config['label_smoothing']}")
    fabric.print("model     CIFAR ResNet-18, parameters per module:\n" + "\n".join(summary_lines(net)))
    if config["epochs"] * steps_per_epoch < 100:
        fabric.print(f"note      only {config['epochs'] * steps_per_epoch} optimizer steps: too few for the "
                     "warm-up and for BatchNorm's running statistics, so expect low test accuracy; "
                     "a smaller --batch-size gives more steps")
    if resumed:
        fabric.print(f"resume    from {args['resume']}: epoch {start_epoch + 1}, step {start_step}")

    versions, commit = library_versions(), git_commit()

    def checkpoint(epoch: int, step: int) -> dict:
        return {
            "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            **({"ema": ema.model.state_dict()} if ema else {}),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
            "partial": partial, "rng": {"torch": torch.get_rng_state()},
            "config": config, "classes": train_set.classes, "mean": list(CIFAR10_MEAN),
            "std": list(CIFAR10_STD), "history": history, "best_acc": best_acc,
            "best_rule": "best validation accuracy" if config["val_split"] else "final weights",
            "argv": sys.argv, "versions": versions, "git_commit": commit,
        }

    def save(name: str, state: dict) -> None:
        # Rank 0 writes with our atomic writer; the others wait so no rank runs ahead of it.
        if fabric.is_global_zero:
            save_checkpoint(state, out / name)
        fabric.barrier()

    try:
        with StopRequest() as stop:
            written: set[str] = set()
            stopping = False
            model.train()
            for epoch in range(start_epoch, config["epochs"]):
                # The whole epoch's order and augmentation, drawn from (seed, epoch); this rank's part.
                plan = plan_epoch(len(train_set), config["batch_size"], config["seed"], epoch)
                plan = plan.shard(rank, world).to(device)
                first = start_step if epoch == start_epoch else 0
                restore = first and fabric.is_global_zero  # the saved sums are over all ranks
                totals = torch.tensor(partial[:2] if restore else [0.0, 0.0], device=device, dtype=torch.float64)
                seen = int(partial[2]) if restore else 0
                bad_step = torch.tensor(-1, device=device)
                epoch_time = partial[3] if first else 0.0  # seconds in training steps
                bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{config['epochs']}",
                           disable=not fabric.is_global_zero, leave=False, dynamic_ncols=True, file=sys.stdout)
                tick, images_since = time.perf_counter(), 0
                for step in range(first, steps_per_epoch):
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses
                    loss, correct = train_step(fabric, model, optimizer, scheduler, train_images,
                                               train_labels, plan.rows(step), mean, std, config)
                    # Running sums stay on the device: no host sync here.
                    totals += torch.stack([loss * local_batch, correct])
                    seen += local_batch
                    if ema:
                        ema.update(net)
                    bad_step.masked_fill_((bad_step < 0) & ~torch.isfinite(loss), epoch * steps_per_epoch + step)
                    bar.update(1)
                    images_since += local_batch * world
                    last = step + 1 == steps_per_epoch
                    if (step + 1) % REFRESH_EVERY == 0 or last or (world == 1 and stop.signal):
                        # One reduce so every rank takes the same decision (stop, or a bad loss).
                        flags = torch.stack([torch.tensor(float(stop.signal is not None), device=device),
                                             bad_step.double()])
                        flags = fabric.all_reduce(flags, reduce_op="max") if world > 1 else flags
                        stop_now, first_bad = flags.tolist()
                        if first_bad >= 0:
                            if fabric.is_global_zero:
                                print(f"\nerror: loss became non-finite at step {int(first_bad) + 1} "
                                      f"(epoch {epoch + 1}); try a lower --lr. last.pt keeps the previous "
                                      "epoch.", file=sys.stderr)
                            return 1
                        now = time.perf_counter()
                        epoch_time += now - tick
                        loss_sum, correct_sum = totals.tolist()
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct_sum / seen:.3f}",
                                        lr=f"{lr:.3g}",
                                        img_s=f"{images_since / max(now - tick, 1e-9):.0f}")
                        tick, images_since = now, 0
                        stopping = bool(stop_now)
                        if stopping and not last:
                            # The epoch's running sums over all ranks; rank 0 restores them.
                            sums = torch.cat([totals, torch.tensor([seen], device=device, dtype=torch.float64)])
                            sums = fabric.all_reduce(sums, reduce_op="sum") if world > 1 else sums
                            partial = [*sums.tolist(), epoch_time]
                            save("last.pt", checkpoint(epoch, step + 1))
                            bar.close()
                            fabric.print(f"\ninterrupted: saved {out / 'last.pt'} at epoch {epoch + 1}, step {step + 1}; "
                                         f"continue with: python train.py --resume {out / 'last.pt'}")
                            return 130
                bar.close()
                sums = torch.cat([totals, torch.tensor([seen], device=device, dtype=torch.float64)])
                loss_sum, correct_sum, count = fabric.all_reduce(sums, reduce_op="sum").tolist()
                monitor_loss, monitor_acc = score(ema.model if ema else model, monitor_images,
                                                  monitor_labels, mean, std, fabric)
                row = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct_sum / count,
                       "monitor_loss": monitor_loss, "monitor_acc": monitor_acc, "lr": lr,
                       "epoch_s": epoch_time, "img_per_s": count / max(epoch_time, 1e-9)}
                history.append(row)
                partial = [0.0, 0.0, 0, 0.0]
                fabric.print(f"epoch {epoch + 1:>3}/{config['epochs']}  train loss {row['train_loss']:.4f} "
                             f"acc {100 * row['train_acc']:5.2f}%  {monitor_name} loss {monitor_loss:.4f} "
                             f"acc {100 * monitor_acc:5.2f}%  {epoch_time:6.1f}s  {row['img_per_s']:,.0f} img/s")
                # With a validation split, keep its best epoch; without, the test set must not
                # choose. best.pt goes first: a kill between the writes replays this epoch.
                is_best = not config["val_split"] or monitor_acc > best_acc
                if is_best:
                    best_acc = monitor_acc
                state = checkpoint(epoch + 1, 0)
                if is_best:
                    save("best.pt", state)
                save("last.pt", state)
                if fabric.is_global_zero:
                    write_metrics(history, out)
                    plot_curves(history, out / "curves.png", monitor_name)
                    write_report(out)
                written |= {"last.pt", "best.pt", "metrics.csv", "curves.png", "report.html"}
                if stopping and epoch + 1 < config["epochs"]:
                    fabric.print(f"interrupted: saved {out / 'last.pt'} after epoch {epoch + 1}; "
                                 f"continue with: python train.py --resume {out / 'last.pt'}")
                    return 130
    except RuntimeError as err:  # gloo/NCCL report a dead or silent peer this way
        if world == 1 or not lost_peer(err):
            raise
        print(f"error: rank {rank} lost contact with the other processes "
              f"({str(err).splitlines()[0][:160]}); last.pt holds the last finished epoch",
              file=sys.stderr, flush=True)
        return 1

    # --- summary ---------------------------------------------------------------------------
    ranks_agree = None
    if world > 1:
        # DDP keeps every rank's weights identical: check it rather than assume it.
        sums = torch.stack([p.detach().double().sum() for p in net.parameters()])
        highest = fabric.all_reduce(sums.clone(), reduce_op="max")
        lowest = fabric.all_reduce(sums.clone(), reduce_op="min")
        ranks_agree = bool(torch.equal(highest, lowest))
    total_s = time.perf_counter() - started
    train_s = sum(r["epoch_s"] for r in history)
    images = sum(r["img_per_s"] * r["epoch_s"] for r in history)
    summary = {
        "final_monitor_acc": history[-1]["monitor_acc"] if history else None,
        "monitor_set": monitor_name, "best_rule": "best validation accuracy" if config["val_split"]
        else "final weights (no --val-split: the test set never chooses the model)",
        "best_monitor_acc": best_acc if config["val_split"] else None,
        "epochs": len(history), "total_s": total_s, "train_s": train_s,
        "img_per_s": images / train_s if train_s else None,
        "world_size": world, "ranks_agree": ranks_agree,
        "config": config, "files": sorted(str(out / f) for f in written | {"summary.json"}),
    }
    if fabric.is_global_zero:
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        write_report(out)
        fabric.print("\nsummary")
        if history:
            fabric.print(f"  final {monitor_name} accuracy  {100 * history[-1]['monitor_acc']:.2f}%")
        fabric.print(f"  best.pt rule          {summary['best_rule']}"
                     + (f" ({100 * best_acc:.2f}%)" if config["val_split"] else ""))
        if world > 1:
            fabric.print(f"  ranks                 {world}, final weights "
                         + ("identical on every rank" if ranks_agree else "DIFFER between ranks"))
        fabric.print(f"  total time            {total_s:.1f}s ({train_s:.1f}s in training steps)")
        if summary["img_per_s"]:
            fabric.print(f"  throughput            {summary['img_per_s']:,.0f} img/s")
        fabric.print("  files                 " + "\n                        ".join(summary["files"]))
        fabric.print(f"next: python evaluate.py --ckpt {out / 'best.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
