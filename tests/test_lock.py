"""One run per results folder: a real training process holds it, with an OS lock that dies
with its holder."""

import contextlib
import importlib
import os
import signal

import pytest


@contextlib.contextmanager
def training_in(folder, tiny_folder, train_flags, training_runs):
    """A real train.py that holds folder/run for a long run; killed (-9) on exit."""
    out, log = folder / "run", folder / "log.txt"
    args = ["--data", str(tiny_folder), *train_flags, "--epochs", "500", "--out", str(out)]
    pid = training_runs.start(log, *args)
    try:
        training_for_real = training_runs.wait_until(pid, (out / "last.pt").exists)
        assert training_for_real, log.read_text()[-2000:]
        yield pid, out
    finally:
        if training_runs.running(pid):
            os.kill(pid, signal.SIGKILL)
        training_runs.exit_code(pid)


@pytest.fixture(scope="module")
def paused_train(tmp_path_factory, tiny_folder, train_flags, training_runs):
    """A real train.py, paused (SIGSTOP) once it trains: it still holds its folder, and its files
    stay still. One for all the refusal cases."""
    with training_in(tmp_path_factory.mktemp("held"), tiny_folder, train_flags, training_runs) as (pid, out):
        os.kill(pid, signal.SIGSTOP)
        yield pid, out


def snapshot(folder):
    """Every file's name, size and modification time."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


@pytest.mark.parametrize(
    "command, says",
    [
        pytest.param(lambda out, data: ["train", "--data", data, "--out", str(out)], "train elsewhere",
                     id="second-train"),
        pytest.param(lambda out, data: ["train", "--resume", str(out / "last.pt")], "train elsewhere",
                     id="resume-of-the-running-run"),
        pytest.param(lambda out, data: ["evaluate", "--ckpt", str(out / "best.pt")], "--out", id="evaluate"),
        pytest.param(lambda out, data: ["explain", "--ckpt", str(out / "best.pt")], "--out", id="explain"),
    ],
)  # fmt: skip
def test_a_folder_in_use_is_refused_at_once(paused_train, tiny_folder, one_line_error, capsys, command, says):
    pid, out = paused_train
    script, *args = command(out, str(tiny_folder))
    before = snapshot(out)
    # Run here, not in a new process (~9 s of imports each): flock locks belong to each open() of
    # the file, so this process is refused exactly as another would be.
    assert importlib.import_module(script).main(args) == 2
    after = snapshot(out)
    printed = capsys.readouterr()
    one_line_error(printed.err, str(out), f"process {pid}", says)
    assert "data " not in printed.out and "checkpoint " not in printed.out  # at once: before any data
    assert after == before  # the refused run touched nothing


def test_a_killed_run_leaves_no_stale_lock(tmp_path, tiny_folder, train_flags, training_runs):
    import train

    with training_in(tmp_path, tiny_folder, train_flags, training_runs) as (pid, out):
        os.kill(pid, signal.SIGKILL)
        assert training_runs.exit_code(pid) == -signal.SIGKILL
    args = ["--data", str(tiny_folder), *train_flags, "--epochs", "1", "--out", str(out), "--overwrite"]
    assert train.main(args) == 0  # in this process: the next run takes the folder


def test_a_folder_evaluate_writes_into_is_not_trained_in(
    tmp_path, tiny_folder, train_flags, one_line_error, capsys
):
    import train
    from common.lock import share_folder

    # flock locks belong to each open() of the file, so this process's own train.main is refused too.
    with share_folder(tmp_path):  # as evaluate.py and explain.py hold it while they write
        assert train.main(["--data", str(tiny_folder), *train_flags, "--out", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, str(tmp_path), "evaluate.py or explain.py")
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize(
    "existed",
    [["runs", "mine"], ["runs"], []],
    ids=["existing-folder-kept", "new-folder-removed", "new-parent-removed"],
)
def test_a_run_refused_for_its_data_leaves_no_folder_of_its_own(
    tmp_path, train_flags, one_line_error, capsys, existed
):
    """`--out runs/mine`: the folders the refused run made go again; those there before stay."""
    import train

    out = tmp_path / "runs" / "mine"
    if existed:
        tmp_path.joinpath(*existed).mkdir(parents=True)
    assert train.main(["--data", str(tmp_path / "no-such-data"), *train_flags, "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "data path not found")
    assert [out.parent.exists(), out.exists()] == [len(existed) >= 1, len(existed) == 2]
