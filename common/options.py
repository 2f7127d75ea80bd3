"""Command-line plumbing shared by the three scripts: parsers and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class UsageError(Exception):
    """A bad flag or a refused action: the message is one line meant for the user."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit 2), not usage plus a message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_data_option(
    parser: argparse.ArgumentParser, help_default: str, default=None, test_only: bool = False
) -> None:
    sets = (
        "; or a test set alone: a folder with test/<class>/ only, or a folder of class folders "
        "(CIFAR-10.1, CIFAR-10-C exported as images), or a .tar.gz of one"
        if test_only
        else ""
    )
    parser.add_argument(
        "--data",
        default=default,
        metavar="PATH",
        help=(
            "CIFAR source: a cifar-10-batches-py or cifar-100-python folder, an image folder with "
            f"train/<class>/ and test/<class>/, or a .tar.gz of one{sets}; {help_default}"
        ),
    )


def add_accelerator_option(parser: argparse.ArgumentParser, default="auto") -> None:
    parser.add_argument(
        "--accelerator",
        default=default,
        choices=("auto", "cpu", "cuda", "gpu"),
        help="device to run on (default: auto, a GPU when there is one)",
    )


def add_weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        choices=("scored", "trained", "ema"),
        default="scored",
        help="scored (default): the weights the run scored and chose best.pt with, i.e. the moving "
        "average when it was trained with --ema; trained: the optimizer's weights; ema: the average",
    )
    parser.add_argument("--ema", action="store_true", help="the same as --weights ema")


def chosen_weights(args: argparse.Namespace) -> str:
    """What --weights and --ema ask for: scored, trained or ema."""
    return "ema" if args.ema else args.weights


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, a batch scheduler, torchrun stopping its workers) stops a script as Ctrl-C
    does, one line and exit 130, rather than killing it without a word. Only for a script started
    from the command line (`main()` reads sys.argv): a test or notebook calling main(argv) keeps
    its own SIGTERM. train.py's loop installs its own handler for both while it trains."""
    if threading.current_thread() is not threading.main_thread():  # only there can handlers be set
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn the project's user-facing errors into one line on stderr and exit code 2."""
    from common.checkpoint import CheckpointError
    from common.data import DataError

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            with sigterm_as_ctrl_c() if argv is None else contextlib.nullcontext():
                return main(argv)
        except (UsageError, DataError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # unwritable --out, full disk, ...
            where = f": {err.filename}" if getattr(err, "filename", None) else ""
            print(f"error: {err.strerror or err}{where}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # outside the training loop's own handling
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
