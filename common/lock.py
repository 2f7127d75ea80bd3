"""One training run per results folder.

train.py holds an exclusive OS lock (`flock`) on `<folder>/.cifar-cam.lock` for its whole run.
The kernel drops it when the process ends, however it ends (kill -9 included), so a stale
lock is never left behind. A second train.py on the folder, or evaluate.py / explain.py
writing into it, is refused with one line naming the folder and the running process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.options import UsageError

LOCK_NAME = ".cifar-cam.lock"


def _take(handle: IO, folder: Path, mode: int, advice: str) -> None:
    """flock without waiting; a folder another process holds is one line for the user."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{folder} is in use by {_holder(handle)}; {advice}") from None


def _holder(handle: IO) -> str:
    """Who holds the lock: the training run whose pid is in the file, if it is alive, else an
    evaluate.py or explain.py (they share the lock and write no pid)."""
    handle.seek(0)
    pid = handle.read().strip()
    try:
        os.kill(int(pid), 0)
        return f"a running train.py (process {pid})"
    except (ValueError, ProcessLookupError, PermissionError):
        return "a running evaluate.py or explain.py"


@contextlib.contextmanager
def hold_folder(folder: Path) -> Iterator[None]:
    """For train.py: hold the folder, alone, for the duration of the block."""
    with open(folder / LOCK_NAME, "a+") as handle:
        _take(handle, folder, fcntl.LOCK_EX, "wait for it to finish, or pass --out to train elsewhere")
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def remove_if_unused(folder: Path, *parents: Path) -> None:
    """Remove a folder that holds nothing but its lock file (a run made it, then was refused),
    then each of `parents` (those made for it, innermost first) while it is left empty."""
    with contextlib.suppress(OSError):  # a folder not empty stops the walk: its parents are not either
        if [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            for made in (folder, *parents):
                made.rmdir()


@contextlib.contextmanager
def share_folder(folder: Path) -> Iterator[None]:
    """For evaluate.py and explain.py: write into the folder, for the duration of the block, only
    if no training run holds it (and keep one from starting there meanwhile)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # the lock file may exist in a folder now read-only
        handle = open(folder / LOCK_NAME, "a+")
    except OSError as err:  # a read-only share or somebody else's folder: the checkpoint's, by default
        raise UsageError(f"cannot write into {folder} ({err.strerror}): pass --out to write the results "
                         "elsewhere") from None  # fmt: skip
    with handle:
        _take(handle, folder, fcntl.LOCK_SH, "pass --out to write the results elsewhere")
        yield
