"""Explain a checkpoint's mistakes (or your own pictures) with class activation maps.

    python explain.py --layer layer4 --n 20            # Grad-CAM at layer4 of the 20 most confident mistakes
    python explain.py                                  # the default, layer2: 16x16 maps, sharper
    python explain.py --method all --layer layer3 --layer layer3+layer4
    python explain.py --image cat.jpg dog.png          # your own pictures, resized to 32x32
    python explain.py --selfcheck                      # do the CAMs point at the evidence?

Needs only the checkpoint (and the data). Writes beside the checkpoint (or into --out):
gradcam.png, cams.npz (one npz per method and layer when several), explanations.json with
each method's faithfulness (ROAD, against RandomCAM), and report.html. The CAMs come from
pytorch_grad_cam and run on the plain model: hooks added after torch.compile are ignored.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, RandomCAM,
                              ScoreCAM)
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from tqdm import tqdm

from common import hardware
from common.checkpoint import data_for, load_checkpoint, model_from_checkpoint
from common.data import DataError, load_cifar10, normalize
from common.model import top_level_names
from common.options import (Parser, UsageError, add_accelerator_option, add_data_option, command,
                            positive_int)
from common.plots import plot_cam_comparison, plot_cam_grid, to_hwc
from common.predict import predict_probs
from common.report import write_report

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
           "layercam": LayerCAM, "eigencam": EigenCAM, "scorecam": ScoreCAM}
NAMES = {"gradcam": "GradCAM", "gradcam++": "GradCAM++", "hirescam": "HiResCAM",
         "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
# Chosen by measurement (README, "Explanations"): in the full `--selfcheck` GradCAM at layer2
# put the peak on the object 97 % of the time (layer3 81 %, layer4 38 %) and beat RandomCAM by
# ROAD; GradCAM++ pointed as often (98 %) but did not beat RandomCAM.
DEFAULT_METHOD = "gradcam"
DEFAULT_LAYER = "layer2"
ROAD_PERCENTILES = [20, 40, 60, 80]


def parse_args(argv: list[str] | None):
    p = Parser(prog="explain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="best.pt", help="checkpoint to explain (default best.pt)")
    add_data_option(p, "default: the source recorded in the checkpoint")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder; selfcheck/ for --selfcheck)")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="module whose activations the CAM uses: layer4, layer3, layer3.1.conv2, or "
                        f"several fused with '+' such as layer3+layer4; repeat to compare (default {DEFAULT_LAYER})")
    p.add_argument("--method", action="append", metavar="NAME",
                   help=f"{', '.join(NAMES.values())} or all; repeat to compare (default GradCAM)")
    p.add_argument("--n", type=positive_int, default=20, help="misclassified images to explain (default 20)")
    p.add_argument("--order", choices=("confidence", "index"), default="confidence",
                   help="which mistakes: the most confident first (default) or in test-set order")
    p.add_argument("--image", nargs="+", metavar="PATH", help="explain these pictures instead of the mistakes")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the ROAD faithfulness scores")
    p.add_argument("--selfcheck", action="store_true",
                   help="pointing game: train on synthetic images whose class is a small object, "
                        "then count how often each CAM's peak falls on it")
    p.add_argument("--quick", action="store_true", help="with --selfcheck: a smaller, faster version")
    p.add_argument("--seed", type=int, default=0, help="seed of ROAD's noise and RandomCAM (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per CAM batch")
    p.add_argument("--ema", action="store_true",
                   help="use the moving average of the weights (checkpoints trained with --ema)")
    add_accelerator_option(p)
    return p.parse_args(argv)


def chosen_methods(given: list[str] | None) -> list[str]:
    names = [m.lower() for m in (given or [DEFAULT_METHOD])]
    if "all" in names:
        return list(METHODS)
    for name in names:
        if name not in METHODS:
            raise UsageError(f"unknown --method '{name}'; choose from {', '.join(NAMES.values())} or all")
    return list(dict.fromkeys(names))


def find_layers(model: torch.nn.Module, spec: str) -> list[torch.nn.Module]:
    """'layer3+layer4' -> [model.layer3, model.layer4]; unknown names are one clear line."""
    layers = []
    for name in spec.split("+"):
        try:
            if not name.strip():
                raise AttributeError
            layers.append(model.get_submodule(name))
        except AttributeError:
            raise UsageError(f"unknown layer '{name}'; top-level modules are "
                             f"{', '.join(top_level_names(model))} (nested names such as "
                             "layer3.1.conv2 work too, and '+' fuses layers)") from None
    shapes = output_shapes(model, layers)
    for name, shape in zip(spec.split("+"), shapes):
        if len(shape) != 4:
            raise UsageError(f"layer '{name}' gives no spatial map (output {list(shape)}); "
                             "CAMs need a convolutional layer such as layer3 or layer4")
    return layers


def output_shapes(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[tuple]:
    """Each layer's output shape on one 32x32 input."""
    seen: dict[int, tuple] = {}

    def record(k: int):
        def hook(module, inputs, output) -> None:  # returning None keeps the output as it is
            seen.setdefault(k, tuple(output.shape))
        return hook

    handles = [layer.register_forward_hook(record(k)) for k, layer in enumerate(layers)]
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=device))
    for handle in handles:
        handle.remove()
    return [seen.get(k, ()) for k in range(len(layers))]


def compute_cams(model: torch.nn.Module, method: str, layers: list[torch.nn.Module],
                 images: torch.Tensor, target_classes: torch.Tensor, batch_size: int = 64,
                 desc: str = "") -> np.ndarray:
    """CAMs float32 (N,H,W) in [0,1] of normalised `images` for `target_classes`.

    `method` is a key of METHODS or "random" (RandomCAM, the faithfulness baseline).
    """
    cam_class = RandomCAM if method == "random" else METHODS[method]
    device = next(model.parameters()).device
    maps = np.zeros((len(images), *images.shape[-2:]), np.float32)
    with cam_class(model=model, target_layers=layers) as cam:
        cam.batch_size = 256  # ScoreCAM's masked copies per forward pass (default 16)
        for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False,
                          disable=len(images) <= batch_size):
            x = images[start:start + batch_size].to(device)
            targets = [ClassifierOutputTarget(int(c)) for c in target_classes[start:start + batch_size]]
            # ScoreCAM draws a progress bar per image: keep the terminal readable.
            quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
            with quiet:
                maps[start:start + len(x)] = cam(input_tensor=x, targets=targets)
    return np.nan_to_num(np.clip(maps, 0, 1))


def road_scores(model: torch.nn.Module, images: torch.Tensor, maps: np.ndarray,
                classes: torch.Tensor, seed: int) -> np.ndarray:
    """pytorch_grad_cam's ROADCombined per image, for the softmax of `classes`: higher means
    removing what the CAM marks hurts the class more than removing what it leaves out."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = next(model.parameters()).device
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    return np.asarray(ROADCombined(percentiles=ROAD_PERCENTILES)(
        images.to(device), maps, targets, model), dtype=np.float64).reshape(-1)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def slug(method: str, layer: str) -> str:
    return f"{method.replace('++', 'pp')}_{layer}"


def load_user_images(paths: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Pictures of any size -> uint8 (N,3,32,32), and a note per picture."""
    from PIL import Image, UnidentifiedImageError

    images, notes = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                size = img.size
                rgb = img.convert("RGB")
                if size != (32, 32):
                    rgb = rgb.resize((32, 32), Image.BICUBIC)
        except FileNotFoundError:
            raise DataError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError):
            raise DataError(f"not an image: {path}") from None
        images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
        notes.append("" if size == (32, 32) else f"resized from {size[0]}x{size[1]} to 32x32")
    return torch.stack(images), notes


@command
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    methods = chosen_methods(args.method)
    layer_specs = list(dict.fromkeys(args.layer or [DEFAULT_LAYER]))
    if args.selfcheck:
        return selfcheck(args, methods if args.method else list(METHODS), args.layer)

    state = load_checkpoint(args.ckpt)
    out = Path(args.out) if args.out else Path(args.ckpt).parent
    model = model_from_checkpoint(state, "ema" if args.ema else "model")
    layers = {spec: find_layers(model, spec) for spec in layer_specs}
    classes = state["classes"]
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    device = torch.device(accelerator)
    model = model.to(device, memory_format=torch.channels_last)
    autocast = hardware.autocast_dtype(hardware.default_precision(accelerator))

    if args.image:  # the user's pictures: no data set, no true label
        images, notes = load_user_images(args.image)
        for path, note in zip(args.image, notes):
            if note:
                print(f"note: {path} {note}")
        probs, _ = predict_probs(model, images, mean, std, autocast=autocast)
        probs = probs.cpu()
        labels = torch.full((len(images),), -1)
        index = torch.arange(len(images))
        prefix, what = "user_", f"{len(images)} of your pictures"
        for path, p in zip(args.image, probs):
            top = p.topk(min(3, len(classes)))
            print(f"{path}: " + ", ".join(f"{classes[c]} {100 * v:.1f}%" for v, c in zip(top.values, top.indices)))
    else:  # the most confident (or first) mistakes on the test set
        splits = data_for(state, args.data)
        # Same predictions as evaluate.py: same precision rule, same pass.
        probs, _ = predict_probs(model, splits.test.images, mean, std, autocast=autocast)
        probs = probs.cpu()
        wrong = (probs.argmax(1) != splits.test.labels).nonzero().flatten()
        if args.order == "confidence":
            wrong = wrong[probs[wrong].max(1).values.argsort(descending=True, stable=True)]
        # The CAMs run in fp32: re-score the candidates in fp32 and keep those still wrong,
        # so "predicted" means the class the explained model predicts.
        candidates = wrong[: 2 * args.n + 10]
        probs32, _ = predict_probs(model, splits.test.images[candidates], mean, std)
        probs[candidates] = probs32.cpu()
        still_wrong = probs32.cpu().argmax(1) != splits.test.labels[candidates]
        index = candidates[still_wrong][: args.n]
        print(f"checkpoint {args.ckpt}: {len(wrong):,} of {len(splits.test):,} test images misclassified")
        if len(index) < args.n:
            print(f"note: only {len(index)} misclassified images, fewer than --n {args.n}; showing all")
        images, labels, probs = splits.test.images[index], splits.test.labels[index], probs[index]
        prefix = ""
        what = f"the {len(index)} {'most confident' if args.order == 'confidence' else 'first'} mistakes"
    out.mkdir(parents=True, exist_ok=True)
    confidence, preds = probs.max(1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))

    # --- CAMs for every (method, layer), the faithfulness of each -----------------------
    x = normalize(images, mean, std)
    combos = [(m, spec) for spec in layer_specs for m in methods]
    cams, rows, written = {}, [], []
    random_road = {}
    for method, spec in tqdm(combos, desc="CAMs", disable=len(combos) == 1):
        cam_pred = compute_cams(model, method, layers[spec], x, preds, args.batch_size, f"{NAMES[method]} {spec}")
        if args.image:
            cam_true = np.full_like(cam_pred, np.nan)
        else:
            cam_true = compute_cams(model, method, layers[spec], x, labels, args.batch_size)
        cams[method, spec] = cam_pred
        name = f"{prefix}cams.npz" if len(combos) == 1 else f"{prefix}cams_{slug(method, spec)}.npz"
        np.savez(out / name, index=index.numpy().astype(np.int64), true=labels.numpy().astype(np.int64),
                 pred=preds.numpy().astype(np.int64), cam_pred=cam_pred, cam_true=cam_true)
        written.append(name)
        if not args.no_faithfulness and len(x) > 0:
            if spec not in random_road:
                np.random.seed(args.seed)  # RandomCAM draws its weights from numpy
                random_maps = compute_cams(model, "random", layers[spec], x, preds, args.batch_size)
                random_road[spec] = road_scores(model, x, random_maps, preds, args.seed)
            road = road_scores(model, x, cam_pred, preds, args.seed)
            (m, se), (rm, rse) = mean_se(road), mean_se(random_road[spec])
            rows.append({"method": NAMES[method], "layer": spec, "n": len(road), "road_mean": m,
                         "road_se": se, "random_mean": rm, "random_se": rse, "beats_random": m > rm + 2 * rse})

    # --- pictures --------------------------------------------------------------------------
    captions = []
    for k in range(len(images)):
        p = classes[preds[k]]
        if args.image:
            top = probs[k].topk(min(3, len(classes)))
            captions.append(f"{Path(args.image[k]).name[:18]}\n" + "\n".join(
                f"{classes[c]} {100 * v:.0f}%" for v, c in zip(top.values, top.indices)))
        else:
            captions.append(f"#{int(index[k])} true {classes[labels[k]]}\npred {p} {100 * confidence[k]:.0f}%")
    picture = out / ("user_gradcam.png" if args.image else "gradcam.png")
    rgb = [to_hwc(img) for img in images]
    if len(combos) == 1 and not args.image:
        (method, spec), = combos
        triplets = [(rgb[k], show_cam_on_image(rgb[k].astype(np.float32) / 255, cams[method, spec][k], use_rgb=True),
                     show_cam_on_image(rgb[k].astype(np.float32) / 255, cam_true[k], use_rgb=True),
                     captions[k], f"CAM: {classes[preds[k]]}\n(predicted)", f"CAM: {classes[labels[k]]}\n(true)")
                    for k in range(len(images))]
        plot_cam_grid(triplets, picture, f"{NAMES[method]} at {spec} ({layer_size(model, layers[spec])}), "
                                         f"{what}; red = evidence for the class named")
    else:
        columns = [f"{NAMES[m]}\n{spec}" for m, spec in combos]
        overlays = [[show_cam_on_image(rgb[k].astype(np.float32) / 255, cams[c][k], use_rgb=True)
                     for c in combos] for k in range(len(images))]
        plot_cam_comparison(rgb, overlays, captions, columns, picture,
                            f"CAMs for the predicted class, {what}; red = evidence for it")
    written.append(picture.name)

    # --- faithfulness table, report -----------------------------------------------------
    if rows:
        print(f"\nfaithfulness: ROADCombined (percentiles {ROAD_PERCENTILES}) for the predicted class, "
              f"{rows[0]['n']} images, seed {args.seed}; higher is better")
        print(f"{'method':<10} {'layer':<16} {'ROAD':>16} {'RandomCAM':>16}")
        for r in rows:
            print(f"{r['method']:<10} {r['layer']:<16} {r['road_mean']:>+8.4f} ± {r['road_se']:.4f} "
                  f"{r['random_mean']:>+8.4f} ± {r['random_se']:.4f}"
                  + ("" if r["beats_random"] else "   does not beat RandomCAM"))
    if not args.image:
        report = {"checkpoint": str(args.ckpt), "methods": [NAMES[m] for m in methods], "layers": layer_specs,
                  "n": len(index), "faithfulness": rows,
                  "note": f"ROADCombined, percentiles {ROAD_PERCENTILES}, predicted class, seed {args.seed}; "
                          "a method 'beats RandomCAM' when its mean exceeds RandomCAM's by 2 standard errors"}
        with open(out / "explanations.json", "w") as f:
            json.dump(report, f, indent=2)
        written.append("explanations.json")
    write_report(out)
    written.append("report.html")
    print(f"\nwrote {', '.join(str(out / w) for w in written)} in {time.perf_counter() - started:.1f}s")
    return 0


def layer_size(model: torch.nn.Module, layers: list[torch.nn.Module]) -> str:
    """The layers' spatial map sizes on a 32x32 input, e.g. '4x4 map': the CAM's resolution."""
    return " + ".join(f"{s[2]}x{s[3]}" for s in output_shapes(model, layers)) + " map"


# --- the pointing-game self-check ------------------------------------------------------

SELFCHECK_COLOURS = {"blue": (40, 60, 230), "green": (40, 200, 60), "red": (230, 40, 40),
                     "yellow": (230, 220, 40)}
OBJECT = 6  # px


def object_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth random colour backgrounds with one small square; its colour is the class.

    Returns images (N,32,32,3) uint8, labels sorted by class (so image-folder order is this
    order), and each square's top-left corner (N,2).
    """
    rng = np.random.default_rng(seed)
    n = n_per_class * len(SELFCHECK_COLOURS)
    # Low-frequency colour fields plus pixel noise: the background alone tells nothing.
    coarse = rng.integers(40, 216, size=(n, 4, 4, 3)).astype(np.float32)
    background = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2),
                                                 size=32, mode="bicubic", align_corners=False)
    images = background.permute(0, 2, 3, 1).numpy() + rng.normal(0, 12, size=(n, 32, 32, 3))
    images = np.clip(images, 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(len(SELFCHECK_COLOURS)), n_per_class)
    corners = rng.integers(0, 32 - OBJECT + 1, size=(n, 2))
    for i, (label, (y, x)) in enumerate(zip(labels, corners)):
        images[i, y:y + OBJECT, x:x + OBJECT] = list(SELFCHECK_COLOURS.values())[label]
    return images, labels, corners


def selfcheck(args, methods: list[str], layer_specs: list[str] | None) -> int:
    """Train briefly on images whose class is a small object, then count per method and
    layer how often the CAM's peak (for the true class) falls on the object."""
    from PIL import Image

    quick = args.quick
    out = Path(args.out or "selfcheck")
    layer_specs = layer_specs or (["layer3", "layer4"] if quick else ["layer2", "layer3", "layer4", "layer3+layer4"])
    if quick and not args.method:
        methods = ["gradcam", "layercam"]
    n_train, n_test, epochs = (60, 10, 5) if quick else (300, 25, 6)
    data = out / "data"
    import shutil

    shutil.rmtree(data, ignore_errors=True)  # never mix in an earlier self-check's images
    classes = list(SELFCHECK_COLOURS)
    splits = {"train": object_images(n_train, seed=1), "test": object_images(n_test, seed=2)}
    for split, (images, labels, _) in splits.items():
        for c in classes:
            (data / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(data / split / classes[label] / f"{i:05d}.png")
    run = out / "run"
    print(f"selfcheck: training on {n_train * len(classes)} synthetic images ({len(classes)} classes, "
          f"a {OBJECT}x{OBJECT} square decides the class), {epochs} epochs", flush=True)
    train_py = Path(__file__).resolve().parent / "train.py"  # run, not imported
    result = subprocess.run([sys.executable, str(train_py), "--data", str(data), "--epochs", str(epochs),
                             "--batch-size", "32", "--cutout", "0", "--out", str(run), "--overwrite",
                             "--accelerator", "cpu", "--seed", str(args.seed)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(f"selfcheck training failed: {result.stderr.strip().splitlines()[-1:]}")

    state = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(state)
    test = load_cifar10(str(data)).test
    _, _, corners = splits["test"]
    assert len(test) == len(corners), "the self-check's test images are its own"
    x = normalize(test.images, torch.tensor(state["mean"]), torch.tensor(state["std"]))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == test.labels).float().mean().item()
    tolerance = 1  # px around the square, for the upsampling of coarse maps
    chance = (OBJECT + 2 * tolerance) ** 2 / 32 ** 2
    rows = []
    for spec in layer_specs:
        layers = find_layers(model, spec)
        for method in methods:
            # ScoreCAM runs one forward pass per channel and image: fewer images keep it minutes.
            n = min(len(x), 8 if method == "scorecam" else len(x))
            maps = compute_cams(model, method, layers, x[:n], test.labels[:n], desc=f"{NAMES[method]} {spec}")
            hits = 0
            for cam, (y, x0) in zip(maps, corners[:n]):
                py, px = np.unravel_index(cam.argmax(), cam.shape)
                hits += (y - tolerance <= py < y + OBJECT + tolerance) and (x0 - tolerance <= px < x0 + OBJECT + tolerance)
            rows.append({"method": NAMES[method], "layer": spec, "hits": int(hits), "n": n,
                         "rate": hits / n, "chance": chance})
    rows.sort(key=lambda r: -r["rate"])
    print(f"\nmodel accuracy on the {len(x)} synthetic test images: {100 * accuracy:.1f}%")
    print(f"pointing game: the CAM's peak falls on the object (+{tolerance} px); chance {100 * chance:.1f}%")
    print(f"{'method':<10} {'layer':<16} {'hits':>9} {'rate':>7}")
    for r in rows:
        print(f"{r['method']:<10} {r['layer']:<16} {r['hits']:>4}/{r['n']:<4} {100 * r['rate']:>6.1f}%")
    with open(out / "selfcheck.json", "w") as f:
        json.dump({"rows": rows, "model_accuracy": accuracy, "chance": chance,
                   "note": f"{len(classes)} classes decided by a {OBJECT}x{OBJECT} square on a random "
                           f"background; {epochs} epochs on {n_train * len(classes)} images; CAM for the "
                           f"true class; hit = peak within {tolerance} px of the square"}, f, indent=2)
    write_report(out)
    print(f"\nwrote {out / 'selfcheck.json'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
