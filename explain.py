"""Explain a checkpoint's predictions with class activation maps: where did it look?

    python explain.py --layer layer4 --n 20            # the 20 most confident mistakes, at layer4
    python explain.py                                  # the defaults (README, "Explanations you can check")
    python explain.py --class cat --correct --n 8      # the cats it is surest about, right or wrong
    python explain.py --index 12 57 --method all       # these test images, every method
    python explain.py --sample 16                      # a seeded random sample of the test set
    python explain.py --image cat.jpg dog.png          # your own pictures, resized to 32x32

For each image it maps the evidence for the predicted class, for the true class, and for the
contrast a mistake asks about: why the predicted class rather than the true one (for a right
prediction or your own picture: rather than the runner-up). Needs only the checkpoint (and the
data). Writes beside the checkpoint (or into --out): gradcam.png, cams.npz (one npz per method
and layer when several), explanations.json with the faithfulness tables (ROAD against
RandomCAM), and report.html, where every map of every image can be explored.
Do the CAMs point at the evidence? benchmarks/pointing_game.py measures it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image
from tqdm import tqdm

from common import hardware, results
from common.atomic import atomic_write
from common.cams import (
    METHODS,
    ROAD_PERCENTILES,
    SMOOTHING,
    TARGETS,
    choose_methods,
    class_targets,
    compute_cams,
    find_layers,
    map_size,
    mean_se,
    output_shapes,
    paired_difference,
    random_maps,
    road_scores,
)
from common.checkpoint import data_for, model_from_checkpoint, run_on_checkpoint, temperature_for
from common.data import DataError, Dataset, normalize, rgb_image
from common.explorer import OPACITY
from common.options import (
    Parser,
    UsageError,
    add_accelerator_option,
    add_data_option,
    add_weights_options,
    chosen_weights,
    command,
    non_negative_int,
    positive_int,
    seed,
)
from common.plots import plot_cam_comparison, plot_cam_grid, to_hwc
from common.predict import predict_probs, with_temperature
from common.report import write_report

# Chosen by measurement (README, "Explanations you can check"). In the pointing game GradCAM put
# the peak on the object 97 % of the time at layer2 (16x16 maps), 82 % at layer3 (8x8) and 36 %
# at layer4 (4x4); SESS 95, 99 and 90 %, at about 50 times GradCAM's cost. So by default layer2
# with GradCAM, and SESS wherever the maps are coarser than 16x16.
DEFAULT_LAYER = "layer2"
FINE_MAP = 16  # the smallest map side GradCAM points well from


def parse_args(argv: list[str] | None):
    p = Parser(prog="explain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="best.pt", help="checkpoint to explain (default best.pt)")
    add_data_option(p, "default: the source recorded in the checkpoint", test_only=True)
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    maps = p.add_argument_group("the maps")
    maps.add_argument(
        "--method",
        action="append",
        metavar="NAME",
        help=f"{', '.join(METHODS)} or all; repeat to compare (default: gradcam where the layer's map is "
        f"{FINE_MAP}x{FINE_MAP} or finer, sess where it is coarser)",
    )
    maps.add_argument(
        "--layer",
        action="append",
        metavar="NAME",
        help="module whose activations the CAM uses: layer4, layer3, layer3.1.conv2, or several "
        f"fused with '+' such as layer3+layer4; repeat to compare (default {DEFAULT_LAYER})",
    )
    maps.add_argument(
        "--target",
        action="append",
        choices=TARGETS,
        help="whose evidence: pred (the predicted class), true (the true class), contrast (the "
        "predicted class rather than the true one, or than the runner-up); default all three",
    )
    maps.add_argument(
        "--aug-smooth", action="store_true", help="average each map over flipped and scaled copies"
    )
    maps.add_argument("--eigen-smooth", action="store_true", help="keep each map's first principal component")
    which = p.add_argument_group("which images (default: the most confident mistakes)")
    which.add_argument("--n", type=positive_int, default=20, help="at most this many images (default 20)")
    which.add_argument(
        "--order",
        choices=("confidence", "index"),
        default="confidence",
        help="the most confident first (default) or in test-set order",
    )
    which.add_argument("--correct", action="store_true", help="right predictions too, not only mistakes")
    which.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME",
        help="only test images of this true class; repeat for several",
    )
    which.add_argument(
        "--sample",
        type=positive_int,
        metavar="N",
        help="N test images drawn at random (seeded by --seed), right or wrong, instead of --n",
    )
    which.add_argument("--index", type=non_negative_int, nargs="+", metavar="I", help="these test images")
    which.add_argument("--image", nargs="+", metavar="PATH", help="your own pictures, instead of test images")
    check = p.add_argument_group("faithfulness")
    check.add_argument(
        "--road-sample",
        type=non_negative_int,
        default=200,
        metavar="N",
        help="score each method by ROAD on N seeded random test images, paired against RandomCAM "
        "(default 200; 0: only the explained images)",
    )
    check.add_argument("--no-faithfulness", action="store_true", help="skip the ROAD faithfulness scores")
    p.add_argument(
        "--seed", type=seed, default=0, help="seed of --sample, ROAD's noise and RandomCAM (default 0)"
    )
    add_weights_options(p)
    add_accelerator_option(p)
    return p.parse_args(argv)


# --- which images: test images chosen one of several ways, or the user's pictures ------------


@dataclass
class Selection:
    """The images to explain, whichever way they were chosen."""

    images: torch.Tensor  # uint8 (N,3,32,32)
    labels: torch.Tensor  # true classes; -1 for the user's pictures
    probs: torch.Tensor  # (N, classes), from the model being explained, in fp32
    index: torch.Tensor  # test-set index, or the picture's position in --image
    captions: list[str]
    what: str  # e.g. "the 20 most confident mistakes"
    test: Dataset | None  # the test set they come from; None for the user's pictures
    files: list[str] = field(default_factory=list)  # the user's pictures: their file names

    @property
    def user(self) -> bool:
        """The user's pictures (--image): files named user_*, no true class."""
        return self.test is None

    @property
    def preds(self) -> torch.Tensor:
        return self.probs.argmax(1)

    @property
    def others(self) -> torch.Tensor:
        """The class each contrast is against: the true one for a mistake, else the runner-up."""
        runner_up = self.probs.topk(2, dim=1).indices[:, 1]
        return torch.where((self.labels >= 0) & (self.labels != self.preds), self.labels, runner_up)


def test_images(state: dict, args, model, autocast: torch.dtype | None) -> Selection:
    """Test images chosen by --index, --sample, or (default) ranked by confidence: the mistakes,
    or with --correct all predictions; --class narrows the last two."""
    test, classes = data_for(state, args.data).test, state["classes"]
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    mistakes, weights = not (args.index or args.sample or args.correct), chosen_weights(args)
    if args.index:
        index, what = checked_indices(args.index, len(test)), f"test images {', '.join(map(str, args.index))}"
    elif args.sample:
        pool = of_classes(test, classes, args.classes).nonzero().flatten()
        index = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))]
        what = f"{{n}} random {described(args.classes)}test images"
    else:
        # Same predictions and confidences as evaluate.py: same precision rule, same pass, and
        # calibrated before ranking (a temperature can reorder confidences across images).
        ranking = predict_probs(model, test.images, mean, std, autocast=autocast, desc="ranking the test set")
        probs = shown(ranking.plain, state, weights)
        index, what = ranked(probs, test, classes, args)
    limit = len(index) if args.index else args.sample or args.n
    # A margin for the mistakes: re-scored in fp32, as the CAMs run, some may turn right.
    index = index[: 2 * limit + 10 if mistakes else limit]
    probs = predict_probs(model, test.images[index], mean, std).plain
    if mistakes:
        still_wrong = probs.argmax(1) != test.labels[index]
        index, probs = index[still_wrong][:limit], probs[still_wrong][:limit]
    probs = shown(probs, state, weights)
    if not (args.index or args.sample) and args.order == "confidence":  # in the order they show
        order = probs.max(1).values.argsort(descending=True, stable=True)
        index, probs = index[order], probs[order]
    labels = test.labels[index]
    captions = [
        f"#{i} true {classes[t]}\npred {classes[p.argmax()]} {100 * p.max():.0f}%"
        for i, t, p in zip(index.tolist(), labels.tolist(), probs)
    ]
    what = what.replace("{n}", str(len(index)))
    return Selection(test.images[index], labels, probs, index, captions, what, test)


def shown(probs: torch.Tensor, state: dict, weights: str) -> torch.Tensor:
    """The probabilities as shown: calibrated when training fitted a temperature to these weights."""
    temperature = temperature_for(state, weights)
    return with_temperature(probs, temperature) if temperature else probs


def checked_indices(given: list[int], size: int) -> torch.Tensor:
    bad = [i for i in given if i >= size]
    if bad:
        raise UsageError(
            f"--index {bad[0]} is out of range: the test set has {size:,} images (0 to {size - 1})"
        )
    return torch.tensor(list(dict.fromkeys(given)), dtype=torch.long)


def of_classes(test: Dataset, classes: list[str], names: list[str] | None) -> torch.Tensor:
    """Which test images are of the --class names given (all, when none is)."""
    for name in names or []:
        if name not in classes:
            raise UsageError(f"unknown --class '{name}'; the classes are {', '.join(classes)}")
    if not names:
        return torch.ones(len(test), dtype=torch.bool)
    return torch.isin(test.labels, torch.tensor([classes.index(c) for c in names]))


def described(names: list[str] | None) -> str:
    return " or ".join(names) + " " if names else ""


def ranked(probs: torch.Tensor, test: Dataset, classes: list[str], args) -> tuple[torch.Tensor, str]:
    """The mistakes (or with --correct every prediction) of the --class names given, the most
    confident first or in test-set order; and what they are in words ({n}: how many)."""
    keep = of_classes(test, classes, args.classes)
    if not args.correct:
        keep &= probs.argmax(1) != test.labels
    index = keep.nonzero().flatten()
    if args.order == "confidence":
        index = index[probs[index].max(1).values.argsort(descending=True, stable=True)]
    order = "most confident" if args.order == "confidence" else "first"
    noun = "predictions" if args.correct else "mistakes"
    return index, f"the {{n}} {order} {described(args.classes)}{noun}"


def user_pictures(state: dict, args, model, autocast: torch.dtype | None) -> Selection:
    """The user's pictures (--image), resized to 32x32; no true label."""
    images, notes = load_user_images(args.image)
    for path, note in zip(args.image, notes):
        if note:
            print(f"note: {path} {note}")
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    probs = shown(predict_probs(model, images, mean, std).plain, state, chosen_weights(args))
    classes, captions = state["classes"], []
    for path, p in zip(args.image, probs):
        top = [(classes[c], 100 * v) for v, c in zip(*p.topk(min(3, len(classes))))]
        print(f"{path}: " + ", ".join(f"{name} {v:.1f}%" for name, v in top))
        captions.append(f"{Path(path).name[:18]}\n" + "\n".join(f"{name} {v:.0f}%" for name, v in top))
    labels = torch.full((len(images),), -1)
    what = f"{len(images)} of your pictures"
    files = [Path(path).name for path in args.image]
    return Selection(images, labels, probs, torch.arange(len(images)), captions, what, None, files)


def load_user_images(paths: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Pictures of any size -> uint8 (N,3,32,32), and a note per picture."""
    from PIL import Image, UnidentifiedImageError

    images, notes = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                size, rgb = img.size, rgb_image(img, path)
        except FileNotFoundError:
            raise DataError(f"image not found: {path}") from None
        except IsADirectoryError:
            raise DataError(f"{path} is a folder: name its pictures ({path}/*.png)") from None
        except Image.DecompressionBombError:
            raise DataError(f"{path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, the most PIL "
                            "will open: scale it down first") from None  # fmt: skip
        except (UnidentifiedImageError, OSError):
            raise DataError(f"not an image: {path}") from None
        rgb = rgb if size == (32, 32) else rgb.resize((32, 32), Image.BICUBIC)
        images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
        notes.append("" if size == (32, 32) else f"resized from {size[0]}x{size[1]} to 32x32")
    return torch.stack(images), notes


# --- the one path: CAMs, faithfulness, pictures, files ----------------------------------------


@dataclass
class Subject:
    """The model being explained, at the layers asked for, and how."""

    model: torch.nn.Module
    layers: dict[str, list[torch.nn.Module]]  # --layer spec -> the modules it names
    methods: list[str]
    smooth: tuple[bool, bool]  # aug_smooth, eigen_smooth
    autocast: torch.dtype | None  # for the many forward passes of ROAD

    def combos(self) -> list[tuple[str, str]]:
        """(method, layer) pairs; a method that reads no layer (FullGrad) only once; "auto", the
        default, is GradCAM on fine maps and SESS on coarse ones."""
        first = next(iter(self.layers))
        pairs = [(self.method_for(m, spec), spec) for spec in self.layers for m in self.methods]
        return list(dict.fromkeys((m, spec) for m, spec in pairs if METHODS[m].uses_layer or spec == first))

    def method_for(self, method: str, spec: str) -> str:
        if method != "auto":
            return method
        side = min(min(shape[2:]) for shape in output_shapes(self.model, self.layers[spec]))
        return "gradcam" if side >= FINE_MAP else "sess"


def refuse_smoothing_it_cannot_take(s: Subject) -> None:
    """--aug-smooth and --eigen-smooth, asked of a method that does not take them, are one line
    (not maps quietly left unsmoothed)."""
    for option, asked in zip(SMOOTHING, s.smooth):
        cannot = [(m, spec) for m, spec in s.combos() if asked and option not in METHODS[m].smoothing]
        if cannot:
            method, spec = cannot[0]
            which = METHODS[method].name + (f", the default method at {spec}" if "auto" in s.methods else "")
            takers = " / ".join(name for name, m in METHODS.items() if option in m.smoothing)
            raise UsageError(
                f"--{option.replace('_', '-')} does not apply to {which}: "
                f"name a method that takes it: --method {takers}"
            )


@dataclass
class Cams:
    """One method at one layer: a map per image for each target."""

    method: str
    layer: str  # the --layer spec, "every bias" for FullGrad
    spec: str  # the --layer spec its maps were computed with
    maps: dict[str, np.ndarray]  # target -> (N,32,32) in [0,1]

    @property
    def name(self) -> str:
        return f"{METHODS[self.method].name} {self.layer}"


def explain(s: Subject, wanted: dict[str, list], x: torch.Tensor) -> list[Cams]:
    """Maps of every method at every layer, for each wanted target ({target: one per image})."""
    found = []
    for method, spec in tqdm(s.combos(), desc="CAMs", disable=len(s.combos()) == 1):
        make = METHODS[method]
        maps = {
            t: compute_cams(s.model, make, s.layers[spec], x, w, s.smooth, f"{method} {spec}")
            for t, w in wanted.items()
        }
        found.append(Cams(method, spec if make.uses_layer else "every bias", spec, maps))
    return found


def wanted_targets(sel: Selection, targets: list[str]) -> dict[str, list]:
    """The pytorch_grad_cam targets of each asked-for kind (no true class for the user's pictures)."""
    every = {
        "pred": lambda: class_targets(sel.preds),
        "contrast": lambda: class_targets(sel.preds, sel.others),
        "true": lambda: class_targets(sel.labels),
    }
    return {t: every[t]() for t in targets if not (sel.user and t == "true")}


def road_pairs(s: Subject, cams: list[Cams], x: torch.Tensor, classes: torch.Tensor, seed: int) -> list:
    """ROAD (for `classes`) of each method and layer, and of RandomCAM at the same layer on the
    same images: [(method's scores, RandomCAM's scores)], one pair per entry of `cams`."""
    baseline, pairs = {}, []
    for c in cams:
        if c.spec not in baseline:
            noise = random_maps(s.model, s.layers[c.spec], x, class_targets(classes), seed)
            baseline[c.spec] = road_scores(s.model, x, noise, classes, seed, s.autocast)
        pairs.append((road_scores(s.model, x, c.maps["pred"], classes, seed, s.autocast), baseline[c.spec]))
    return pairs


def explained_faithfulness(
    s: Subject, cams: list[Cams], sel: Selection, x: torch.Tensor, seed: int
) -> list[dict]:
    """ROAD on the explained images themselves, mean ± standard error against RandomCAM."""
    rows = []
    for c, (road, random) in zip(cams, road_pairs(s, cams, x, sel.preds, seed)):
        (m, se), (rm, rse) = mean_se(road), mean_se(random)
        beats = m > rm + 2 * rse
        rows.append({"method": METHODS[c.method].name, "layer": c.layer, "n": len(road), "road_mean": m,
                     "road_se": se, "random_mean": rm, "random_se": rse, "beats_random": beats})  # fmt: skip
    return rows


def sampled_faithfulness(s: Subject, test: Dataset, state: dict, n: int, seed: int) -> list[dict]:
    """ROAD on a seeded random sample of test images, each method paired against RandomCAM on
    the same images: the mean difference, its 95 % interval and the verdict that gives."""
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    print(f"faithfulness: ROAD on {len(index)} random test images, against RandomCAM", flush=True)
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    preds = predict_probs(s.model, test.images[index], mean, std).plain.argmax(1)
    x = normalize(test.images[index], mean, std)
    cams = explain(s, {"pred": class_targets(preds)}, x)
    rows = []
    for c, (road, random) in zip(cams, road_pairs(s, cams, x, preds, seed)):
        rows.append({"method": METHODS[c.method].name, "layer": c.layer, "n": len(road),
                     "road_mean": float(road.mean()), "random_mean": float(random.mean()),
                     **paired_difference(road, random)})  # fmt: skip
    return rows


def save_arrays(cams: list[Cams], sel: Selection, classes: list[str], out: Path) -> list[str]:
    """One npz per method and layer (replacing an earlier run's): what report.html's explorer
    draws from."""
    results.remove_cams(out, sel.user)
    written = []
    for c in cams:
        name = results.cams_file(None if len(cams) == 1 else slug(c), sel.user)
        missing = np.full((len(sel.index), 32, 32), np.nan, np.float32)
        with atomic_write(out / name, "wb") as f:
            np.savez(
                f,
                method=METHODS[c.method].name,
                layer=c.layer,
                classes=np.array(classes),
                index=sel.index.numpy().astype(np.int64),
                true=sel.labels.numpy().astype(np.int64),
                pred=sel.preds.numpy().astype(np.int64),
                contrast_class=sel.others.numpy().astype(np.int64),
                probs=sel.probs.numpy().astype(np.float32),
                images=sel.images.permute(0, 2, 3, 1).numpy(),
                files=np.array(sel.files, dtype=str),
                **{f"cam_{t}": c.maps.get(t, missing) for t in TARGETS},
            )
        written.append(name)
    return written


def slug(c: Cams) -> str:
    return f"{c.method.replace('++', 'pp')}_{c.layer.replace(' ', '-')}"


def draw(s: Subject, cams: list[Cams], sel: Selection, classes: list[str], path: Path) -> None:
    rgb = [to_hwc(img) for img in sel.images]

    def overlay(k: int, cam: np.ndarray) -> np.ndarray:
        return show_cam_on_image(
            rgb[k].astype(np.float32) / 255, cam[k], use_rgb=True, image_weight=1 - OPACITY
        )

    def heading(k: int, target: str) -> str:
        pred, other = classes[sel.preds[k]], classes[sel.others[k]]
        true = classes[sel.labels[k]] if sel.labels[k] >= 0 else "?"
        return {
            "pred": f"{pred}\n(predicted)",
            "true": f"{true}\n(true)",
            "contrast": f"{pred}, not\n{other}",
        }[target]

    if len(cams) == 1:
        c = cams[0]
        rows = [
            (rgb[k], sel.captions[k], [(overlay(k, m), heading(k, t)) for t, m in c.maps.items()])
            for k in range(len(rgb))
        ]
        where = f"{c.layer} ({map_size(s.model, s.layers[c.spec])})" if c.layer == c.spec else c.layer
        plot_cam_grid(
            rows, path, f"{METHODS[c.method].name} at {where}, {sel.what}; red = evidence for the class named"
        )
        return
    target = "pred" if "pred" in cams[0].maps else next(iter(cams[0].maps))
    columns = [f"{METHODS[c.method].name}\n{c.layer}" for c in cams]
    overlays = [[overlay(k, c.maps[target]) for c in cams] for k in range(len(rgb))]
    title = f"CAMs ({target}), {sel.what}; every target of every map is in report.html"
    plot_cam_comparison(rgb, overlays, sel.captions, columns, path, title)


def print_tables(explained: list[dict], sampled: list[dict], seed: int) -> None:
    if explained:
        print(
            f"\nfaithfulness on the {explained[0]['n']} explained images: ROADCombined (percentiles "
            f"{ROAD_PERCENTILES}) for the predicted class, seed {seed}; higher is better"
        )
        print(f"{'method':<11} {'layer':<16} {'ROAD':>16} {'RandomCAM':>16}")
        for r in explained:
            flag = (
                "   one image: no standard error, no verdict" if r["n"] < 2
                else "" if r["beats_random"] else "   does not beat RandomCAM by 2 SE"
            )  # fmt: skip
            print(
                f"{r['method']:<11} {r['layer']:<16} {r['road_mean']:>+8.4f} ± {r['road_se']:.4f} "
                f"{r['random_mean']:>+8.4f} ± {r['random_se']:.4f}{flag}"
            )
    if sampled:
        print(
            f"\nfaithfulness on {sampled[0]['n']} random test images (seed {seed}): ROAD minus RandomCAM's "
            "on the same images, mean and 95 % interval"
        )
        for r in sampled:
            print(
                f"{r['method']:<11} {r['layer']:<16} {r['diff_mean']:>+8.4f} [{r['diff_low']:+.4f}, "
                f"{r['diff_high']:+.4f}]  {r['verdict']}"
            )


@command
def main(argv: list[str] | None = None) -> int:
    return run_on_checkpoint(parse_args(argv), run)


def run(args, state: dict, out: Path) -> int:
    started = time.perf_counter()
    methods = choose_methods(args.method, "auto") if args.method else ["auto"]
    targets = list(dict.fromkeys(args.target or TARGETS))
    if args.image and targets == ["true"]:
        raise UsageError("--target true needs test images: your pictures have no true class")
    model = model_from_checkpoint(state, chosen_weights(args))
    layers = {spec: find_layers(model, spec) for spec in dict.fromkeys(args.layer or [DEFAULT_LAYER])}

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    model = model.to(torch.device(accelerator), memory_format=torch.channels_last)
    autocast = hardware.autocast_dtype(hardware.default_precision(accelerator))
    s = Subject(model, layers, methods, (args.aug_smooth, args.eigen_smooth), autocast)
    refuse_smoothing_it_cannot_take(s)
    for method, spec in s.combos():
        where = f"{spec} ({map_size(model, layers[spec])})" if METHODS[method].uses_layer else "every bias"
        print(f"maps       {METHODS[method].name} at {where}")
    sel = (user_pictures if args.image else test_images)(state, args, model, autocast)
    if len(sel.index) == 0:
        raise UsageError(f"no images to explain ({sel.what}); --correct takes right predictions too")
    if not (sel.user or args.index or args.sample) and len(sel.index) < args.n:
        print(f"note: only {len(sel.index)} such images, fewer than --n {args.n}; showing all")

    x = normalize(sel.images, torch.tensor(state["mean"]), torch.tensor(state["std"]))
    cams = explain(s, wanted_targets(sel, targets), x)
    faithful = not args.no_faithfulness and "pred" in targets
    explained = explained_faithfulness(s, cams, sel, x, args.seed) if faithful and len(x) else []
    sampled = []
    if faithful and not sel.user and args.road_sample:
        sampled = sampled_faithfulness(s, sel.test, state, args.road_sample, args.seed)
    written = save_arrays(cams, sel, state["classes"], out)
    draw(s, cams, sel, state["classes"], out / results.cam_picture(sel.user))
    written.append(results.cam_picture(sel.user))
    print_tables(explained, sampled, args.seed)
    if not sel.user:
        write_explanations(out / results.EXPLANATIONS, args, s, targets, sel, explained, sampled)
        written.append(results.EXPLANATIONS)
    write_report(out)
    written.append(results.REPORT)
    print(f"\nwrote {', '.join(str(out / w) for w in written)} in {time.perf_counter() - started:.1f}s")
    return 0


def write_explanations(path: Path, args, s: Subject, targets, sel: Selection, explained, sampled) -> None:
    note = (
        f"ROADCombined (percentiles {ROAD_PERCENTILES}) for the predicted class, seed {args.seed}. On the "
        "explained images a method 'beats RandomCAM' when its mean exceeds RandomCAM's by 2 standard errors; "
        "on the random sample the verdict comes from the 95 % interval of the paired differences."
    )
    report = {
        "checkpoint": str(args.ckpt),
        "maps": [f"{METHODS[m].name} {spec}" for m, spec in s.combos()],
        "targets": targets,
        "images": sel.what,
        "n": len(sel.index),
        "faithfulness": explained,
        "road_sample": sampled,
        "note": note,
    }
    with atomic_write(path) as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
