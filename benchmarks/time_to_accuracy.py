"""Test accuracy per epoch of the real train.py, time to 90 / 93 / 94 %, and the final figures.

    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10-jpg.tar.gz   # the default recipe
    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10-jpg.tar.gz -- --epochs 8
    python benchmarks/time_to_accuracy.py --data ... --out runs/r8 -- --epochs 8 --batch-size 512 --lr 0.4

Runs train.py in a subprocess (flags after `--` go to it; its output goes to train.log in
--out) on full data, CPU or GPU, and prints one line per epoch as it ends:
`epoch=<n> acc=<test accuracy> train_s=<seconds in training steps so far>` (`val_acc=`, and the
90 / 93 / 94 % times on the held-out images, when train.py has --val-split). Then it runs
evaluate.py --tta on best.pt and prints the final line
`epochs=<n> acc=<plain> acc_tta=<flip + shifts> acc_flip=<flip> train_s=<s> wall_s=<s> eval_s=<s>`.
"train_s" sums the epochs' time in training steps (as airbench counts; on a GPU epoch 1 includes
compiling); "wall_s" is train.py from start to exit, start-up, data, scoring, compile and
checkpoints included; "eval_s" is the evaluate.py run after it. Stopped (SIGTERM, as timeout(1)
sends, or Ctrl-C), it stops train.py too, which saves last.pt where it was, and reports the
epochs train.py finished before it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (0.90, 0.93, 0.94)


def new_rows(metrics: Path, seen: int, started: float) -> list[dict]:
    """The rows after the first `seen` of this run's metrics.csv: one written before `started`
    (time.time()) is an older run's in the same folder, which train.py has not yet cleared."""
    try:
        if metrics.stat().st_mtime < started:
            return []
        with open(metrics, newline="") as f:
            return list(csv.DictReader(f))[seen:]
    except OSError:
        return []


def stop_with_this_script(child: subprocess.Popen, on_tick) -> None:
    """Stopped, this script stops `child` too rather than leave it running alone: SIGTERM is
    passed on; Ctrl-C reached the child already, as the terminal's whole process group. The
    epochs it finished meanwhile are reported (on_tick) before this script exits."""

    def stop(signum: int, frame) -> None:
        if signum == signal.SIGTERM:
            child.terminate()
        try:
            child.wait(timeout=60)  # train.py saves last.pt at the step it reached
        except subprocess.TimeoutExpired:
            child.kill()
        on_tick()
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def run_to_end(cmd: list[str], stdout, on_tick, stderr=subprocess.STDOUT) -> tuple[int, float]:
    """Run cmd, calling on_tick() every 5 s and once more at its end: (exit code, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
    stop_with_this_script(proc, on_tick)
    while True:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            on_tick()
            continue
        on_tick()
        return proc.returncode, time.perf_counter() - start


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
    started, seen, train_s, reached = time.time(), 0, 0.0, {}
    # With --val-split train.py scores the held-out images each epoch, not the test set.
    scored = "val_acc" if any(a.startswith("--val-split") for a in args.train_args) else "acc"

    def report_new_epochs() -> None:
        nonlocal seen, train_s
        for row in new_rows(out / "metrics.csv", seen, started):
            seen += 1
            train_s += float(row["epoch_s"])
            acc = float(row["monitor_acc"])
            reached.update({t: (train_s, seen) for t in TARGETS if t not in reached and acc >= t})
            print(f"epoch={seen} {scored}={acc:.4f} train_s={train_s:.1f}", flush=True)

    with open(out / "train.log", "w") as log:
        code, wall = run_to_end(cmd, log, report_new_epochs)
    if code != 0:
        print((out / "train.log").read_text()[-2000:], file=sys.stderr)
        return code

    evaluate = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(out / "best.pt")]
    evaluate += ["--tta"] if args.tta else []
    code, eval_s = run_to_end(evaluate, subprocess.DEVNULL, lambda: None, stderr=None)  # its errors shown
    if code != 0:
        return code
    report = json.loads((out / "evaluation.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    print(f"\ntrain.py: batch {config['batch_size']}, peak lr {config['lr']}, {config['epochs']} epochs, "
          f"precision {config['precision']}, device {config['accelerator']}")  # fmt: skip
    for target in TARGETS:  # on the set scored each epoch: the test set, or --val-split's
        if target in reached:
            print(
                f"  {100 * target:.0f}%: {reached[target][0]:8.1f}s of training (epoch {reached[target][1]})"
            )
        else:
            print(f"  {100 * target:.0f}%: not reached")
    tta = report["tta"] or {}
    acc_tta, acc_flip = (tta.get(k, {}).get("accuracy", float("nan")) for k in ("flip_translate", "flip"))
    print(f"epochs={seen} acc={report['accuracy']:.4f} acc_tta={acc_tta:.4f} acc_flip={acc_flip:.4f} "
          f"train_s={train_s:.1f} wall_s={wall:.1f} eval_s={eval_s:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
