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
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from common.options import UsageError

LOCK_NAME = ".cifar-cam.lock"


def _take(handle: IO, folder: Path, mode: int, advice: str) -> None:
    """flock without waiting; a folder held by a training run is one line for the user."""
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip()
        holder = f"process {pid}" if pid else "another process"
        raise UsageError(f"{folder} is in use by a running train.py ({holder}); {advice}") from None


@contextlib.contextmanager
def hold_folder(folder: Path) -> Iterator[None]:
    """For train.py: hold the folder for the duration of the block."""
    with open(folder / LOCK_NAME, "a+") as handle:
        _take(handle, folder, fcntl.LOCK_EX, "wait for it to finish, or pass --out to train elsewhere")
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def refuse_if_training(folder: Path) -> None:
    """For evaluate.py and explain.py: a folder that a training run holds is not written into."""
    if (folder / LOCK_NAME).exists():
        with open(folder / LOCK_NAME) as handle:
            _take(handle, folder, fcntl.LOCK_SH, "pass --out to write the results elsewhere")
