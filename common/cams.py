"""Class activation maps and their faithfulness, all from pytorch_grad_cam.

Shared by explain.py and benchmarks/pointing_game.py. Every CAM runs on the plain model:
hooks added after torch.compile are ignored.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import (
    SESS,
    EigenCAM,
    FullGrad,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    RefineCAM,
    ScoreCAM,
    ShapleyCAM,
    XGradCAM,
)
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FinerWeightedTarget,
)
from tqdm import tqdm

from common.model import folded_for_inference, top_level_names
from common.options import UsageError


@dataclass(frozen=True)
class Method:
    name: str  # as printed
    make: Callable  # (model, target_layers) -> a pytorch_grad_cam object
    uses_layer: bool = True  # FullGrad reads every bias gradient, whatever the layer
    images_per_call: int = 64  # SESS and ScoreCAM run many passes per image
    smoothing: tuple[str, ...] = ("aug_smooth", "eigen_smooth")  # the library's options it takes


def _sess(model, layers):
    # 32x32 inputs: 6 scales from 32 to 77 px, 32x32 windows every 16 px; the fused map is not
    # blurred (the library's 11x11, sigma 5 blur suits 224 px pictures, not 32 px ones).
    return SESS(model, layers, base_method=GradCAM, num_scales=6, step_size=16, smooth=False, batch_size=64)


METHODS = {
    "gradcam": Method("GradCAM", GradCAM),
    "gradcam++": Method("GradCAM++", GradCAMPlusPlus),
    "hirescam": Method("HiResCAM", HiResCAM),
    "xgradcam": Method("XGradCAM", XGradCAM),
    "layercam": Method("LayerCAM", LayerCAM),
    "eigencam": Method("EigenCAM", EigenCAM),
    "scorecam": Method("ScoreCAM", ScoreCAM, images_per_call=8),
    "shapleycam": Method("ShapleyCAM", ShapleyCAM),
    "fullgrad": Method("FullGrad", lambda model, layers: FullGrad(model, []), uses_layer=False),
    # grad-cam 1.5.7's RefineCAM hands its eigen_smooth on to each layer's CAM as aug_smooth
    # (refine_cam.py, a positional argument): neither option is offered.
    "refinecam": Method("RefineCAM", RefineCAM, smoothing=()),
    "sess": Method("SESS", _sess, images_per_call=16, smoothing=("eigen_smooth",)),
}
RANDOM = Method("RandomCAM", RandomCAM)  # the faithfulness baseline
TARGETS = ("pred", "true", "contrast")
SMOOTHING = ("aug_smooth", "eigen_smooth")  # the library's two options, in the order of `smooth`
ROAD_PERCENTILES = [20, 40, 60, 80]  # the predicted class, the true class, the first against the second


def choose_methods(given: list[str] | None, default: str) -> list[str]:
    names = [m.lower() for m in (given or [default])]
    if "all" in names:
        return list(METHODS)
    for name in names:
        if name not in METHODS and name != default:
            raise UsageError(f"unknown --method '{name}'; choose from {', '.join(METHODS)} or all")
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


def map_size(model: torch.nn.Module, layers: list[torch.nn.Module]) -> str:
    """The layers' spatial map sizes on a 32x32 input, e.g. '4x4 map': the CAM's resolution."""
    return " + ".join(f"{s[2]}x{s[3]}" for s in output_shapes(model, layers)) + " map"


def class_targets(classes: torch.Tensor, against: torch.Tensor | None = None) -> list:
    """One pytorch_grad_cam target per image: the class's logit, or with `against` the
    difference of the two logits (the library's FinerWeightedTarget with one comparison
    class and alpha 1: the evidence for the first class rather than the second)."""
    if against is None:
        return [ClassifierOutputTarget(int(c)) for c in classes]
    return [FinerWeightedTarget(int(c), [int(o)], 1.0) for c, o in zip(classes, against)]


def compute_cams(
    model: torch.nn.Module,
    method: Method,
    layers: list[torch.nn.Module],
    images: torch.Tensor,
    targets: list,
    smooth: tuple[bool, bool] = (False, False),
    desc: str = "",
) -> np.ndarray:
    """CAMs float32 (N,H,W) in [0,1] of normalised `images`, one target per image.

    smooth: (aug_smooth, eigen_smooth), the library's two smoothing options; only those in
    `method.smoothing` may be on (explain.py refuses the others in one line).
    """
    device = next(model.parameters()).device
    maps = np.zeros((len(images), *images.shape[-2:]), np.float32)
    batch = method.images_per_call
    options = {k: v for k, v in zip(SMOOTHING, smooth) if v}
    assert set(options) <= set(method.smoothing), f"{method.name} does not take {options}"
    # ScoreCAM and SESS draw progress bars of their own: keep the terminal readable.
    quiet = contextlib.redirect_stderr(io.StringIO())
    with _released(method.make(model, layers)) as cam, quiet:
        if isinstance(cam, ScoreCAM):
            cam.batch_size = 256  # ScoreCAM's masked copies per forward pass (default 16)
        for start in tqdm(range(0, len(images), batch), desc=desc, leave=False, disable=len(images) <= batch):
            x = images[start : start + batch].to(device)
            maps[start : start + len(x)] = cam(
                input_tensor=x, targets=targets[start : start + batch], **options
            )
    return np.nan_to_num(np.clip(maps, 0, 1))


@contextlib.contextmanager
def _released(cam):
    """The CAM object, its hooks removed afterwards (RefineCAM has no `with` of its own)."""
    try:
        yield cam
    finally:
        for part in [cam, getattr(cam, "base_cam", None), *getattr(cam, "base_cam_per_layer", [])]:
            if hasattr(part, "activations_and_grads"):
                part.activations_and_grads.release()


def road_scores(
    model: torch.nn.Module,
    images: torch.Tensor,
    maps: np.ndarray,
    classes: torch.Tensor,
    seed: int,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """pytorch_grad_cam's ROADCombined (percentiles 20/40/60/80) per image, for the softmax of
    `classes`: higher means removing what the CAM marks hurts the class more than removing
    what it leaves out. `autocast` runs its forward passes (8 per image) in that precision, with
    the BatchNorms folded (the maps are given: no hooks needed)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = next(model.parameters()).device
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    model = folded_for_inference(model)
    scored = _Autocast(model, autocast) if autocast else model
    road = ROADCombined(percentiles=ROAD_PERCENTILES)(images.to(device), maps, targets, scored)
    return np.asarray(road, dtype=np.float64).reshape(-1)


class _Autocast(torch.nn.Module):
    """The model's forward pass in a lower precision, its outputs back in float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def random_maps(
    model: torch.nn.Module, layers: list[torch.nn.Module], images: torch.Tensor, targets: list, seed: int
) -> np.ndarray:
    """RandomCAM's maps, seeded: it draws its weights from numpy."""
    np.random.seed(seed)
    return compute_cams(model, RANDOM, layers, images, targets)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def paired_difference(method: np.ndarray, baseline: np.ndarray) -> dict:
    """Mean of the per-image differences with a 95 % t-interval, and the verdict it gives."""
    from scipy import stats

    diff = method - baseline
    mean, se = mean_se(diff)
    half = stats.t.ppf(0.975, len(diff) - 1) * se if len(diff) > 1 else float("nan")
    low, high = mean - half, mean + half
    verdict = "beats RandomCAM" if low > 0 else "worse than RandomCAM" if high < 0 else "no clear difference"
    return {"diff_mean": mean, "diff_low": low, "diff_high": high, "verdict": verdict}
