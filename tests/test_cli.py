"""The scripts as a user runs them: real subprocesses, exit codes, one-line errors."""

import pytest
import torch


@pytest.mark.parametrize(
    "script, flag", [("train.py", "--resume"), ("evaluate.py", "--tta"), ("explain.py", "--layer")]
)
def test_help(run_script, script, flag):
    result = run_script(script, "--help")
    assert result.returncode == 0 and flag in result.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        pytest.param(
            lambda run, tmp: ["train.py", "--epochs", "-1"], ["--epochs"], id="train-negative-epochs"
        ),
        pytest.param(
            lambda run, tmp: ["train.py", "--data", str(tmp / "nowhere"), "--out", str(tmp)],
            ["not found"],
            id="train-missing-data",
        ),
        pytest.param(
            lambda run, tmp: ["evaluate.py", "--ckpt", str(tmp / "missing.pt")],
            ["not found"],
            id="evaluate-missing-ckpt",
        ),
        pytest.param(
            lambda run, tmp: ["explain.py", "--ckpt", str(run / "best.pt"), "--layer", "nope"],
            ["layer4"],
            id="explain-unknown-layer",
        ),
        pytest.param(lambda run, tmp: ["explain.py", "--n", "0"], ["--n"], id="explain-zero-n"),
    ],
)
def test_bad_flags_and_paths(tmp_path, trained_run, run_script, one_line_error, args, says):
    result = run_script(*args(trained_run, tmp_path))
    assert result.returncode == 2
    one_line_error(result.stderr, *says)


def test_checkpoint_that_runs_code_is_refused(tmp_path, run_script, one_line_error):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil(), "classes": [], "mean": [], "std": [], "config": {}}, tmp_path / "evil.pt")
    result = run_script("evaluate.py", "--ckpt", str(tmp_path / "evil.pt"))
    assert result.returncode == 2
    one_line_error(result.stderr, "refusing")
    assert not marker.exists()


def test_text_file_is_not_a_checkpoint(tmp_path, run_script, one_line_error):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    result = run_script("explain.py", "--ckpt", str(tmp_path / "text.pt"))
    assert result.returncode == 2
    one_line_error(result.stderr, "not a readable checkpoint")
