"""common.report: the self-contained report.html, checked as text and in a real headless Chromium."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from common.report import write_report

CHROMIUM = "/usr/bin/chromium"
# Flags this machine's Chromium needs: without the background-networking ones the closed
# network refuses connections and the browser stalls.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECTIONS = ["Training", "Test set", "Mistakes", "Faithfulness", "Self-check (pointing game)"]


class Page(HTMLParser):
    """Tags, attributes and headings of a page, and whether its tags nest properly."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.h2: list[str] = []
        self.stack: list[str] = []
        self.mismatched: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.mismatched.append(tag)

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "h2":
            self.h2.append(data)


def _png(path: Path, colour: str, size: tuple[float, float] = (2, 1.5)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.plot([0, 1, 2], [0, 1, 0.5], color=colour)
    ax.set_title(path.stem, fontsize=8)
    fig.savefig(path, dpi=60)
    plt.close(fig)


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    """A run folder with every result file the report knows, small but real."""
    for name, colour in [
        ("curves", "C0"),
        ("confusion_matrix", "C1"),
        ("calibration", "C2"),
        ("misclassified", "C3"),
        ("gradcam", "C4"),
        ("gradcam_layer3", "C5"),
    ]:
        _png(tmp_path / f"{name}.png", colour)
    (tmp_path / "metrics.csv").write_text(
        "epoch,train_loss,train_acc,monitor_loss,monitor_acc,lr,epoch_s,img_per_s\n"
        "1,1.9,0.31,1.6,0.4123,0.1,12.5,4000\n"
        "2,1.2,0.58,1.1,0.6234,0.05,11.9,4200\n"
    )
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "final_monitor_acc": 0.6234,
                "monitor_set": "test",
                "best_rule": "final weights",
                "epochs": 2,
                "total_s": 30.2,
                "img_per_s": 4100.0,
                "config": {"epochs": 2, "batch_size": 512, "note": "<b>not bold</b>"},
            }
        )
    )
    (tmp_path / "evaluation.json").write_text(
        json.dumps(
            {
                "checkpoint": "runs/x/best.pt",
                "accuracy": 0.6234,
                "loss": 1.1,
                "n_images": 200,
                "tta": {
                    "flip": {"accuracy": 0.6311, "loss": 1.05},
                    "flip_translate": {"accuracy": 0.6402, "loss": 1.0},
                },
                "ece": 0.0421,
                "per_class": {
                    "cat": {"images": 100, "accuracy": 0.5, "precision": 0.55, "recall": 0.5},
                    "dog & co": {"images": 100, "accuracy": 0.75, "precision": 0.7, "recall": 0.75},
                },
            }
        )
    )
    (tmp_path / "explanations.json").write_text(
        json.dumps(
            {
                "faithfulness": [
                    {
                        "method": "GradCAM",
                        "layer": "layer4",
                        "n": 64,
                        "road_mean": 0.21,
                        "road_se": 0.02,
                        "random_mean": 0.05,
                        "random_se": 0.01,
                        "beats_random": True,
                    },
                    {
                        "method": "EigenCAM",
                        "layer": "layer3",
                        "n": 64,
                        "road_mean": 0.04,
                        "road_se": 0.02,
                        "random_mean": 0.05,
                        "random_se": 0.01,
                        "beats_random": False,
                    },
                ],
                "note": "ROAD <script>alert(1)</script> note",
            }
        )
    )
    (tmp_path / "selfcheck.json").write_text(
        json.dumps(
            {
                "rows": [
                    {"method": "GradCAM", "layer": "layer4", "hits": 40, "n": 50, "rate": 0.8, "chance": 0.25}
                ],
                "model_accuracy": 0.97,
                "note": "pasted patches",
            }
        )
    )
    return tmp_path


def test_full_report_has_every_section_and_nothing_external(full_run: Path):
    path = write_report(full_run)
    assert path == full_run / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert not page.mismatched and not page.stack
    assert page.h2 == SECTIONS
    assert "<h1>cifar-cam report</h1>" in text
    # key facts, percentages, escaping
    for fact in [
        "62.34%",
        "63.11%",
        "64.02%",
        "0.0421",
        "runs/x/best.pt",
        "41.23%",
        "dog &amp; co",
        "97.00%",
        "80.00%",
        "25.00%",
        "pasted patches",
        "&lt;b&gt;not bold&lt;/b&gt;",
    ]:
        assert fact in text, fact
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # the row that does not beat RandomCAM is flagged, the other not
    flagged = [row for row in text.split("<tr>") if "does not beat RandomCAM" in row]
    assert len(flagged) == 1 and "EigenCAM" in flagged[0] and 'class="bad"' in flagged[0]
    # pictures: all six, inline; gradcam*.png sorted by name with their names as captions
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 6
    assert all(img["src"].startswith("data:image/png;base64,") for img in images)
    assert [img["alt"] for img in images][-2:] == ["gradcam.png", "gradcam_layer3.png"]
    assert text.count('src="') == 6 and "href" not in text and "url(" not in text
    assert not [tag for tag, _ in page.tags if tag in {"script", "link", "iframe", "object"}]
    assert sorted(p.name for p in full_run.iterdir() if "report" in p.name) == ["report.html"]


def test_empty_folder_gives_a_valid_page(tmp_path: Path):
    text = write_report(str(tmp_path)).read_text(encoding="utf-8")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>") and not page.mismatched and not page.stack
    assert "cifar-cam report" in text and page.h2 == [] and "<img" not in text
    assert os.listdir(tmp_path) == ["report.html"]


def test_broken_files_leave_their_sections_out(full_run: Path):
    (full_run / "evaluation.json").write_text('{"accuracy": 0.5, "per_cl')  # cut off mid-write
    (full_run / "summary.json").write_text("[1, 2]")  # not an object
    (full_run / "explanations.json").write_text(json.dumps({"faithfulness": "oops", "note": 3}))
    (full_run / "selfcheck.json").write_text(json.dumps({"rows": [{"method": None}, 7]}))
    (full_run / "metrics.csv").write_text("epoch,train_loss\n1,abc\n2\n")
    png = (full_run / "calibration.png").read_bytes()
    (full_run / "calibration.png").write_bytes(png[: len(png) // 2])  # partial PNG
    (full_run / "confusion_matrix.png").write_bytes(b"not a png")
    text = write_report(full_run).read_text(encoding="utf-8")
    page = Page(text)
    assert not page.mismatched and page.h2 == [s for s in SECTIONS if s != "Test set"]
    assert "<img" in text and "confusion_matrix.png" not in text and "calibration.png" not in text
    assert "None" not in text


def test_report_renders_in_headless_chromium(full_run: Path, tmp_path_factory):
    """Real browser: no console or page errors, no request for anything, every picture decoded."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    url = write_report(full_run).as_uri()
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            timeout=15_000,
            viewport={"width": 1200, "height": 900},
        )
        try:
            context.set_default_timeout(10_000)
            page = context.new_page()
            page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            decoded = page.evaluate("""() => Promise.all(Array.from(document.images).map(img =>
                img.decode().then(() => [img.alt, img.complete, img.naturalWidth],
                                  () => [img.alt, false, 0])))""")
            headings = page.locator("h2").all_inner_texts()
        finally:
            context.close()
    assert errors == []
    assert [u for u in requests if not u.startswith("data:")] == [url]
    assert headings == SECTIONS
    assert all(complete and width > 0 for _, complete, width in decoded), decoded
    assert len(decoded) == 6
