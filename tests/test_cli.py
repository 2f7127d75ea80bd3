"""The scripts as a user runs them: real subprocesses, exit codes, one-line errors."""

import pytest


@pytest.mark.parametrize(
    "script, flag", [("train.py", "--resume"), ("evaluate.py", "--tta"), ("explain.py", "--layer")]
)
def test_help(run_script, script, flag):
    result = run_script(script, "--help")
    assert result.returncode == 0 and flag in result.stdout


# One refusal per script in a real process (what the user's terminal shows, warnings at import
# included); the other refusals are tested in-process beside each script's tests.
@pytest.mark.parametrize(
    "args, says",
    [
        pytest.param(
            lambda tmp: ["train.py", "--data", str(tmp / "nowhere"), "--out", str(tmp)],
            ["not found"],
            id="train-missing-data",
        ),
        pytest.param(
            lambda tmp: ["evaluate.py", "--ckpt", str(tmp / "missing.pt")],
            ["not found"],
            id="evaluate-missing-ckpt",
        ),
        pytest.param(lambda tmp: ["explain.py", "--n", "0"], ["--n"], id="explain-zero-n"),
    ],
)
def test_bad_flags_and_paths(tmp_path, run_script, one_line_error, args, says):
    result = run_script(*args(tmp_path))
    assert result.returncode == 2
    one_line_error(result.stderr, *says)
