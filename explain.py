"""Explain a checkpoint's mistakes with Grad-CAM.

    python explain.py --layer layer4 --n 20          # the 20 most confident mistakes
    python explain.py --layer layer3.1.conv2 --order index

Needs only the checkpoint (and the data). Writes beside the checkpoint (or into --out):
gradcam.png (each image, its CAM for the predicted and for the true class) and cams.npz.
Grad-CAM runs on the plain model: hooks added after torch.compile would be ignored.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from common import hardware
from common.checkpoint import check_classes, load_checkpoint, model_from_checkpoint
from common.data import load_cifar10, normalize
from common.model import top_level_names
from common.options import (Parser, UsageError, add_accelerator_option, add_data_option, command,
                            positive_int)
from common.plots import plot_cam_grid, to_hwc
from common.predict import predict_probs


def parse_args(argv: list[str] | None):
    p = Parser(prog="explain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="best.pt", help="checkpoint to explain (default best.pt)")
    add_data_option(p, "default: the source recorded in the checkpoint")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--layer", default="layer4",
                   help="module whose activations Grad-CAM uses: layer4, layer3, layer3.1.conv2, ... (default layer4)")
    p.add_argument("--n", type=positive_int, default=20, help="misclassified images to explain (default 20)")
    p.add_argument("--order", choices=("confidence", "index"), default="confidence",
                   help="which mistakes: the most confident first (default) or in test-set order")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per CAM batch")
    p.add_argument("--ema", action="store_true",
                   help="use the moving average of the weights (checkpoints trained with --ema)")
    add_accelerator_option(p)
    return p.parse_args(argv)


def find_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"unknown layer '{name}'; top-level modules are "
                         f"{', '.join(top_level_names(model))} (nested names such as "
                         "layer3.1.conv2 work too)") from None


@command
def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    state = load_checkpoint(args.ckpt)
    out = Path(args.out) if args.out else Path(args.ckpt).parent
    model = model_from_checkpoint(state, "ema" if args.ema else "model")
    target_layer = find_layer(model, args.layer)
    out.mkdir(parents=True, exist_ok=True)

    data = args.data if args.data is not None else state["config"].get("data")
    splits = load_cifar10(data)
    test, classes = splits.test, state["classes"]
    check_classes(state, test.classes, splits.source)

    hardware.prepare_backend()
    accelerator = hardware.resolve_accelerator(args.accelerator)
    device = torch.device(accelerator)
    model = model.to(device, memory_format=torch.channels_last)
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])

    # Same predictions as evaluate.py: same precision rule, same pass.
    probs, _ = predict_probs(model, test.images, mean, std,
                             autocast=hardware.autocast_dtype(hardware.default_precision(accelerator)))
    probs = probs.cpu()
    confidence, preds = probs.max(1)
    wrong = (preds != test.labels).nonzero().flatten()
    if args.order == "confidence":
        wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)]
    chosen = wrong[: args.n]
    print(f"checkpoint {args.ckpt}: {len(wrong):,} of {len(test):,} test images misclassified")
    if len(chosen) < args.n:
        print(f"note: only {len(chosen)} misclassified images, fewer than --n {args.n}; showing all")

    # Grad-CAM (pytorch_grad_cam) for the predicted and for the true class of each image.
    x = normalize(test.images[chosen], mean, std)
    cam_pred = grad_cams(model, target_layer, x, preds[chosen], args.batch_size, args.layer)
    cam_true = grad_cams(model, target_layer, x, test.labels[chosen], args.batch_size, args.layer)

    np.savez(out / "cams.npz", index=chosen.numpy().astype(np.int64),
             true=test.labels[chosen].numpy().astype(np.int64),
             pred=preds[chosen].numpy().astype(np.int64),
             cam_pred=cam_pred, cam_true=cam_true)

    rows = []
    for k, i in enumerate(chosen.tolist()):
        rgb = to_hwc(test.images[i]).astype(np.float32) / 255
        t, p = classes[test.labels[i]], classes[preds[i]]
        rows.append((to_hwc(test.images[i]),
                     show_cam_on_image(rgb, cam_pred[k], use_rgb=True),
                     show_cam_on_image(rgb, cam_true[k], use_rgb=True),
                     f"#{i} true {t}\npred {p} {100 * confidence[i]:.0f}%", f"CAM: {p}\n(predicted)",
                     f"CAM: {t}\n(true)"))
    which = "most confident" if args.order == "confidence" else "first (test order)"
    plot_cam_grid(rows, out / "gradcam.png",
                  f"Grad-CAM at {args.layer} ({layer_size(model, target_layer, device)}), "
                  f"the {len(rows)} {which} mistakes; red = evidence for the class named")
    print(f"wrote {out / 'gradcam.png'} and {out / 'cams.npz'} "
          f"({len(rows)} images, layer {args.layer}) in {time.perf_counter() - started:.1f}s")
    return 0


def grad_cams(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor,
              target_classes: torch.Tensor, batch_size: int = 64, name: str = "") -> np.ndarray:
    """Grad-CAM maps, float32 (N,H,W) in [0,1], of normalised `images` for `target_classes`."""
    device = next(model.parameters()).device
    maps = np.zeros((len(images), *images.shape[-2:]), np.float32)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for start in tqdm(range(0, len(images), batch_size), desc=f"Grad-CAM {name}",
                          disable=len(images) <= batch_size):
            x = images[start:start + batch_size].to(device)
            targets = [ClassifierOutputTarget(int(c)) for c in target_classes[start:start + batch_size]]
            maps[start:start + len(x)] = cam(input_tensor=x, targets=targets)
    return np.clip(maps, 0, 1)


def layer_size(model: torch.nn.Module, layer: torch.nn.Module, device: torch.device) -> str:
    """The layer's spatial map size on a 32x32 input, e.g. '4x4 map': CAM resolution."""
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=device))
    handle.remove()
    return f"{seen[0][2]}x{seen[0][3]} map" if seen and len(seen[0]) == 4 else "not a spatial map"


if __name__ == "__main__":
    sys.exit(main())
