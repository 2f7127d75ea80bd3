"""The scripts as a user runs them: help, exit codes, one-line errors."""

import importlib

import pytest


@pytest.mark.parametrize(
    "script, flag", [("train", "--resume"), ("evaluate", "--tta"), ("explain", "--layer")]
)
def test_help(script, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main(["--help"])
    assert exit_.value.code == 0 and flag in capsys.readouterr().out


# Each script started as a user starts it, in a real process, by one refusal each (what the
# terminal shows, warnings at import included); the other refusals run in-process beside each
# script's tests.
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


def test_sigterm_stops_a_script_as_ctrl_c_does(run_script):
    """`kill PID` or a batch scheduler: one line and exit 130, not a silent death (the training
    loop's own handling, which saves last.pt, is tested beside train.py)."""
    code = (
        "import os, signal, time\n"
        "from common.options import command\n"
        "main = command(lambda argv: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(60) or 0)\n"
        "raise SystemExit(main())\n"
    )
    result = run_script("-c", code)
    assert result.returncode == 130 and result.stderr.strip() == "interrupted"
