"""Test accuracy per epoch of the real train.py, time to 90 / 93 / 94 %, and the final figures.

    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10-jpg.tar.gz   # the default recipe
    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10-jpg.tar.gz -- --epochs 8
    python benchmarks/time_to_accuracy.py --data ... --out runs/r8 -- --epochs 8 --batch-size 512 --lr 0.4

Runs train.py in a subprocess (flags after `--` go to it; its output goes to train.log in
--out) on full data, CPU or GPU, and prints one line per epoch as it ends:
`epoch=<n> acc=<test accuracy> train_s=<seconds in training steps so far>`. Then it runs
evaluate.py --tta on best.pt and prints the final line
`epochs=<n> acc=<plain> acc_tta=<flip + shifts> acc_flip=<flip> train_s=<s> wall_s=<s>`.
"train_s" sums the epochs' time in training steps (as airbench counts); "wall" is the whole
run, start-up, data, scoring, compile and checkpoints included.
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


def new_rows(metrics: Path, seen: int) -> list[dict]:
    try:
        with open(metrics, newline="") as f:
            return list(csv.DictReader(f))[seen:]
    except OSError:
        return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data source for train.py (default: its download)")
    p.add_argument("--out", default=None, help="results folder (default: a new temporary one)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate best.pt with TTA too (default on)",
    )
    p.add_argument("train_args", nargs="*", help="flags for train.py, after --")
    args = p.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="time-to-accuracy-"))
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--out", str(out), "--overwrite", *args.train_args]
    cmd += ["--data", args.data] if args.data else []
    print("running:", " ".join(cmd), f"(output in {out / 'train.log'})", flush=True)
    start = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        seen, train_s, reached = 0, 0.0, {}
        while True:
            done = proc.poll() is not None
            for row in new_rows(out / "metrics.csv", seen):
                seen += 1
                train_s += float(row["epoch_s"])
                acc = float(row["monitor_acc"])
                reached.update({t: (train_s, seen) for t in TARGETS if t not in reached and acc >= t})
                print(f"epoch={seen} acc={acc:.4f} train_s={train_s:.1f}", flush=True)
            if done:
                break
            time.sleep(5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print((out / "train.log").read_text()[-2000:], file=sys.stderr)
        return proc.returncode

    evaluate = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(out / "best.pt")]
    evaluate += ["--tta"] if args.tta else []
    subprocess.run(evaluate, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "evaluation.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    print(f"\ntrain.py: batch {config['batch_size']}, peak lr {config['lr']}, {config['epochs']} epochs, "
          f"precision {config['precision']}, device {config['accelerator']}")  # fmt: skip
    for target in TARGETS:
        if target in reached:
            print(
                f"  {100 * target:.0f}%: {reached[target][0]:8.1f}s of training (epoch {reached[target][1]})"
            )
        else:
            print(f"  {100 * target:.0f}%: not reached")
    tta = report["tta"] or {}
    acc_tta, acc_flip = (tta.get(k, {}).get("accuracy", float("nan")) for k in ("flip_translate", "flip"))
    print(f"epochs={seen} acc={report['accuracy']:.4f} acc_tta={acc_tta:.4f} acc_flip={acc_flip:.4f} "
          f"train_s={train_s:.1f} wall_s={wall:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
