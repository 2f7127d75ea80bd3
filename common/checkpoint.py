"""Checkpoints: plain dicts that `torch.load(path, weights_only=True)` accepts.

Keys: model (clean names), optimizer, scheduler, epoch, step, partial (the running sums of an
interrupted epoch), rng, config, classes, mean, std, history, best_acc, best_rule, scored (which
weights the run scored), argv, versions, git_commit; with --ema the average `ema`, with
--lookahead the slow weights `lookahead`, with --val-split the fitted `temperature` (best.pt).
evaluate.py and explain.py need nothing else. Writes are atomic (temp file + rename), so a crash
never leaves half a file.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import unicodedata
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write
from common.data import Splits, class_difference, load_splits
from common.model import ResNet18, build_model, strip_wrapper_prefixes

REQUIRED_KEYS = ("model", "classes", "mean", "std", "config")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message is one line meant for the user."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically: a reader sees the old file or the new one, never a torn one. Tensors
    are written from the CPU: a checkpoint trained on a GPU (which torch.save would tag cuda:0)
    then loads with a plain `torch.load(path, weights_only=True)` on a machine without one."""
    from lightning.fabric.utilities.apply_func import move_data_to_device  # train.py has it loaded

    with atomic_write(path, "wb") as f:
        torch.save(move_data_to_device(state, "cpu"), f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with `weights_only=True`; any problem becomes one `CheckpointError` line."""
    path = Path(path)
    if path.is_dir():
        inside = ", ".join(str(p) for p in sorted(path.glob("*.pt"))) or "no .pt file"
        raise CheckpointError(f"{path} is a folder, not a checkpoint: name the file ({inside})")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} (train.py writes best.pt and last.pt into its --out folder)"
        )
    damaged = _damaged_record(path)
    if damaged:
        raise CheckpointError(f"{path} is damaged: its record {damaged} fails its checksum (a bad copy "
                              "or disk); use another copy")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a class or function: unpickling could run code
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain data; "
                "refusing to unpickle it (it could run code)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (not a torch file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file: {type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{path} is not a cifar-cam checkpoint (expected a dict with {', '.join(REQUIRED_KEYS)})"
        )
    # In Unicode's composed form, as data.py names class folders (checkpoints from before it may
    # hold macOS's decomposed names).
    state["classes"] = [unicodedata.normalize("NFC", str(c)) for c in state["classes"]]
    return state


def _damaged_record(path: Path) -> str | None:
    """The first record of a checkpoint (a zip archive) whose bytes fail their CRC: torch.load
    does not check them, and flipped bytes in a weight gave a model that scored NaN. Records
    saved without one (CRC 0: torch's `set_crc32_options(False)`) are skipped. None when all
    pass, or when the archive cannot be read this way (torch.load then says what it is)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                try:
                    with archive.open(record) as data:
                        while data.read(1 << 24):  # zipfile checks the CRC at the end
                            pass
                except zipfile.BadZipFile:
                    return record.filename
    except Exception:  # not a zip, an odd one, unreadable: torch.load gives the verdict
        return None
    return None


def weights_key(state: dict[str, Any], weights: str) -> str:
    """The checkpoint key of "scored" (the weights the run scored and chose best.pt with: its
    moving average when it kept one), "trained" or "ema" weights."""
    scored = state.get("scored") or ("ema" if "ema" in state else "model")  # older runs: the same rule
    return {"scored": scored, "trained": "model", "ema": "ema"}[weights]


def temperature_for(state: dict[str, Any], weights: str) -> float | None:
    """The calibration temperature, for the weights it was fitted on (the scored ones) only."""
    fitted = state.get("temperature")
    return fitted if fitted and weights_key(state, weights) == weights_key(state, "scored") else None


def model_from_checkpoint(state: dict[str, Any], weights: str = "scored") -> ResNet18:
    """Rebuild the plain model (no compile, no wrappers) in eval mode, with the "scored",
    "trained" or "ema" weights (see weights_key)."""
    key = weights_key(state, weights)
    if key not in state:
        raise CheckpointError("this checkpoint has no EMA weights (it was trained without --ema)")
    model = build_model(len(state["classes"]))
    try:
        model.load_state_dict(strip_wrapper_prefixes(state[key]))
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint weights do not fit the CIFAR ResNet-18: {str(err).splitlines()[0]}"
        ) from None
    return model.eval()


def data_for(state: dict[str, Any], override: str | None) -> Splits:
    """The data a checkpoint was trained on (or `override`, e.g. --data, which may be a test
    set only), refusing data whose class names differ: the checkpoint's outputs mean its
    class names."""
    config = state["config"]
    splits = load_splits(
        override if override is not None else config.get("data"), config.get("dataset", "cifar10")
    )
    return in_checkpoint_order(splits, list(state["classes"]))


def in_checkpoint_order(splits: Splits, classes: list[str]) -> Splits:
    """The data labelled as the checkpoint's outputs are (the same names, perhaps sorted otherwise
    where the data was unpacked); data with other names is refused."""
    theirs = list(splits.test.classes)
    if sorted(classes) != sorted(theirs):
        raise CheckpointError(f"the data's classes are not the checkpoint's ({splits.source}): "
                              f"{class_difference(classes, theirs)}")  # fmt: skip
    if classes != theirs:
        train = splits.train.in_order(classes) if splits.train is not None else None
        splits = Splits(train, splits.test.in_order(classes), splits.source)
    return splits


def run_on_checkpoint(args: Any, run: Callable[[Any, dict[str, Any], Path], int]) -> int:
    """evaluate.py's and explain.py's start: load --ckpt, choose --out (default: the checkpoint's
    folder), and run(args, checkpoint, out) while holding that folder, which is refused while a
    training run holds it."""
    from common.lock import share_folder

    state = load_checkpoint(args.ckpt)
    out = Path(args.out) if args.out else Path(args.ckpt).parent
    with share_folder(out):
        return run(args, state, out)


def library_versions() -> dict[str, str]:
    import lightning
    import torchmetrics
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "lightning": str(lightning.__version__),
        "torchmetrics": str(torchmetrics.__version__),
    }


def git_commit() -> str:
    """The commit of the code that trained, or '' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""
