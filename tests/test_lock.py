"""One run per results folder: real processes, an OS lock that dies with its holder."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest


@contextlib.contextmanager
def training_in(folder, tiny_folder, train_flags, root):
    """A real train.py that holds folder/run for a long run; killed (-9) on exit."""
    out, log = folder / "run", folder / "log.txt"
    args = ["train.py", "--data", str(tiny_folder), *train_flags, "--epochs", "500", "--out", str(out)]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=root, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "last.pt").exists():  # training for real
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        yield proc, out
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def paused_train(tmp_path_factory, tiny_folder, train_flags, root):
    """A real train.py, paused (SIGSTOP) once it trains: it still holds its folder, and its files
    stay still. One for all the refusal cases (a run each cost ~10 s to start)."""
    with training_in(tmp_path_factory.mktemp("held"), tiny_folder, train_flags, root) as (proc, out):
        os.kill(proc.pid, signal.SIGSTOP)
        yield proc, out


def snapshot(folder):
    """Every file's name, size and modification time."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


@pytest.mark.parametrize(
    "command, says",
    [
        pytest.param(lambda out, data: ["train.py", "--data", data, "--out", str(out)], "train elsewhere",
                     id="second-train"),
        pytest.param(lambda out, data: ["train.py", "--resume", str(out / "last.pt")], "train elsewhere",
                     id="resume-of-the-running-run"),
        pytest.param(lambda out, data: ["evaluate.py", "--ckpt", str(out / "best.pt")], "--out",
                     id="evaluate"),
        pytest.param(lambda out, data: ["explain.py", "--ckpt", str(out / "best.pt")], "--out",
                     id="explain"),
    ],
)  # fmt: skip
def test_a_folder_in_use_is_refused_at_once(
    paused_train, tiny_folder, run_script, one_line_error, command, says
):
    proc, out = paused_train
    before = snapshot(out)
    result = run_script(*command(out, str(tiny_folder)))
    after = snapshot(out)
    assert result.returncode == 2
    one_line_error(result.stderr, str(out), f"process {proc.pid}", says)
    assert "data " not in result.stdout and "checkpoint " not in result.stdout  # at once: before any data
    assert after == before  # the refused process touched nothing


def test_a_killed_run_leaves_no_stale_lock(tmp_path, tiny_folder, train_flags, root, run_script):
    with training_in(tmp_path, tiny_folder, train_flags, root) as (proc, out):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    args = ["--data", str(tiny_folder), *train_flags, "--epochs", "1", "--out", str(out), "--overwrite"]
    result = run_script("train.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr


def test_a_folder_evaluate_writes_into_is_not_trained_in(
    tmp_path, tiny_folder, train_flags, run_script, one_line_error
):
    from common.lock import share_folder

    with share_folder(tmp_path):  # as evaluate.py and explain.py hold it while they write
        result = run_script("train.py", "--data", str(tiny_folder), *train_flags, "--out", str(tmp_path))
    assert result.returncode == 2
    one_line_error(result.stderr, str(tmp_path), "evaluate.py or explain.py")
    assert not (tmp_path / "last.pt").exists()
