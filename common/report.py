"""One self-contained HTML page summing up a run folder: ``write_report(folder)``.

It reads whatever result files the scripts left in the folder (summary.json, metrics.csv,
curves.png, evaluation.json, confusion_matrix.png, calibration.png, misclassified.png,
gradcam*.png, cams*.npz, explanations.json, selfcheck.json) and writes ``folder/report.html``:
pictures inlined as base64 data URIs, inline CSS, and the map explorer's few lines of inline
JavaScript; it links to nothing and fetches nothing. Every section is optional; a missing or
unreadable file only leaves its part out.
"""

from __future__ import annotations

import base64
import csv
import json
import os
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from common import results
from common.atomic import atomic_write
from common.explorer import CSS as EXPLORER_CSS
from common.explorer import SCRIPT, explorer

CSS = """
body{font:15px/1.45 system-ui,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2330;
 background:#f4f5f7;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{margin:0 0 6px;font-size:26px}
h2{margin:34px 0 12px;padding-bottom:4px;border-bottom:2px solid #e3e6ec;font-size:20px}
h3{margin:18px 0 6px;font-size:16px}
.facts{color:#4a5263;margin:4px 0}.facts b{color:#1d2330}.muted{color:#6b7385}
table{border-collapse:collapse;margin:10px 0 18px;font-size:14px;font-variant-numeric:tabular-nums}
th,td{padding:5px 12px;border-bottom:1px solid #e3e6ec;text-align:right}
th{background:#f0f2f6;font-weight:600}th.l,td.l{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}
td.bad{background:#fde8e6;color:#a3221a;font-weight:600}td.good{color:#1c7a3a}
figure{margin:12px 0 22px}figure img{max-width:100%;height:auto;border:1px solid #e3e6ec}
figcaption{color:#6b7385;font-size:13px;margin-top:4px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;margin:10px 0}
.scroll{max-height:520px;overflow-y:auto;display:inline-block;margin:10px 0 18px}
.scroll table{margin:0}.scroll th{position:sticky;top:0}
"""


def _json(path: Path) -> dict[str, Any]:
    """The JSON object in path, or {} when it is missing, partial or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _rows(value: Any) -> list[dict]:
    """The dicts in a JSON list (anything else gives no rows)."""
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


def _dig(value: Any, *keys: str) -> Any:
    """value[k1][k2]..., or None where a level is missing or not a dict."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _text(value: Any) -> str:
    return "" if value is None else escape(str(value))


def _fmt(value: Any, spec: str | None) -> str:
    """value formatted by spec ('%': a 0..1 fraction as a percentage); if it is no number,
    or spec is None, as escaped text ('' for None)."""
    try:
        if spec is not None and value is not None:
            return f"{100 * float(value):.2f}%" if spec == "%" else spec.format(float(value))
    except (TypeError, ValueError):
        pass
    return _text(value)


def _note(value: Any) -> str:
    return f'<p class="note">{_text(value)}</p>' if value else ""


def _figure(path: Path, caption: str = "") -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")):
        return ""  # not a PNG, or one still being written: no broken picture
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{escape(path.name)}">{cap}</figure>'


def _table(head: list[str], rows: list[list], left: int = 1) -> str:
    """Cells are HTML already (escaped by the caller); a cell may be a ('class', html) pair.
    The first `left` columns (names) are left-aligned, the rest (numbers) right-aligned."""

    def cell(i: int, c: Any, tag: str = "td") -> str:
        cls, c = c if isinstance(c, tuple) else ("", c)
        cls = " ".join(filter(None, [cls, "l" if i < left else ""]))
        return f'<{tag} class="{cls}">{c}</{tag}>' if cls else f"<{tag}>{c}</{tag}>"

    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return (
        "<table><thead><tr>"
        + "".join(cell(i, escape(h), "th") for i, h in enumerate(head))
        + f"</tr></thead><tbody>{body}</tbody></table>"
    )


def _section(title: str, parts: list[str]) -> str:
    """The section, or '' when all its parts are empty."""
    return f"<section><h2>{escape(title)}</h2>{''.join(parts)}</section>" if any(parts) else ""


def _facts(items: list[tuple[str, Any, str | None, str]]) -> str:
    """A <p> of (before, value, spec, after) facts, those whose value is None left out."""
    facts = [
        before + (f"<b>{_fmt(v, spec)}</b>" if spec else _text(v)) + after
        for before, v, spec, after in items
        if v is not None
    ]
    return f'<p class="facts">{" · ".join(facts)}</p>' if facts else ""


def _header(summary: dict, evaluation: dict) -> str:
    s, e = summary, evaluation
    tta = e["tta"] if isinstance(e.get("tta"), dict) else {}
    config = s["config"] if isinstance(s.get("config"), dict) else {}
    monitor = _text(s.get("monitor_set") or "monitor")
    run = _facts(
        [
            (f"final {monitor} accuracy ", s.get("final_monitor_acc"), "%", ""),
            ("", s.get("epochs"), "{:.0f}", " epoch" if s.get("epochs") == 1 else " epochs"),
            ("", s.get("total_s"), "{:.1f}", " s in all"),
            ("", s.get("img_per_s"), "{:,.0f}", " img/s"),
            ("best.pt: ", s.get("best_rule"), None, ""),
        ]
    )
    test = (
        _facts(
            [
                ("test accuracy ", e.get("accuracy"), "%", ""),
                ("on ", e.get("n_images"), "{:,.0f}", " images"),
                ("of ", e.get("data"), None, ""),
                ("loss ", e.get("loss"), "{:.4f}", ""),
                ("with flip TTA ", _dig(tta, "flip", "accuracy"), "%", ""),
                ("flip + shifts ", _dig(tta, "flip_translate", "accuracy"), "%", ""),
                ("ECE ", e.get("ece"), "%", ""),
                ("calibrated ECE ", e.get("ece_calibrated"), "%", ""),
                ("temperature ", e.get("temperature"), "{:.3f}", ""),
                ("checkpoint ", e.get("checkpoint"), None, ""),
            ]
        )
        if e.get("accuracy") is not None
        else ""
    )
    # `dataset` names what a run downloads: beside --data it was never used
    unused = {"dataset"} if config.get("data") else set()
    setup = ", ".join(f"{k}={v}" for k, v in config.items() if k not in unused)
    return (
        "<h1>cifar-cam report</h1>"
        + run
        + test
        + (f'<p class="facts muted">config: {_text(setup)}</p>' if setup else "")
    )


def _training(folder: Path, monitor: str) -> str:
    rows = _csv(folder / results.METRICS)
    cols = [
        ("epoch", "epoch", "{:.0f}"),
        ("train_loss", "train loss", "{:.4f}"),
        ("train_acc", "train acc", "%"),
        ("monitor_loss", f"{monitor} loss", "{:.4f}"),
        ("monitor_acc", f"{monitor} acc", "%"),
        ("lr", "lr", "{:.4g}"),
        ("epoch_s", "epoch s", "{:.1f}"),
        ("img_per_s", "img/s", "{:,.0f}"),
        ("score_s", f"{monitor} scoring s", "{:.1f}"),
    ]
    table = (
        _table([c[1] for c in cols], [[_fmt(r.get(k), spec) for k, _, spec in cols] for r in rows])
        if rows
        else ""
    )
    return _section("Training", [_figure(folder / results.CURVES, "Training curves"), table])


def _test_set(folder: Path, evaluation: dict) -> str:
    per_class = evaluation.get("per_class")
    never = "never predicted"  # evaluate.py's precision None: the model never predicted the class
    table = ""
    if isinstance(per_class, dict) and per_class:
        table = _table(
            ["class", "images", "accuracy", "precision", "recall"],
            [
                [
                    _text(name),
                    _fmt(m.get("images"), "{:,.0f}"),
                    _fmt(m.get("accuracy"), "%"),
                    never if "precision" in m and m["precision"] is None else _fmt(m.get("precision"), "%"),
                    _fmt(m.get("recall"), "%"),
                ]
                for name, m in per_class.items()
                if isinstance(m, dict)
            ],
        )
        if len(per_class) > 20:  # CIFAR-100's 100 rows scroll in their own box, beside the rest
            table = f'<div class="scroll">{table}</div>'
    ece = evaluation.get("ece")
    calibration = _figure(
        folder / results.CALIBRATION,
        "Calibration (reliability diagram)" + (f", ECE {_fmt(ece, '%')}" if ece is not None else ""),
    )
    return _section(
        "Test set",
        [table, _figure(folder / results.CONFUSION, "Confusion matrix (rows: true class)"), calibration],
    )


def _mistakes(folder: Path) -> str:
    cams = [_figure(p, p.name) for p in sorted(folder.glob(results.CAM_PICTURES))]
    return _section(
        "Mistakes", [_figure(folder / results.MISCLASSIFIED, "The most confident mistakes"), *cams]
    )


def _method_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], Any]]]) -> str:
    """A table with one row per (method, layer) and the given columns; '' when there are no rows."""
    if not rows:
        return ""
    body = [[_text(r.get("method")), _text(r.get("layer")), *(cell(r) for _, cell in columns)] for r in rows]
    return _table(["method", "layer", *(head for head, _ in columns)], body, left=2)


def _mean_se(row: dict, mean: str, se: str) -> str:
    return f"{_fmt(row.get(mean), '{:.4f}')} ± {_fmt(row.get(se), '{:.4f}')}"


def _faithfulness(explanations: dict) -> str:
    verdicts = {True: ("good", "beats RandomCAM"), False: ("bad", "does not beat RandomCAM")}
    explained = _method_table(
        _rows(explanations.get("faithfulness")),
        [
            ("n", lambda r: _fmt(r.get("n"), "{:.0f}")),
            ("ROAD mean ± SE", lambda r: _mean_se(r, "road_mean", "road_se")),
            ("RandomCAM mean ± SE", lambda r: _mean_se(r, "random_mean", "random_se")),
            ("verdict", lambda r: verdicts[bool(r.get("beats_random"))]),
        ],
    )
    sample = _rows(explanations.get("road_sample"))
    styles = {"beats RandomCAM": "good", "worse than RandomCAM": "bad"}
    sampled = _method_table(
        sample,
        [
            ("n", lambda r: _fmt(r.get("n"), "{:.0f}")),
            ("ROAD", lambda r: _fmt(r.get("road_mean"), "{:+.4f}")),
            ("RandomCAM", lambda r: _fmt(r.get("random_mean"), "{:+.4f}")),
            ("difference [95 % interval]", lambda r: f"{_fmt(r.get('diff_mean'), '{:+.4f}')} "
             f"[{_fmt(r.get('diff_low'), '{:+.4f}')}, {_fmt(r.get('diff_high'), '{:+.4f}')}]"),
            ("verdict", lambda r: (styles.get(str(r.get("verdict")), ""), _text(r.get("verdict")))),
        ],
    )  # fmt: skip
    return _section(
        "Faithfulness",
        [
            f"<h3>On {_fmt(sample[0].get('n'), '{:.0f}')} random test images</h3>{sampled}"
            if sampled
            else "",
            f"<h3>On the explained images</h3>{explained}" if explained else "",
            _note(explanations.get("note")),
        ],
    )


def _selfcheck(selfcheck: dict) -> str:
    table = _method_table(
        _rows(selfcheck.get("rows")),
        [
            ("hits", lambda r: _fmt(r.get("hits"), "{:.0f}")),
            ("n", lambda r: _fmt(r.get("n"), "{:.0f}")),
            ("hit rate", lambda r: _fmt(r.get("rate"), "%")),
            ("chance", lambda r: _fmt(r.get("chance"), "%")),
        ],
    )
    return _section(
        "Self-check (pointing game)",
        [
            _facts([("model accuracy ", selfcheck.get("model_accuracy"), "%", "")]),
            table,
            _note(selfcheck.get("note")),
        ],
    )


def write_report(folder: str | os.PathLike) -> Path:
    """(Re)build folder/report.html from the result files there; returns its path."""
    folder = Path(folder)
    maps = explorer(folder)
    summary, evaluation = _json(folder / results.SUMMARY), _json(folder / results.EVALUATION)
    monitor = str(summary.get("monitor_set") or "monitor")
    body = (
        _header(summary, evaluation)
        + _training(folder, monitor)
        + _test_set(folder, evaluation)
        + _mistakes(folder)
        + _section("Explore the maps", [maps])
        + _faithfulness(_json(folder / results.EXPLANATIONS))
        + _selfcheck(_json(folder / results.SELFCHECK))
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cifar-cam report</title><style>{CSS}{EXPLORER_CSS if maps else ''}</style></head>"
        f"<body><main>{body}</main>{f'<script>{SCRIPT}</script>' if maps else ''}</body></html>\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / results.REPORT
    with atomic_write(target, "w") as f:
        f.write(page)
    return target
