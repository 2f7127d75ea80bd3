"""report.html's map explorer: a card per explained image, every map explain.py computed.

Built from the cams*.npz files in a results folder (explain.py writes the pictures, labels,
probabilities and maps there). Each card shows the picture with one map over it; buttons
switch the method and layer, and the target (the predicted class, the true class, the
contrast between them); one slider sets the overlay's opacity on every card. Plain HTML,
CSS and a few lines of inline JavaScript: nothing is fetched, the page works from disk.
"""

from __future__ import annotations

import base64
import io
import zipfile
from html import escape
from pathlib import Path

import numpy as np

from common import results

OPACITY = 0.5  # the map's opacity over the picture: explain.py's pictures, and the explorer's to start
TARGET_NAMES = {"pred": "predicted", "true": "true", "contrast": "contrast"}

CSS = """
.explorer-controls{position:sticky;top:0;z-index:2;background:#fff;padding:8px 0;
 border-bottom:1px solid #e3e6ec}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px;margin-top:12px}
.card{border:1px solid #e3e6ec;border-radius:6px;padding:10px;background:#fafbfc}
.view{position:relative;width:160px;height:160px;margin:0 auto 8px}
.view img{position:absolute;left:0;top:0;width:160px;height:160px;image-rendering:pixelated}
.view img.map{opacity:var(--opacity,%OPACITY%)}
.card .labels{font-size:13px;margin:4px 0}.card .labels b{color:#a3221a}.card .labels b.right{color:#1c7a3a}
.card .labels b.unjudged{color:#1d2330}
.card .probs{font-size:12px;color:#6b7385;margin:2px 0 6px}
.choices{display:flex;flex-wrap:wrap;gap:4px;margin:4px 0}
.choices button{font:12px system-ui,sans-serif;padding:2px 7px;border:1px solid #c8ccd6;border-radius:4px;
 background:#fff;cursor:pointer}
.choices button[aria-pressed=true]{background:#1d2330;color:#fff;border-color:#1d2330}
""".replace("%OPACITY%", str(OPACITY))

SCRIPT = """
const cards = Array.from(document.querySelectorAll('.card'));
function show(card) {
  const [method, target] = [card.dataset.method, card.dataset.target];
  const maps = Array.from(card.querySelectorAll('img.map'));
  // A map this card lacks (a target or method another card has): the nearest one it has, and
  // its buttons then say which.
  const shown = maps.find(m => m.dataset.key === method + '|' + target)
    || maps.find(m => m.dataset.key.startsWith(method + '|'))
    || maps.find(m => m.dataset.key.endsWith('|' + target)) || maps[0];
  [card.dataset.method, card.dataset.target] = shown.dataset.key.split('|');
  maps.forEach(m => { m.hidden = m !== shown; });
  card.querySelectorAll('button').forEach(b => {
    b.setAttribute('aria-pressed', String(card.dataset[b.dataset.kind] === b.dataset.value));
  });
}
function choose(targetCards, kind, value) {
  targetCards.forEach(card => { card.dataset[kind] = value; show(card); });
}
cards.forEach(card => {
  card.querySelectorAll('button').forEach(b => {
    b.addEventListener('click', () => choose([card], b.dataset.kind, b.dataset.value));
  });
  show(card);
});
document.querySelectorAll('.explorer-controls button').forEach(b => {
  b.addEventListener('click', () => choose(cards, b.dataset.kind, b.dataset.value));
});
const slider = document.getElementById('opacity');
if (slider) {
  slider.addEventListener('input', () => {
    document.documentElement.style.setProperty('--opacity', slider.value);
    document.getElementById('opacity-value').textContent = Math.round(100 * slider.value) + ' %';
  });
}
"""


def _png(rgb: np.ndarray) -> str:
    """A uint8 (H,W,3 or 4) array as a data: URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _heatmap(cam: np.ndarray) -> np.ndarray:
    """A map in [0,1] coloured like pytorch_grad_cam's overlays (the jet colour map)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.nan_to_num(cam))[..., :3] * 255).astype(np.uint8)


def _load(path: Path) -> dict | None:
    """An npz's arrays, or None when it is unreadable or lacks what the explorer needs
    (npz files written before the explorer existed)."""
    needed = ("method", "layer", "classes", "index", "true", "pred", "contrast_class", "probs", "images")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not all(k in npz.files for k in needed):
                return None
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def _button(kind: str, value: str, label: str) -> str:
    return (f'<button type="button" data-kind="{kind}" data-value="{escape(value)}" '
            f'aria-pressed="false">{escape(label)}</button>')  # fmt: skip


def _card(k: int, runs: list[dict], user: bool) -> str:
    first = runs[0]
    classes = [str(c) for c in first["classes"]]
    pred, true, other = int(first["pred"][k]), int(first["true"][k]), int(first["contrast_class"][k])
    probs = first["probs"][k]
    top = np.argsort(-probs)[:3]
    if user:
        files = first.get("files", [])  # npz files from before it kept the file names lack it
        name = escape(str(files[k])) if len(files) > k else f"picture {int(first['index'][k]) + 1}"
        head = f'{name}: <b class="unjudged">{escape(classes[pred])}</b> {100 * probs[pred]:.0f}%'
    else:
        verdict = "right" if pred == true else ""
        head = (f"#{int(first['index'][k])} · true {escape(classes[true])} · predicted "
                f'<b class="{verdict}">{escape(classes[pred])}</b> {100 * probs[pred]:.0f}%')  # fmt: skip
    names = {"pred": f"{classes[pred]} (predicted)", "true": f"{classes[true]} (true)" if true >= 0 else "",
             "contrast": f"{classes[pred]}, not {classes[other]}"}  # fmt: skip
    maps, method_buttons, target_buttons = [], [], {}
    for run in runs:
        method = f"{run['method']} {run['layer']}"
        method_buttons.append(_button("method", method, method))
        for target in TARGET_NAMES:
            cam = run[f"cam_{target}"][k]
            if np.isnan(cam).all():
                continue
            target_buttons[target] = _button("target", target, names[target])
            maps.append(f'<img class="map" data-key="{escape(method)}|{target}" alt="{escape(method)}, '
                        f'{escape(names[target])}" src="{_png(_heatmap(cam))}" hidden>')  # fmt: skip
    picture = f'<img class="picture" alt="the picture" src="{_png(first["images"][k])}">'
    chances = " · ".join(f"{escape(classes[c])} {100 * probs[c]:.0f}%" for c in top)
    method = escape(f"{first['method']} {first['layer']}")
    start = f'data-method="{method}" data-target="{next(iter(target_buttons))}"'
    return (f'<div class="card" {start}><div class="view">{picture}{"".join(maps)}</div>'
            f'<div class="labels">{head}</div><div class="probs">{chances}</div>'
            f'<div class="choices">{"".join(method_buttons) if len(runs) > 1 else ""}</div>'
            f'<div class="choices">{"".join(target_buttons.values())}</div></div>')  # fmt: skip


def _controls(runs: list[dict]) -> str:
    methods = "".join(
        _button("method", m, m) for m in dict.fromkeys(f"{r['method']} {r['layer']}" for r in runs)
    )
    computed = [t for t in TARGET_NAMES if any(not np.isnan(r[f"cam_{t}"]).all() for r in runs)]
    targets = "".join(_button("target", t, TARGET_NAMES[t]) for t in computed)
    return (f'<div class="explorer-controls"><label>opacity <input id="opacity" type="range" min="0" max="1" '
            f'step="0.05" value="{OPACITY}"> <span id="opacity-value">{round(100 * OPACITY)} %</span></label>'
            f'<div class="choices">every card: {methods}</div>'
            f'<div class="choices">every card: {targets}</div></div>')  # fmt: skip


def _runs(folder: Path, user: bool) -> list[dict]:
    """The npz files of one explain.py run kind (test images, or the user's pictures) that
    cover the same images, each as a dict of arrays."""
    pattern = results.USER_PREFIX + results.CAM_ARRAYS if user else results.CAM_ARRAYS
    runs = [r for r in (_load(p) for p in sorted(folder.glob(pattern))) if r is not None and len(r["index"])]
    return [r for r in runs if np.array_equal(r["index"], runs[0]["index"])]


def explorer(folder: Path) -> str:
    """The explorer's HTML ('' when the folder holds no maps); it needs SCRIPT on the page."""
    groups = {"Test images": _runs(folder, user=False), "Your pictures": _runs(folder, user=True)}
    parts = []
    for title, runs in groups.items():
        user = title == "Your pictures"
        cards = "".join(_card(k, runs, user) for k in range(len(runs[0]["index"]))) if runs else ""
        parts += [f'<h3>{title}</h3><div class="cards">{cards}</div>'] if runs else []
    return _controls([r for runs in groups.values() for r in runs]) + "".join(parts) if parts else ""
