"""Do the CAMs point at the evidence? A pointing game on synthetic images.

    python benchmarks/pointing_game.py                    # every method at 4 layers: 13 min on 2 CPU cores
    python benchmarks/pointing_game.py --quick            # 2 methods x 2 layers, under a minute
    python benchmarks/pointing_game.py --out RUN_FOLDER   # adds the table to that folder's report.html

Builds 4 classes of images whose class is a 6x6 coloured square at a random place on a random
background, trains train.py on them (a subprocess: the real training), and counts per method
and layer how often the CAM's peak for the true class falls on the square (within 1 px).
Writes selfcheck.json and report.html into --out (default selfcheck/); the synthetic images
and their training run go to --out/pointing-game/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import results  # noqa: E402
from common.atomic import atomic_write  # noqa: E402
from common.cams import METHODS, choose_methods, class_targets, compute_cams, find_layers  # noqa: E402
from common.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from common.data import load_splits, normalize, write_image_folder  # noqa: E402
from common.lock import share_folder  # noqa: E402
from common.model import build_model  # noqa: E402
from common.options import Parser, UsageError, command  # noqa: E402
from common.report import write_report  # noqa: E402

COLOURS = {"blue": (40, 60, 230), "green": (40, 200, 60), "red": (230, 40, 40), "yellow": (230, 220, 40)}
OBJECT = 6  # px
TOLERANCE = 1  # px around the square, for the upsampling of coarse maps
CHANCE = (OBJECT + 2 * TOLERANCE) ** 2 / 32**2  # a peak at a random place hits


def object_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth random colour backgrounds with one small square; its colour is the class.

    Returns images (N,32,32,3) uint8, labels sorted by class (so image-folder order is this
    order), and each square's top-left corner (N,2).
    """
    rng = np.random.default_rng(seed)
    n = n_per_class * len(COLOURS)
    # Low-frequency colour fields plus pixel noise: the background alone tells nothing.
    coarse = rng.integers(40, 216, size=(n, 4, 4, 3)).astype(np.float32)
    background = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(0, 3, 1, 2), size=32, mode="bicubic", align_corners=False
    )
    images = background.permute(0, 2, 3, 1).numpy() + rng.normal(0, 12, size=(n, 32, 32, 3))
    images = np.clip(images, 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(len(COLOURS)), n_per_class)
    corners = rng.integers(0, 32 - OBJECT + 1, size=(n, 2))
    for i, (label, (y, x)) in enumerate(zip(labels, corners)):
        images[i, y : y + OBJECT, x : x + OBJECT] = list(COLOURS.values())[label]
    return images, labels, corners


def train_on_objects(out: Path, n_train: int, n_test: int, epochs: int, seed: int) -> tuple[Path, np.ndarray]:
    """Writes the synthetic image folder, trains train.py on it; returns (data, test corners)."""
    data = out / "pointing-game" / "data"
    shutil.rmtree(data, ignore_errors=True)  # never mix in an earlier run's images
    train, test = object_images(n_train, seed=1), object_images(n_test, seed=2)
    write_image_folder(data, {"train": train[:2], "test": test[:2]}, list(COLOURS))
    print(
        f"pointing game: training on {n_train * len(COLOURS)} synthetic images ({len(COLOURS)} classes, "
        f"a {OBJECT}x{OBJECT} square decides the class), {epochs} epochs",
        flush=True,
    )
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--cutout",
        "0",
        "--out",
        str(out / "pointing-game" / "run"),
        "--overwrite",
        "--accelerator",
        "cpu",
        "--seed",
        str(seed),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"the pointing game's training failed: {last}")
    return data, test[2]


def hit_rate(cams: np.ndarray, corners: np.ndarray) -> int:
    hits = 0
    for cam, (y, x) in zip(cams, corners):
        py, px = np.unravel_index(cam.argmax(), cam.shape)
        on_y = y - TOLERANCE <= py < y + OBJECT + TOLERANCE
        hits += on_y and x - TOLERANCE <= px < x + OBJECT + TOLERANCE
    return int(hits)


def play(model, x, labels, corners, specs: list[str], methods: list[str], smoothing: list[str]) -> list[dict]:
    """One row per method and layer (and smoothing option): how often the peak hits."""
    runs = [
        (name, spec, "") for spec in specs for name in methods if METHODS[name].uses_layer or spec == specs[0]
    ]
    runs += [("gradcam", spec, option) for spec in specs for option in smoothing]
    rows = []
    for name, spec, option in runs:
        method = METHODS[name]
        # ScoreCAM runs one forward pass per channel and image: fewer images keep it minutes.
        n = min(len(x), 8 if name == "scorecam" else len(x))
        smooth = (option == "aug_smooth", option == "eigen_smooth")
        layers = find_layers(model, spec)
        cams = compute_cams(model, method, layers, x[:n], class_targets(labels[:n]), smooth, f"{name} {spec}")
        hits = hit_rate(cams, corners[:n])
        label = f"{method.name} + {option}" if option else method.name
        layer = spec if method.uses_layer else "(every bias)"
        rows.append(
            {"method": label, "layer": layer, "hits": hits, "n": n, "rate": hits / n, "chance": CHANCE}
        )
    return rows


@command
def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="pointing_game.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 methods, 2 layers, 240 images: under a minute")
    p.add_argument("--method", action="append", metavar="NAME", help="as explain.py (default: every one)")
    p.add_argument("--layer", action="append", metavar="NAME", help="as explain.py (default: four)")
    p.add_argument("--out", default="selfcheck", help="output folder (default selfcheck/)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    methods = choose_methods(args.method, "gradcam") if args.method else list(METHODS)
    if args.quick and not args.method:
        methods = ["gradcam", "layercam"]
    default_layers = ["layer3", "layer4"] if args.quick else ["layer2", "layer3", "layer4", "layer3+layer4"]
    for spec in args.layer or []:  # checked before training, on the untrained net: same modules
        find_layers(build_model(len(COLOURS)).eval(), spec)
    n_train, n_test, epochs = (60, 10, 3) if args.quick else (300, 25, 6)
    smoothing = [] if args.quick else ["aug_smooth", "eigen_smooth"]
    out = Path(args.out)
    with share_folder(out):  # not into a folder a training run holds
        return run_game(args, out, methods, default_layers, (n_train, n_test, epochs), smoothing)


def run_game(
    args, out: Path, methods: list[str], default_layers: list[str], sizes: tuple, smoothing: list[str]
) -> int:
    n_train, n_test, epochs = sizes
    data, corners = train_on_objects(out, n_train, n_test, epochs, args.seed)
    state = load_checkpoint(out / "pointing-game" / "run" / results.BEST)
    model = model_from_checkpoint(state)
    test = load_splits(str(data)).test
    assert len(test) == len(corners), "the test images are this run's own"
    x = normalize(test.images, torch.tensor(state["mean"]), torch.tensor(state["std"]))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == test.labels).float().mean().item()
    rows = play(model, x, test.labels, corners, args.layer or default_layers, methods, smoothing)
    rows.sort(key=lambda r: -r["rate"])

    print(f"\nmodel accuracy on the {len(x)} synthetic test images: {100 * accuracy:.1f}%")
    print(f"pointing game: the CAM's peak falls on the object (+{TOLERANCE} px); chance {100 * CHANCE:.1f}%")
    width = max(len(r["method"]) for r in rows)
    print(f"{'method':<{width}} {'layer':<14} {'hits':>9} {'rate':>7}")
    for r in rows:
        print(f"{r['method']:<{width}} {r['layer']:<14} {r['hits']:>4}/{r['n']:<4} {100 * r['rate']:>6.1f}%")
    note = (
        f"{len(COLOURS)} classes decided by a {OBJECT}x{OBJECT} square on a random background; "
        f"{epochs} epochs on {n_train * len(COLOURS)} images; CAM for the true class; "
        f"hit = peak within {TOLERANCE} px of the square"
    )
    with atomic_write(out / results.SELFCHECK) as f:
        json.dump({"rows": rows, "model_accuracy": accuracy, "chance": CHANCE, "note": note}, f, indent=2)
    write_report(out)
    print(f"\nwrote {out / results.SELFCHECK} and {out / results.REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
