"""Evaluate a saved checkpoint on the CIFAR-10 test set.

    python evaluate.py --ckpt best.pt            # data source recorded in the checkpoint
    python evaluate.py --ckpt best.pt --tta      # also report flip test-time augmentation

Needs only the checkpoint (and the data). Writes beside the checkpoint (or into --out):
confusion_matrix.png, calibration.png, misclassified.png, predictions.csv, evaluation.json,
and report.html (rebuilt from every result file in that folder).
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import (MulticlassAccuracy, MulticlassCalibrationError,
                                         MulticlassConfusionMatrix, MulticlassPrecision,
                                         MulticlassRecall)

from common import hardware
from common.checkpoint import data_for, load_checkpoint, model_from_checkpoint
from common.options import Parser, add_accelerator_option, add_data_option, command, positive_int
from common.plots import plot_confusion, plot_gallery, plot_reliability
from common.predict import predict_probs
from common.report import write_report


def parse_args(argv: list[str] | None):
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="best.pt", help="checkpoint to evaluate (default best.pt)")
    add_data_option(p, "default: the source recorded in the checkpoint")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    add_accelerator_option(p)
    p.add_argument("--precision", choices=hardware.PRECISIONS, default="auto",
                   help="default auto: the device's fastest correct one (printed)")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images per forward pass")
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip averaging")
    p.add_argument("--ema", action="store_true",
                   help="use the moving average of the weights (checkpoints trained with --ema)")
    p.add_argument("--show", type=positive_int, default=32,
                   help="misclassified images in misclassified.png (default 32)")
    return p.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    state = load_checkpoint(args.ckpt)
    out = Path(args.out) if args.out else Path(args.ckpt).parent
    out.mkdir(parents=True, exist_ok=True)

    splits = data_for(state, args.data)
    test, classes = splits.test, state["classes"]

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    precision = hardware.default_precision(accelerator) if args.precision == "auto" else args.precision
    device = torch.device(accelerator)
    model = model_from_checkpoint(state, "ema" if args.ema else "model")
    model = model.to(device, memory_format=torch.channels_last)
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    print(f"checkpoint {args.ckpt} (epoch {state.get('epoch', '?')}, {len(classes)} classes)")
    print(f"data       {splits.source}: test {len(test):,} images")
    print(f"device     {accelerator}, precision {precision}")

    pass_start = time.perf_counter()
    probs, probs_tta = predict_probs(model, test.images, mean, std, args.batch_size,
                                     hardware.autocast_dtype(precision), flip_tta=args.tta)
    pass_s = time.perf_counter() - pass_start
    probs, labels = probs.cpu(), test.labels
    assert len(probs) == len(labels), "every test image is scored exactly once"
    confidence, preds = probs.max(1)

    n_classes = len(classes)
    accuracy = MulticlassAccuracy(n_classes, average="micro")(preds, labels).item()
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    per_class_acc = MulticlassAccuracy(n_classes, average=None)(preds, labels)
    precision_c = MulticlassPrecision(n_classes, average=None)(preds, labels)
    recall_c = MulticlassRecall(n_classes, average=None)(preds, labels)
    confusion = MulticlassConfusionMatrix(n_classes)(preds, labels)
    counts = torch.bincount(labels, minlength=n_classes)
    ece = MulticlassCalibrationError(n_classes, n_bins=15, norm="l1")(probs, labels).item()

    tta = None
    if probs_tta is not None:
        tta_preds = probs_tta.cpu().argmax(1)
        tta = {"accuracy": MulticlassAccuracy(n_classes, average="micro")(tta_preds, labels).item(),
               "loss": F.nll_loss(probs_tta.cpu().clamp_min(1e-12).log(), labels).item()}

    # --- files --------------------------------------------------------------------------
    plot_confusion(confusion, classes, out / "confusion_matrix.png",
                   f"Confusion matrix, {len(test):,} test images, accuracy {100 * accuracy:.2f}%")
    plot_reliability(confidence, preds == labels, out / "calibration.png", ece)
    wrong = (preds != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][: args.show]
    plot_gallery(test.images[wrong],
                 [f"#{i}\ntrue {classes[labels[i]]}\npred {classes[preds[i]]} {100 * confidence[i]:.0f}%"
                  for i in wrong.tolist()],
                 out / "misclassified.png",
                 f"The {len(wrong)} most confident mistakes of {int((preds != labels).sum())} "
                 f"(of {len(test):,} test images)")
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "true", "true_name", "pred", "pred_name", "confidence"])
        for i, (t, p, c) in enumerate(zip(labels.tolist(), preds.tolist(), confidence.tolist())):
            writer.writerow([i, t, classes[t], p, classes[p], f"{c:.6f}"])
    report = {
        "checkpoint": str(args.ckpt), "data": splits.source, "n_images": len(test),
        "accuracy": accuracy, "loss": loss, "ece": ece, "tta": tta, "device": accelerator, "precision": precision,
        "per_class": {name: {"images": int(counts[c]), "accuracy": per_class_acc[c].item(),
                             "precision": precision_c[c].item(), "recall": recall_c[c].item()}
                      for c, name in enumerate(classes)},
        "confusion_matrix": confusion.tolist(), "forward_s": pass_s,
        "total_s": time.perf_counter() - started,
    }
    with open(out / "evaluation.json", "w") as f:
        json.dump(report, f, indent=2)
    write_report(out)

    # --- summary ------------------------------------------------------------------------
    width = max(len(c) for c in classes)
    print(f"\n{'class':<{width}}  images  accuracy  precision  recall")
    for c, name in enumerate(classes):
        print(f"{name:<{width}}  {int(counts[c]):>6}  {100 * per_class_acc[c]:>7.2f}%  "
              f"{100 * precision_c[c]:>8.2f}%  {100 * recall_c[c]:>5.2f}%")
    print("(a class's accuracy is the share of its images predicted right, i.e. its recall)")
    print(f"\ntest accuracy  {100 * accuracy:.2f}%  ({int((preds == labels).sum()):,}/{len(test):,}), "
          f"loss {loss:.4f}, expected calibration error {100 * ece:.2f}%")
    if tta:
        print(f"with flip TTA  {100 * tta['accuracy']:.2f}%, loss {tta['loss']:.4f} (plain figure above)")
    print(f"time           {report['total_s']:.1f}s ({pass_s:.1f}s forward, "
          f"{len(test) * (2 if tta else 1) / pass_s:,.0f} img/s)")
    print("files          " + "\n               ".join(
        str(out / f) for f in ("confusion_matrix.png", "calibration.png", "misclassified.png",
                               "predictions.csv", "evaluation.json", "report.html")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
