"""The scripts as a user runs them: real subprocesses, exit codes, one-line errors."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script,flag", [("train.py", "--resume"), ("evaluate.py", "--tta"),
                                         ("explain.py", "--layer")])
def test_help(script, flag):
    result = run(script, "--help")
    assert result.returncode == 0 and flag in result.stdout


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_bad_flags_and_paths(tmp_path, trained_run):
    assert_one_line_error(run("train.py", "--epochs", "-1"), "--epochs")
    assert_one_line_error(run("train.py", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)),
                          "not found")
    assert_one_line_error(run("evaluate.py", "--ckpt", str(tmp_path / "missing.pt")), "not found")
    assert_one_line_error(run("explain.py", "--ckpt", str(trained_run / "best.pt"), "--layer", "nope"),
                          "layer4")
    assert_one_line_error(run("explain.py", "--n", "0"), "--n")


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil(), "classes": [], "mean": [], "std": [], "config": {}}, tmp_path / "evil.pt")
    result = run("evaluate.py", "--ckpt", str(tmp_path / "evil.pt"))
    assert_one_line_error(result, "refusing")
    assert not marker.exists()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert_one_line_error(run("explain.py", "--ckpt", str(tmp_path / "text.pt")), "not a readable checkpoint")
