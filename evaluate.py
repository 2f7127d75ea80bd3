"""Evaluate a saved checkpoint on a test set: CIFAR-10's by default, or any whose classes match.

    python evaluate.py --ckpt best.pt            # data source recorded in the checkpoint
    python evaluate.py --ckpt best.pt --tta      # also report test-time augmentation
    python evaluate.py --data cifar10.1/         # a test set alone: a folder of class folders

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
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassPrecision,
    MulticlassRecall,
)

from common import hardware, results
from common.atomic import atomic_write
from common.checkpoint import data_for, model_from_checkpoint, run_on_checkpoint, temperature_for
from common.data import Dataset
from common.options import (
    Parser,
    add_accelerator_option,
    add_data_option,
    add_weights_options,
    chosen_weights,
    command,
    positive_int,
)
from common.plots import plot_confusion, plot_gallery, plot_reliability
from common.predict import predict_probs, with_temperature
from common.report import write_report

OUTPUTS = (
    results.CONFUSION,
    results.CALIBRATION,
    results.MISCLASSIFIED,
    results.PREDICTIONS,
    results.EVALUATION,
    results.REPORT,
)


def parse_args(argv: list[str] | None):
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="best.pt", help="checkpoint to evaluate (default best.pt)")
    add_data_option(p, "default: the source recorded in the checkpoint", test_only=True)
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    add_accelerator_option(p)
    p.add_argument(
        "--precision",
        choices=hardware.PRECISIONS,
        default="auto",
        help="default auto: the device's fastest correct one (printed)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images per forward pass")
    p.add_argument(
        "--tta",
        action="store_true",
        help="also report test-time augmentation: the flip average, and flip plus one-pixel shifts",
    )
    add_weights_options(p)
    p.add_argument(
        "--show", type=positive_int, default=32, help="misclassified images in misclassified.png (default 32)"
    )
    return p.parse_args(argv)


def accuracy_and_loss(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    return {
        "accuracy": MulticlassAccuracy(probs.shape[1], average="micro")(probs.argmax(1), labels).item(),
        "loss": F.nll_loss(probs.clamp_min(1e-12).log(), labels).item(),
    }


def class_metrics(probs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict:
    """Accuracy, loss, calibration error and per-class figures (torchmetrics) of one pass."""
    preds = probs.argmax(1)
    return {
        **accuracy_and_loss(probs, labels),
        "ece": MulticlassCalibrationError(n_classes, n_bins=15, norm="l1")(probs, labels).item(),
        "per_class_accuracy": MulticlassAccuracy(n_classes, average=None)(preds, labels),
        "precision": MulticlassPrecision(n_classes, average=None)(preds, labels),
        "recall": MulticlassRecall(n_classes, average=None)(preds, labels),
        "confusion": MulticlassConfusionMatrix(n_classes)(preds, labels),
        "counts": torch.bincount(labels, minlength=n_classes),
    }


def draw(probs: torch.Tensor, shown: torch.Tensor, test: Dataset, classes: list[str], m: dict, out: Path,
         show: int) -> None:  # fmt: skip
    """The pictures; `shown` are the probabilities whose confidences are shown (calibrated when
    the checkpoint holds a temperature)."""
    labels = test.labels
    title = f"Confusion matrix, {len(test):,} test images, accuracy {100 * m['accuracy']:.2f}%"
    plot_confusion(m["confusion"], classes, out / results.CONFUSION, title)
    panels = [("Reliability", probs.max(1).values, probs.argmax(1) == labels, m["ece"])]
    if m["temperature"]:
        after = f"After temperature scaling (T = {m['temperature']:.2f})"
        calibrated = (after, shown.max(1).values, shown.argmax(1) == labels, m["ece_calibrated"])
        panels = [("Before calibration", *panels[0][1:]), calibrated]
    plot_reliability(panels, out / results.CALIBRATION)
    confidence, preds = shown.max(1)
    wrong = (preds != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:show]
    captions = [
        f"#{i}\ntrue {classes[labels[i]]}\npred {classes[preds[i]]} {100 * confidence[i]:.0f}%"
        for i in wrong.tolist()
    ]
    title = (
        f"The {len(wrong)} most confident mistakes of {int((preds != labels).sum())} "
        f"(of {len(test):,} test images)"
    )
    plot_gallery(test.images[wrong], captions, out / results.MISCLASSIFIED, title)


def write_predictions(probs: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path) -> None:
    confidence, preds = probs.max(1)
    with atomic_write(path) as f:
        writer = csv.writer(f)
        writer.writerow(["index", "true", "true_name", "pred", "pred_name", "confidence"])
        for i, (t, p, c) in enumerate(zip(labels.tolist(), preds.tolist(), confidence.tolist())):
            writer.writerow([i, t, classes[t], p, classes[p], f"{c:.6f}"])


def evaluation_report(
    args, source: str, n: int, m: dict, tta: dict | None, device: str, precision: str, classes: list[str]
) -> dict:
    """What evaluation.json holds. A class the model never predicted has no precision (None),
    where torchmetrics would report 0."""
    predicted = m["confusion"].sum(0)  # columns: the predicted class
    per_class = {
        name: {
            "images": int(m["counts"][c]),
            "accuracy": m["per_class_accuracy"][c].item(),
            "precision": m["precision"][c].item() if predicted[c] else None,
            "recall": m["recall"][c].item(),
        }
        for c, name in enumerate(classes)
    }
    return {
        "checkpoint": str(args.ckpt),
        "data": source,
        "n_images": n,
        "accuracy": m["accuracy"],
        "loss": m["loss"],
        "ece": m["ece"],
        "temperature": m["temperature"],
        "ece_calibrated": m["ece_calibrated"],
        "tta": tta,
        "device": device,
        "precision": precision,
        "per_class": per_class,
        "confusion_matrix": m["confusion"].tolist(),
    }


def print_summary(report: dict, m: dict, classes: list[str], pass_s: float, out: Path) -> None:
    width = max(len(c) for c in classes)
    print(f"\n{'class':<{width}}  images  accuracy  precision   recall")  # each column as wide as 100.00%
    for c, name in enumerate(classes):
        precision = report["per_class"][name]["precision"]
        print(
            f"{name:<{width}}  {int(m['counts'][c]):>6}  {100 * m['per_class_accuracy'][c]:>7.2f}%  "
            + (f"{100 * precision:>8.2f}%" if precision is not None else f"{'n/a':>9}")
            + f"  {100 * m['recall'][c]:>6.2f}%"
        )
    print("(a class's accuracy is the share of its images predicted right, i.e. its recall)")
    if any(r["precision"] is None for r in report["per_class"].values()):
        print("(precision n/a: the model never predicted that class)")
    n, tta = report["n_images"], report["tta"]
    print(
        f"\ntest accuracy  {100 * report['accuracy']:.2f}%  ({round(report['accuracy'] * n):,}/{n:,}), "
        f"loss {report['loss']:.4f}, expected calibration error {100 * report['ece']:.2f}%"
    )
    if report["temperature"]:
        print(
            f"calibrated     temperature {report['temperature']:.3f} (fitted on held-out images): expected "
            f"calibration error {100 * report['ece']:.2f}% -> {100 * report['ece_calibrated']:.2f}%; "
            "the confidences shown are the calibrated ones"
        )
    if tta:
        print(
            f"with TTA       flip {100 * tta['flip']['accuracy']:.2f}%, flip + shifts "
            f"{100 * tta['flip_translate']['accuracy']:.2f}% (the plain figure above is the model's own)"
        )
    print(
        f"time           {report['total_s']:.1f}s ({pass_s:.1f}s forward, "
        f"{n * (6 if tta else 1) / pass_s:,.0f} img/s)"
    )
    print("files          " + "\n               ".join(str(out / f) for f in OUTPUTS))


@command
def main(argv: list[str] | None = None) -> int:
    return run_on_checkpoint(parse_args(argv), run)


def run(args, state: dict, out: Path) -> int:
    started = time.perf_counter()
    splits = data_for(state, args.data)
    test, classes = splits.test, state["classes"]

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    precision = hardware.default_precision(accelerator) if args.precision == "auto" else args.precision
    weights = chosen_weights(args)
    model = model_from_checkpoint(state, weights)
    model = model.to(torch.device(accelerator), memory_format=torch.channels_last)
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    print(f"checkpoint {args.ckpt} (epoch {state.get('epoch', '?')}, {len(classes)} classes)")
    print(f"data       {splits.source}: {len(test):,} test images")
    print(f"device     {accelerator}, precision {precision}")

    pass_start = time.perf_counter()
    autocast = hardware.autocast_dtype(precision)
    found = predict_probs(model, test.images, mean, std, args.batch_size, autocast, args.tta, "scoring")
    pass_s = time.perf_counter() - pass_start
    probs = found.plain
    assert len(probs) == len(test.labels), "every test image is scored exactly once"
    m = class_metrics(probs, test.labels, len(classes))
    # A temperature fitted on held-out images (train.py --val-split) calibrates the confidences.
    m["temperature"] = temperature_for(state, weights)
    shown = with_temperature(probs, m["temperature"]) if m["temperature"] else probs
    m["ece_calibrated"] = class_metrics(shown, test.labels, len(classes))["ece"] if m["temperature"] else None
    tta = None
    if args.tta:  # beside the plain figure, never instead of it
        views = {"flip": found.flip, "flip_translate": found.flip_translate}
        tta = {name: accuracy_and_loss(p, test.labels) for name, p in views.items()}

    draw(probs, shown, test, classes, m, out, args.show)
    write_predictions(shown, test.labels, classes, out / results.PREDICTIONS)
    report = evaluation_report(args, splits.source, len(test), m, tta, accelerator, precision, classes)
    report.update(forward_s=pass_s, total_s=time.perf_counter() - started)
    with atomic_write(out / results.EVALUATION) as f:
        json.dump(report, f, indent=2)
    write_report(out)
    print_summary(report, m, classes, pass_s, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
