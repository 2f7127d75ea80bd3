"""The files a results folder holds: the one place that names them.

train.py, evaluate.py and explain.py write these names, report.html reads them, and
`train.py --overwrite` clears them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# train.py
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.csv"
CURVES = "curves.png"
SUMMARY = "summary.json"
LOGS = "logs"  # the live logger's folder (csv or tensorboard)
# evaluate.py
EVALUATION = "evaluation.json"
PREDICTIONS = "predictions.csv"
CONFUSION = "confusion_matrix.png"
CALIBRATION = "calibration.png"
MISCLASSIFIED = "misclassified.png"
# explain.py
CAM_PICTURE = "gradcam.png"
CAMS = "cams.npz"
EXPLANATIONS = "explanations.json"
USER_PREFIX = "user_"  # explain.py --image: user_gradcam.png, user_cams.npz
# benchmarks/pointing_game.py
SELFCHECK = "selfcheck.json"
# all three
REPORT = "report.html"

FILES = (
    LAST,
    BEST,
    METRICS,
    CURVES,
    SUMMARY,
    EVALUATION,
    PREDICTIONS,
    CONFUSION,
    CALIBRATION,
    MISCLASSIFIED,
    EXPLANATIONS,
    SELFCHECK,
    REPORT,
)
CAM_PICTURES = "gradcam*.png"  # one per explain.py run kind
CAM_ARRAYS = "cams*.npz"  # cams.npz, or one cams_<method>_<layer>.npz per method and layer
PATTERNS = (CAM_PICTURES, CAM_ARRAYS, USER_PREFIX + CAM_PICTURES, USER_PREFIX + CAM_ARRAYS)


def cams_file(method_layer: str | None, user: bool = False) -> str:
    """cams.npz for one method and layer, cams_<method>_<layer>.npz for one of several."""
    name = CAMS if method_layer is None else f"cams_{method_layer}.npz"
    return USER_PREFIX + name if user else name


def cam_picture(user: bool = False) -> str:
    return USER_PREFIX + CAM_PICTURE if user else CAM_PICTURE


def remove_cams(folder: Path, user: bool) -> None:
    """An earlier explain.py's maps of the same kind: the explorer must not mix them in."""
    for path in folder.glob(USER_PREFIX + CAM_ARRAYS if user else CAM_ARRAYS):
        path.unlink(missing_ok=True)


def remove_results(folder: Path) -> None:
    """Delete every result file, so that report.html never mixes an older run's files in."""
    for name in FILES:
        (folder / name).unlink(missing_ok=True)
    for pattern in PATTERNS:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
    shutil.rmtree(folder / LOGS, ignore_errors=True)
