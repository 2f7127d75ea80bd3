"""Kills, bad files, full disks and lost ranks: a result is never lost or corrupted."""

import contextlib
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import train
from common.checkpoint import load_checkpoint

# Where the kills land, in order: (the epoch, what the log shows first, the longest wait after
# it, in seconds or in this run's own first steps of that epoch). Each epoch has 3 steps, so "33%"
# is the first step's end: a kill within half that step's time lands in the second or third step
# however fast the machine is (a time measured in another run, while other work shared the
# cores, once put a kill past the epoch's checkpoint). The epoch line comes after scoring, before
# the writes. A point whose epoch a resumed run skips (it was saved before the kill) is dropped.
KILL_POINTS = [
    (1, "epoch 1/2:  33%", 0.5, 0.0),  # epoch 1's steps: nothing saved yet, the next run starts afresh
    (1, "epoch   1/2  train", 0.0, 0.2),  # writing epoch 1's checkpoints, metrics, curves, report
    (2, "epoch 2/2:  33%", 0.5, 0.0),  # epoch 2's steps: the next run resumes from epoch 1
    (2, "epoch   2/2  train", 0.0, 0.2),  # writing the final files
]


def test_kill_9_at_random_points_then_resume_is_exact(
    tmp_path, tiny_folder, trained_run, train_flags, training_runs, same_weights
):
    """kill -9 the real process in each part of a run; every checkpoint left behind loads, and
    the resumed run ends with the uninterrupted run's weights, bit for bit."""
    rng = random.Random(0)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    points, kills, resumed, attempts = list(KILL_POINTS), 0, 0, []
    for _attempt in range(8):
        resume = (out / "last.pt").exists()
        saved = load_checkpoint(out / "last.pt")["epoch"] if resume else 0
        points = [point for point in points if point[0] > saved]
        resumed += resume
        args = (
            ["--resume", str(out / "last.pt")]
            if resume
            else ["--data", str(tiny_folder), *train_flags, "--out", str(out)]
        )
        pid = training_runs.start(log, *args)
        wait = None
        if points:
            epoch, shows, steps, seconds = points.pop(0)
            training_runs.shows(pid, log, f"epoch {epoch}/2:")  # the epoch's progress bar starts
            bar_began = time.perf_counter()
            if training_runs.shows(pid, log, shows):
                first_step_s = time.perf_counter() - bar_began
                wait = rng.uniform(0.0, steps * first_step_s + seconds)
                time.sleep(wait)
                with contextlib.suppress(ProcessLookupError):  # it may have just finished
                    os.kill(pid, signal.SIGKILL)
        code = training_runs.exit_code(pid)
        kills += code == -signal.SIGKILL
        attempts.append((saved, wait, code))  # what a failure's message shows
        for name in ("last.pt", "best.pt"):
            if (out / name).exists():
                load_checkpoint(out / name)  # never torn
        if code == 0:
            break
        assert code == -signal.SIGKILL, log.read_text()[-2000:]
    assert code == 0 and kills >= 3 and resumed >= 2, attempts
    assert not list(out.glob(".*.tmp*"))
    final = torch.load(out / "last.pt", weights_only=True)
    same_weights(final["model"], torch.load(trained_run / "last.pt", weights_only=True)["model"])


# Imports torch and the writer once (~9 s on 2 cores), then forks a fresh writer per line read: each writer
# prints its pid after its first complete write and rewrites the file until it is killed.
WRITERS = """
import os, sys, torch
sys.path.insert(0, sys.argv[2])
from common.checkpoint import save_checkpoint
torch.set_num_threads(1)  # no thread pool for the forked writers to inherit
states = [{"model": {"w": torch.full((1_000_000,), float(v))}, "v": v} for v in (1, 2)]
save_checkpoint(states[0], sys.argv[1])  # its first call imports what it needs: once, before forking
while sys.stdin.readline():
    writer = os.fork()
    if writer == 0:
        try:
            i = 0
            while True:
                save_checkpoint(states[i % 2], sys.argv[1])
                i += 1
                if i == 1:
                    print(os.getpid(), flush=True)
        finally:
            os._exit(1)
    os.waitpid(writer, 0)
    print("reaped", flush=True)
"""


def test_kill_9_during_checkpoint_writes_never_tears_the_file(tmp_path, root):
    rng = random.Random(1)
    target = tmp_path / "ckpt.pt"
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    writers = subprocess.Popen([sys.executable, "-c", WRITERS, str(target), str(root)], **pipes)
    try:
        for _ in range(5):
            writers.stdin.write("write\n")
            writers.stdin.flush()
            pid = int(writers.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            assert writers.stdout.readline().strip() == "reaped"
            state = torch.load(target, weights_only=True)
            assert state["v"] in (1, 2) and torch.all(state["model"]["w"] == state["v"])
    finally:
        writers.kill()
        writers.wait()


def test_full_disk_leaves_the_good_checkpoint_alone(tmp_path, tiny_folder, train_flags, root, ctrl_c_at):
    # An unfinished run: Ctrl-C in epoch 2 leaves last.pt (epoch 1, step 2) and best.pt.
    out = tmp_path / "run"
    ctrl_c_at(5)
    assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(out)]) == 130
    good_last, good_best = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()

    def small_file_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    result = subprocess.run(
        [sys.executable, "train.py", "--resume", str(out / "last.pt")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_file_limit,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "could not write best.pt" in error_lines[0], error_lines
    assert "the previous best.pt, if any, is unharmed" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert (out / "last.pt").read_bytes() == good_last and (out / "best.pt").read_bytes() == good_best
    assert not list(out.glob(".*.tmp*"))


def test_a_results_folder_evaluate_cannot_write_says_pass_out(tmp_path, trained_run, one_line_error, capsys):
    """By default the checkpoint's own folder, which may be a read-only share."""
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "sub"
    assert evaluate.main(["--ckpt", str(trained_run / "best.pt"), "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, f"cannot write into {out}", "pass --out")


def test_out_that_cannot_be_created(tmp_path, tiny_folder, train_flags, capsys):
    (tmp_path / "file").write_text("a regular file")
    assert (
        train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path / "file" / "sub")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def truncated(run, path):
    path.write_bytes((run / "best.pt").read_bytes()[:100_000])


def damaged(run, path):
    """Bytes flipped inside the largest weight: torch.load reads it; its CRC says it is wrong."""
    data = bytearray((run / "best.pt").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(255 - b for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


def text_file(run, path):
    path.write_text("not a checkpoint")


def run_folder(run, path):
    path.mkdir()
    (path / "best.pt").write_bytes((run / "best.pt").read_bytes())


def imagenet_resnet(run, path):
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), path)


def other_weights(run, path):
    state = torch.load(run / "best.pt", weights_only=True)
    state["model"] = {"fc.weight": torch.zeros(10, 512)}
    torch.save(state, path)


@pytest.mark.parametrize(
    "make, says",
    [
        pytest.param(truncated, "not a readable checkpoint", id="truncated"),
        pytest.param(text_file, "not a readable checkpoint", id="text-file"),
        pytest.param(damaged, "fails its checksum", id="damaged-bytes"),
        pytest.param(imagenet_resnet, "not a cifar-cam checkpoint", id="another-models-state-dict"),
        pytest.param(other_weights, "do not fit the CIFAR ResNet-18", id="other-weights"),
        pytest.param(run_folder, "is a folder, not a checkpoint: name the file (", id="a-run-folder"),
    ],
)
def test_broken_and_foreign_checkpoints(tmp_path, trained_run, make, says, one_line_error, capsys):
    make(trained_run, tmp_path / "bad.pt")
    assert evaluate.main(["--ckpt", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    one_line_error(err, says)


def test_a_checkpoint_saved_without_crcs_is_not_damaged(tmp_path, trained_run):
    """torch can save without them (set_crc32_options(False), for speed): every record's CRC is 0."""
    state = torch.load(trained_run / "best.pt", weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp_path / "no-crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(tmp_path / "no-crc.pt")["classes"] == state["classes"]


def test_checkpoint_that_runs_code_is_refused(tmp_path, one_line_error, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil(), "classes": [], "mean": [], "std": [], "config": {}}, tmp_path / "evil.pt")
    assert evaluate.main(["--ckpt", str(tmp_path / "evil.pt")]) == 2
    one_line_error(capsys.readouterr().err, "refusing")
    assert not marker.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(node_rank, port, out, tiny_folder, train_flags, root, extra=()):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    cmd = [*torchrun, "train.py", "--data", str(tiny_folder), *train_flags, "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_on_loopback(tmp_path, tiny_folder, train_flags, root):
    port = free_port()
    nodes = [torchrun_node(rank, port, tmp_path / "run", tiny_folder, train_flags, root) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "device    cpu x2" in outputs[0] and "identical on every rank" in outputs[0]
    assert "summary" not in outputs[1]  # only global rank 0 prints
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2


def test_a_dead_node_makes_the_other_exit_in_bounded_time(tmp_path, tiny_folder, train_flags, root):
    port = free_port()
    extra = ["--dist-timeout", "20", "--epochs", "50", "--overwrite"]
    nodes = [
        torchrun_node(rank, port, tmp_path / "run", tiny_folder, train_flags, root, extra) for rank in (0, 1)
    ]
    time.sleep(1)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.csv").exists():
        time.sleep(0.2)
    assert (tmp_path / "run" / "metrics.csv").exists(), "training never started"
    subprocess.run(["pkill", "-9", "-P", str(nodes[1].pid)])  # node 1's worker dies
    nodes[1].kill()
    start = time.time()
    output = nodes[0].communicate(timeout=120)[0]
    assert nodes[0].returncode != 0
    assert time.time() - start < 90
    assert "error: rank 0 lost contact with the other processes" in output


def test_a_hung_node_times_out_after_dist_timeout(tmp_path, tiny_folder, train_flags, root):
    port = free_port()
    extra = ["--dist-timeout", "15", "--epochs", "50", "--overwrite"]
    nodes = [
        torchrun_node(rank, port, tmp_path / "run", tiny_folder, train_flags, root, extra) for rank in (0, 1)
    ]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "metrics.csv").exists():
            time.sleep(0.2)
        assert (tmp_path / "run" / "metrics.csv").exists(), "training never started"
        subprocess.run(["pkill", "-STOP", "-P", str(nodes[1].pid)])  # alive but silent
        start = time.time()
        output = nodes[0].communicate(timeout=120)[0]
        waited = time.time() - start
        assert nodes[0].returncode != 0
        assert waited < 15 + 45, waited  # the timeout plus shutdown, not forever
        assert "error: rank 0 lost contact with the other processes" in output
    finally:
        subprocess.run(["pkill", "-9", "-P", str(nodes[1].pid)])
        nodes[1].kill()
        nodes[1].wait()
