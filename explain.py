"""Explain a checkpoint's mistakes (or your own pictures) with class activation maps.

    python explain.py --layer layer4 --n 20            # Grad-CAM at layer4 of the 20 most confident mistakes
    python explain.py                                  # the default, layer2: 16x16 maps, sharper
    python explain.py --method all --layer layer3 --layer layer3+layer4
    python explain.py --image cat.jpg dog.png          # your own pictures, resized to 32x32

Needs only the checkpoint (and the data). Writes beside the checkpoint (or into --out):
gradcam.png, cams.npz (one npz per method and layer when several), explanations.json with
each method's faithfulness (ROAD, against RandomCAM), and report.html. The CAMs come from
pytorch_grad_cam and run on the plain model: hooks added after torch.compile are ignored.
Do the CAMs point at the evidence? benchmarks/pointing_game.py measures it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, RandomCAM, ScoreCAM
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from tqdm import tqdm

from common import hardware, results
from common.atomic import atomic_write
from common.checkpoint import data_for, load_checkpoint, model_from_checkpoint
from common.data import DataError, normalize
from common.lock import refuse_if_training
from common.model import top_level_names
from common.options import (
    Parser,
    UsageError,
    add_accelerator_option,
    add_data_option,
    add_weights_options,
    command,
    positive_int,
)
from common.plots import plot_cam_comparison, plot_cam_grid, to_hwc
from common.predict import predict_probs
from common.report import write_report

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}
NAMES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAM++",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
# Chosen by measurement (README, "Explanations"): in the full pointing game GradCAM at layer2
# put the peak on the object 97 % of the time (layer3 81 %, layer4 38 %) and beat RandomCAM by
# ROAD; GradCAM++ pointed as often (98 %) but did not beat RandomCAM.
DEFAULT_METHOD = "gradcam"
DEFAULT_LAYER = "layer2"
ROAD_PERCENTILES = [20, 40, 60, 80]


def parse_args(argv: list[str] | None):
    p = Parser(prog="explain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="best.pt", help="checkpoint to explain (default best.pt)")
    add_data_option(p, "default: the source recorded in the checkpoint")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument(
        "--layer",
        action="append",
        metavar="NAME",
        help="module whose activations the CAM uses: layer4, layer3, layer3.1.conv2, or several fused "
        f"with '+' such as layer3+layer4; repeat to compare (default {DEFAULT_LAYER})",
    )
    p.add_argument(
        "--method",
        action="append",
        metavar="NAME",
        help=f"{', '.join(NAMES.values())} or all; repeat to compare (default GradCAM)",
    )
    p.add_argument("--n", type=positive_int, default=20, help="misclassified images to explain (default 20)")
    p.add_argument(
        "--order",
        choices=("confidence", "index"),
        default="confidence",
        help="which mistakes: the most confident first (default) or in test-set order",
    )
    p.add_argument(
        "--image", nargs="+", metavar="PATH", help="explain these pictures instead of the mistakes"
    )
    p.add_argument("--no-faithfulness", action="store_true", help="skip the ROAD faithfulness scores")
    p.add_argument("--seed", type=int, default=0, help="seed of ROAD's noise and RandomCAM (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per CAM batch")
    add_weights_options(p)
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


# --- layers and CAMs ---------------------------------------------------------------------------


def find_layers(model: torch.nn.Module, spec: str) -> list[torch.nn.Module]:
    """'layer3+layer4' -> [model.layer3, model.layer4]; unknown names are one clear line."""
    layers = []
    for name in spec.split("+"):
        try:
            if not name.strip():
                raise AttributeError
            layers.append(model.get_submodule(name))
        except AttributeError:
            raise UsageError(
                f"unknown layer '{name}'; top-level modules are {', '.join(top_level_names(model))} "
                "(nested names such as layer3.1.conv2 work too, and '+' fuses layers)"
            ) from None
    for name, shape in zip(spec.split("+"), output_shapes(model, layers)):
        if len(shape) != 4:
            raise UsageError(
                f"layer '{name}' gives no spatial map (output {list(shape)}); "
                "CAMs need a convolutional layer such as layer3 or layer4"
            )
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


def layer_size(model: torch.nn.Module, layers: list[torch.nn.Module]) -> str:
    """The layers' spatial map sizes on a 32x32 input, e.g. '4x4 map': the CAM's resolution."""
    return " + ".join(f"{s[2]}x{s[3]}" for s in output_shapes(model, layers)) + " map"


def compute_cams(
    model: torch.nn.Module,
    method: str,
    layers: list[torch.nn.Module],
    images: torch.Tensor,
    target_classes: torch.Tensor,
    batch_size: int = 64,
    desc: str = "",
) -> np.ndarray:
    """CAMs float32 (N,H,W) in [0,1] of normalised `images` for `target_classes`.

    `method` is a key of METHODS or "random" (RandomCAM, the faithfulness baseline).
    """
    cam_class = RandomCAM if method == "random" else METHODS[method]
    device = next(model.parameters()).device
    maps = np.zeros((len(images), *images.shape[-2:]), np.float32)
    # ScoreCAM draws a progress bar per image: keep the terminal readable.
    quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
    with cam_class(model=model, target_layers=layers) as cam, quiet:
        cam.batch_size = 256  # ScoreCAM's masked copies per forward pass (default 16)
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=desc, leave=False, disable=len(images) <= batch_size):
            x = images[start : start + batch_size].to(device)
            targets = [ClassifierOutputTarget(int(c)) for c in target_classes[start : start + batch_size]]
            maps[start : start + len(x)] = cam(input_tensor=x, targets=targets)
    return np.nan_to_num(np.clip(maps, 0, 1))


def road_scores(
    model: torch.nn.Module, images: torch.Tensor, maps: np.ndarray, classes: torch.Tensor, seed: int
) -> np.ndarray:
    """pytorch_grad_cam's ROADCombined per image, for the softmax of `classes`: higher means
    removing what the CAM marks hurts the class more than removing what it leaves out."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = next(model.parameters()).device
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    road = ROADCombined(percentiles=ROAD_PERCENTILES)(images.to(device), maps, targets, model)
    return np.asarray(road, dtype=np.float64).reshape(-1)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def slug(method: str, layer: str) -> str:
    return f"{method.replace('++', 'pp')}_{layer}"


# --- which images: the mistakes, or the user's pictures ----------------------------------------


@dataclass
class Selection:
    """The images to explain, whichever way they were chosen."""

    images: torch.Tensor  # uint8 (N,3,32,32)
    labels: torch.Tensor  # true classes; -1 for the user's pictures
    probs: torch.Tensor  # (N, classes), from the model being explained, in fp32
    index: torch.Tensor  # test-set index, or the picture's position in --image
    captions: list[str]
    what: str  # e.g. "the 20 most confident mistakes"
    user: bool  # the user's pictures: files named user_*, no faithfulness report

    @property
    def preds(self) -> torch.Tensor:
        return self.probs.argmax(1)


def select_mistakes(model, state: dict, args, autocast: torch.dtype | None) -> Selection:
    """The test set's most confident (or first) mistakes, up to --n."""
    splits = data_for(state, args.data)
    test, classes = splits.test, state["classes"]
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    # Same predictions as evaluate.py: same precision rule, same pass.
    probs = predict_probs(model, test.images, mean, std, autocast=autocast).plain
    wrong = (probs.argmax(1) != test.labels).nonzero().flatten()
    if args.order == "confidence":
        wrong = wrong[probs[wrong].max(1).values.argsort(descending=True, stable=True)]
    # The CAMs run in fp32: re-score the candidates in fp32 and keep those still wrong,
    # so "predicted" means the class the explained model predicts.
    candidates = wrong[: 2 * args.n + 10]
    probs32 = predict_probs(model, test.images[candidates], mean, std).plain
    still_wrong = probs32.argmax(1) != test.labels[candidates]
    index, probs = candidates[still_wrong][: args.n], probs32[still_wrong][: args.n]
    print(f"checkpoint {args.ckpt}: {len(wrong):,} of {len(test):,} test images misclassified")
    if len(index) < args.n:
        print(f"note: only {len(index)} misclassified images, fewer than --n {args.n}; showing all")
    labels = test.labels[index]
    captions = [
        f"#{i} true {classes[t]}\npred {classes[p.argmax()]} {100 * p.max():.0f}%"
        for i, t, p in zip(index.tolist(), labels.tolist(), probs)
    ]
    which = "most confident" if args.order == "confidence" else "first"
    return Selection(
        test.images[index], labels, probs, index, captions, f"the {len(index)} {which} mistakes", False
    )


def select_pictures(model, state: dict, args, autocast: torch.dtype | None) -> Selection:
    """The user's pictures (--image), resized to 32x32; no true label."""
    images, notes = load_user_images(args.image)
    for path, note in zip(args.image, notes):
        if note:
            print(f"note: {path} {note}")
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    probs = predict_probs(model, images, mean, std, autocast=autocast).plain
    classes, captions = state["classes"], []
    for path, p in zip(args.image, probs):
        top = [(classes[c], 100 * v) for v, c in zip(*p.topk(min(3, len(classes))))]
        print(f"{path}: " + ", ".join(f"{name} {v:.1f}%" for name, v in top))
        captions.append(f"{Path(path).name[:18]}\n" + "\n".join(f"{name} {v:.0f}%" for name, v in top))
    labels = torch.full((len(images),), -1)
    what = f"{len(images)} of your pictures"
    return Selection(images, labels, probs, torch.arange(len(images)), captions, what, True)


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


# --- the one path: CAMs, faithfulness, pictures, files -------------------------------------


@dataclass
class Cams:
    method: str
    layer: str
    pred: np.ndarray  # (N,32,32) for the predicted class
    true: np.ndarray  # for the true class; NaN where it is unknown


def explain(model, layers: dict, methods: list[str], sel: Selection, x: torch.Tensor, args) -> list[Cams]:
    combos = [(m, spec) for spec in layers for m in methods]
    found = []
    for method, spec in tqdm(combos, desc="CAMs", disable=len(combos) == 1):
        desc = f"{NAMES[method]} {spec}"
        pred = compute_cams(model, method, layers[spec], x, sel.preds, args.batch_size, desc)
        true = (
            np.full_like(pred, np.nan)
            if sel.user
            else compute_cams(model, method, layers[spec], x, sel.labels, args.batch_size)
        )
        found.append(Cams(method, spec, pred, true))
    return found


def faithfulness(model, layers: dict, cams: list[Cams], sel: Selection, x: torch.Tensor, args) -> list[dict]:
    """ROAD of each method and layer against RandomCAM's at the same layer, same images."""
    random_road, rows = {}, []
    for c in cams:
        if c.layer not in random_road:
            np.random.seed(args.seed)  # RandomCAM draws its weights from numpy
            random_maps = compute_cams(model, "random", layers[c.layer], x, sel.preds, args.batch_size)
            random_road[c.layer] = road_scores(model, x, random_maps, sel.preds, args.seed)
        road = road_scores(model, x, c.pred, sel.preds, args.seed)
        (m, se), (rm, rse) = mean_se(road), mean_se(random_road[c.layer])
        rows.append(
            {
                "method": NAMES[c.method],
                "layer": c.layer,
                "n": len(road),
                "road_mean": m,
                "road_se": se,
                "random_mean": rm,
                "random_se": rse,
                "beats_random": m > rm + 2 * rse,
            }
        )
    return rows


def save_arrays(cams: list[Cams], sel: Selection, out: Path) -> list[str]:
    written = []
    for c in cams:
        name = results.cams_file(None if len(cams) == 1 else slug(c.method, c.layer), sel.user)
        with atomic_write(out / name, "wb") as f:
            np.savez(
                f,
                index=sel.index.numpy().astype(np.int64),
                true=sel.labels.numpy().astype(np.int64),
                pred=sel.preds.numpy().astype(np.int64),
                cam_pred=c.pred,
                cam_true=c.true,
            )
        written.append(name)
    return written


def draw(model, layers: dict, cams: list[Cams], sel: Selection, classes: list[str], path: Path) -> None:
    rgb = [to_hwc(img) for img in sel.images]

    def overlay(k: int, cam: np.ndarray) -> np.ndarray:
        return show_cam_on_image(rgb[k].astype(np.float32) / 255, cam[k], use_rgb=True)

    if len(cams) == 1 and not sel.user:
        c = cams[0]
        triplets = [
            (
                rgb[k],
                overlay(k, c.pred),
                overlay(k, c.true),
                sel.captions[k],
                f"CAM: {classes[sel.preds[k]]}\n(predicted)",
                f"CAM: {classes[sel.labels[k]]}\n(true)",
            )
            for k in range(len(rgb))
        ]
        title = f"{NAMES[c.method]} at {c.layer} ({layer_size(model, layers[c.layer])}), {sel.what}"
        plot_cam_grid(triplets, path, f"{title}; red = evidence for the class named")
        return
    columns = [f"{NAMES[c.method]}\n{c.layer}" for c in cams]
    overlays = [[overlay(k, c.pred) for c in cams] for k in range(len(rgb))]
    title = f"CAMs for the predicted class, {sel.what}; red = evidence for it"
    plot_cam_comparison(rgb, overlays, sel.captions, columns, path, title)


def print_faithfulness(rows: list[dict], seed: int) -> None:
    print(
        f"\nfaithfulness: ROADCombined (percentiles {ROAD_PERCENTILES}) for the predicted class, "
        f"{rows[0]['n']} images, seed {seed}; higher is better"
    )
    print(f"{'method':<10} {'layer':<16} {'ROAD':>16} {'RandomCAM':>16}")
    for r in rows:
        verdict = "" if r["beats_random"] else "   does not beat RandomCAM"
        print(
            f"{r['method']:<10} {r['layer']:<16} {r['road_mean']:>+8.4f} ± {r['road_se']:.4f} "
            f"{r['random_mean']:>+8.4f} ± {r['random_se']:.4f}{verdict}"
        )


@command
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    methods = chosen_methods(args.method)
    state = load_checkpoint(args.ckpt)
    out = Path(args.out) if args.out else Path(args.ckpt).parent
    refuse_if_training(out)
    model = model_from_checkpoint(state, "ema" if args.ema else args.weights)
    layers = {spec: find_layers(model, spec) for spec in dict.fromkeys(args.layer or [DEFAULT_LAYER])}

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    model = model.to(torch.device(accelerator), memory_format=torch.channels_last)
    autocast = hardware.autocast_dtype(hardware.default_precision(accelerator))
    select = select_pictures if args.image else select_mistakes
    sel = select(model, state, args, autocast)
    out.mkdir(parents=True, exist_ok=True)

    x = normalize(sel.images, torch.tensor(state["mean"]), torch.tensor(state["std"]))
    cams = explain(model, layers, methods, sel, x, args)
    rows = [] if args.no_faithfulness or len(x) == 0 else faithfulness(model, layers, cams, sel, x, args)
    written = save_arrays(cams, sel, out)
    draw(model, layers, cams, sel, state["classes"], out / results.cam_picture(sel.user))
    written.append(results.cam_picture(sel.user))
    if rows:
        print_faithfulness(rows, args.seed)
    if not sel.user:
        note = (
            f"ROADCombined, percentiles {ROAD_PERCENTILES}, predicted class, seed {args.seed}; a method "
            "'beats RandomCAM' when its mean exceeds RandomCAM's by 2 standard errors"
        )
        report = {
            "checkpoint": str(args.ckpt),
            "methods": [NAMES[m] for m in methods],
            "layers": list(layers),
            "n": len(sel.index),
            "faithfulness": rows,
            "note": note,
        }
        with atomic_write(out / results.EXPLANATIONS) as f:
            json.dump(report, f, indent=2)
        written.append(results.EXPLANATIONS)
    write_report(out)
    written.append(results.REPORT)
    print(f"\nwrote {', '.join(str(out / w) for w in written)} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
