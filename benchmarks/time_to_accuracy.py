"""Wall time to 90 / 93 / 94 % test accuracy of the real train.py, and its final accuracy.

    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10-jpg.tar.gz
    python benchmarks/time_to_accuracy.py --data ... -- --epochs 2 --subset 2000   # CPU smoke run

Runs `train.py` in a subprocess (any flags after `--` go to it) into a temporary folder
and reads its metrics.csv and summary.json. "train time" sums the epochs' time in
training steps (as airbench counts); "wall" is the whole process, start-up, data,
monitor evaluation, compile and checkpoints included. Meant for a GPU; on CPU pass --subset.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (0.90, 0.93, 0.94)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("train_args", nargs="*", help="flags for train.py, after --")
    args = p.parse_args()

    out = Path(tempfile.mkdtemp(prefix="time-to-accuracy-"))
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), *args.train_args]
    if args.data:
        cmd += ["--data", args.data]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    summary = json.loads((out / "summary.json").read_text())
    import torch

    device = (
        torch.cuda.get_device_name()
        if summary["config"]["accelerator"] == "cuda"
        else f"CPU ({__import__('common.hardware', fromlist=['x']).cpu_name()})"
    )
    print(
        f"\ndevice {device}, precision {summary['config']['precision']}, "
        f"{len(rows)} epochs, batch {summary['config']['batch_size']}"
    )
    train_time = 0.0
    reached = {}
    for row in rows:
        train_time += float(row["epoch_s"])
        for target in TARGETS:
            if target not in reached and float(row["monitor_acc"]) >= target:
                reached[target] = (train_time, int(row["epoch"]))
    for target in TARGETS:
        if target in reached:
            t, epoch = reached[target]
            print(f"  {100 * target:.0f}%: {t:7.1f}s of training (epoch {epoch})")
        else:
            print(f"  {100 * target:.0f}%: not reached")
    print(
        f"  final {summary['monitor_set']} accuracy {100 * float(rows[-1]['monitor_acc']):.2f}%, "
        f"train time {train_time:.1f}s, wall {wall:.1f}s"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
