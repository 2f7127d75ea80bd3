"""torchrun on the CPU: the ranks must join one process group, not run side by side."""
import subprocess
import sys

import torch

from conftest import ROOT


def test_two_cpu_ranks_form_one_group(tmp_path, tiny_folder):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--accelerator", "cpu", "--data", str(tiny_folder), "--epochs", "2",
           "--batch-size", "20", "--precision", "32-true", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # World size 2 is only reported when both ranks joined one group; N independent
    # single-process runs would each say "x1" and each print a summary.
    assert "device    cpu x2" in result.stdout and "x1," not in result.stdout
    assert result.stdout.count("\nsummary") == 1
    assert "10 per process" in result.stdout
    assert "final weights identical on every rank" in result.stdout
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    # Every global batch of 20 was seen: 60 images, 3 steps of 20, two shards of 10.
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3
