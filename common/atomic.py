"""The one way this project writes a file: atomically.

A reader (or a process killed half-way) sees the old file or the new one, never a torn one:
the bytes go to a hidden temporary file in the same folder, are flushed and fsynced, and the
temporary file is renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_GLOB = ".*.tmp[0-9]*"  # what a killed writer can leave behind: .<name>.tmp<pid>


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`with atomic_write(path, "wb") as f: ...` replaces `path` only if the block succeeds.

    A failed write (disk full, file-size limit, ...) raises OSError with one line for the user
    and leaves the previous file as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    binary = "b" in mode
    try:
        with open(tmp, mode, **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(
            err.errno,
            f"could not write {path.name} ({err.strerror or err}); "
            f"the previous {path.name}, if any, is unharmed",
            str(path),
        ) from None
    except RuntimeError as err:  # torch.save reports some write failures this way
        raise OSError(
            None,
            f"could not write {path.name} ({str(err).splitlines()[0][:80]}); "
            f"the previous {path.name}, if any, is unharmed",
            str(path),
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files left by a process killed while writing."""
    for stale in folder.glob(TMP_GLOB):
        stale.unlink(missing_ok=True)
