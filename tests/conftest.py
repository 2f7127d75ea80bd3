"""Shared fixtures: tiny, deterministic CIFAR-like data in every source format, a finished
training run, and the helpers several test files use (as fixtures: tests import nothing
from here)."""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.data import write_image_folder  # noqa: E402

SHARED_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The common flags of a short, exact CPU run on the tiny data. Peak lr and cutout are fixed so that
# these runs, and the tolerances measured on them, do not move with the recipe's defaults.
TRAIN_FLAGS = ["--epochs", "2", "--batch-size", "20", "--lr", "0.04", "--cutout", "8", "--crop-pad", "4"]
TRAIN_FLAGS += ["--precision", "32-true", "--accelerator", "cpu"]

# Denormals made CPU steps ~50x slower once an easy batch's loss collapsed.
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Decoded-data cache in a temp folder: tests never touch the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield


def easy_images(n_per_class: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,32,32,3) uint8 images whose class shows in their colour, plus noise; labels."""
    palette = np.random.default_rng(0).integers(30, 226, size=(n_classes, 3))  # same for all splits
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            noise = rng.integers(-30, 31, size=(32, 32, 3))
            images.append(np.clip(palette[c] + noise, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


def write_pickle_root(
    root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]
) -> Path:
    """The documented cifar-10-batches-py layout, in ImageFolder order (by class, then file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes]}, f)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(labels, kind="stable")  # image-folder order
        data = images[order].transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels[order].tolist()}, f)

    train_images, train_labels = splits["train"]
    half = len(train_images) // 2
    dump("data_batch_1", train_images[:half], train_labels[:half])
    dump("data_batch_2", train_images[half:], train_labels[half:])
    dump("test_batch", *splits["test"])
    return root


# --- values and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def root() -> Path:
    """The project's root folder, where the scripts are."""
    return ROOT


@pytest.fixture(scope="session")
def classes() -> list[str]:
    return list(CLASSES)


@pytest.fixture(scope="session")
def train_flags() -> list[str]:
    """The common flags of a short, exact CPU run on the tiny data."""
    return list(TRAIN_FLAGS)


@pytest.fixture(scope="session")
def shared_tarball() -> Path:
    """The real CIFAR-10 (JPEG copy) where this checkout has ../shared beside it."""
    if not SHARED_TARBALL.exists():
        pytest.skip("shared CIFAR-10 JPEG tarball not here")
    return SHARED_TARBALL


@pytest.fixture(scope="session")
def same_weights() -> Callable[[dict, dict], None]:
    """Asserts that two state dicts hold the same tensors, bit for bit."""

    def check(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

    return check


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., None]:
    """`one_line_error(stderr, *words)`: exactly one `error:` line, holding every word, and no
    traceback: how every refusal looks to the user."""

    def check(stderr: str, *words: str) -> None:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr
        assert "Traceback" not in stderr
        for word in words:
            assert word in lines[0], (word, lines[0])

    return check


@pytest.fixture(scope="session")
def run_script() -> Callable[..., subprocess.CompletedProcess]:
    """`run_script("train.py", *flags)`: the script as a user runs it, in a real process."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    return run


# The helper process behind `training_runs`: it imports train.py once (which runs no torch op,
# so forking after it is safe), then forks a run for each line it reads (a log file and
# train.py's arguments, tab-separated), says `started PID`, and `ended PID CODE` (minus the
# signal for a killed run) once the run is over. At the end of its input it kills what still runs.
FORK_SERVER = """
import os, select, signal, sys, traceback
os.chdir(sys.argv[1])
sys.path.insert(0, sys.argv[1])
import train

def run(log, args):
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the helper's command pipe
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        code = train.main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

running = set()
while True:
    if select.select([sys.stdin], [], [], 0.05)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        log, *args = line.rstrip("\\n").split("\\t")
        pid = os.fork()
        if pid == 0:
            run(log, args)
        running.add(pid)
        print("started", pid, flush=True)
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        running.discard(pid)
        print("ended", pid, os.waitstatus_to_exitcode(status), flush=True)
for pid in running:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


class TrainingRuns:
    """Real train.py processes, started in a fraction of a second each: forked from a helper
    that imported train.py once, where `python train.py` would pay ~9 s of imports each time."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "bufsize": 0}
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(ROOT)], env=env, **pipes)
        self.ended: dict[int, int] = {}

    def start(self, log: Path, *args: str) -> int:
        """Runs `train.py ARGS > LOG 2>&1`; its pid."""
        log.write_text("")  # nothing of an earlier run's log is read as this run's
        self.server.stdin.write(("\t".join([str(log), *args]) + "\n").encode())
        while True:
            word, pid, *code = self.next_line()
            if word == "started":
                self.ended.pop(int(pid), None)  # a pid used again
                return int(pid)
            self.ended[int(pid)] = int(code[0])

    def exit_code(self, pid: int, timeout: float = 300) -> int:
        """Waits for run `pid` to end: its exit code, or minus the signal that killed it."""
        while pid not in self.ended:
            word, ended, *code = self.next_line(timeout)
            if word == "ended":
                self.ended[int(ended)] = int(code[0])
        return self.ended[pid]

    def wait_until(self, pid: int, condition: Callable[[], bool], timeout: float = 120) -> bool:
        """Waits until `condition()` holds: False if run `pid` ends first, or after `timeout` s."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.running(pid):
            if condition():
                return True
            time.sleep(0.05)
        return False

    def shows(self, pid: int, log: Path, text: str) -> bool:
        """Waits until `text` is in run `pid`'s log: False if the run ends first."""
        return self.wait_until(pid, lambda: text in log.read_text(errors="replace"))

    @staticmethod
    def running(pid: int) -> bool:
        """Whether run `pid` is still going (the helper reaps a run within 50 ms of its end)."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def next_line(self, timeout: float = 300) -> list[str]:
        """The helper's next line, read a byte at a time so that `select` sees every one."""
        line, deadline = b"", time.time() + timeout
        while not line.endswith(b"\n"):
            ready = select.select([self.server.stdout], [], [], max(0.0, deadline - time.time()))[0]
            assert ready, f"no word from the helper that starts training runs in {timeout} s"
            byte = os.read(self.server.stdout.fileno(), 1)
            assert byte, f"the helper that starts training runs ended ({self.server.poll()})"
            line += byte
        return line.decode().split()

    def close(self) -> None:
        """Ends the helper, which kills the runs still going."""
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.server.stdout.close()


@pytest.fixture(scope="session")
def training_runs():
    runs = TrainingRuns()
    yield runs
    runs.close()


@pytest.fixture
def ctrl_c_at(monkeypatch) -> Callable[[int], None]:
    """`ctrl_c_at(n)`: the n-th training batch of this process sends itself SIGINT, as a
    user's Ctrl-C in the middle of an epoch would."""
    import train

    def arm(n: int) -> None:
        calls = {"n": 0}
        real_augment = train.augment

        def augment_then_ctrl_c(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real_augment(*args, **kwargs)

        monkeypatch.setattr(train, "augment", augment_then_ctrl_c)

    return arm


@pytest.fixture(scope="session")
def make_folder(tiny_arrays) -> Callable[[Path], Path]:
    """`make_folder(path)`: a fresh copy of the tiny image folder at `path`, to break."""
    return lambda path: write_image_folder(path, tiny_arrays, CLASSES)


# --- data and a finished run ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_arrays():
    return {"train": easy_images(6, 10, seed=1), "test": easy_images(3, 10, seed=2)}


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_arrays) -> Path:
    """60 training and 30 test PNG images, 10 classes."""
    return write_image_folder(tmp_path_factory.mktemp("tiny-folder"), tiny_arrays, CLASSES)


@pytest.fixture(scope="session")
def tiny_pickle(tmp_path_factory, tiny_arrays) -> Path:
    return write_pickle_root(tmp_path_factory.mktemp("tiny-pickle"), tiny_arrays, CLASSES)


@pytest.fixture(scope="session")
def tiny_tarball(tmp_path_factory, tiny_folder) -> Path:
    archive = tmp_path_factory.mktemp("tiny-tar") / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_folder, arcname="wrapped")
    return archive


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_folder) -> Path:
    """A finished 2-epoch training run on the tiny folder: best.pt, last.pt, metrics..."""
    import train

    out = tmp_path_factory.mktemp("run")
    assert train.main(["--data", str(tiny_folder), *TRAIN_FLAGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def val_split_run(tmp_path_factory, tiny_folder) -> Path:
    """A finished 3-epoch run that held 20 training images out for validation. Its validation
    accuracy is set to 50, 90 and 40 % (the loss is the real one), so its best epoch is the
    second: on the tiny data the real accuracy only rises, and best would be the last."""
    import train

    out = tmp_path_factory.mktemp("val-run")
    args = ["--data", str(tiny_folder), *TRAIN_FLAGS, "--epochs", "3", "--val-split", "20", "--out", str(out)]
    accuracies, real_score = iter([0.5, 0.9, 0.4]), train.score
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "score", lambda t, model: (real_score(t, model)[0], next(accuracies)))
        assert train.main(args) == 0
    return out
