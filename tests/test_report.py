"""common.report: the self-contained report.html, checked as text and in a real headless Chromium."""

from __future__ import annotations

import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
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
SECTIONS = [
    "Training",
    "Test set",
    "Mistakes",
    "Explore the maps",
    "Faithfulness",
    "Self-check (pointing game)",
]
MAPS = [("GradCAM", "layer2"), ("SESS", "layer4")]  # the explorer's maps: 2 methods x 3 targets x 3 images


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
                "road_sample": [
                    {
                        "method": "GradCAM",
                        "layer": "layer4",
                        "n": 200,
                        "road_mean": 0.12,
                        "random_mean": 0.03,
                        "diff_mean": 0.0912,
                        "diff_low": 0.0611,
                        "diff_high": 0.1213,
                        "verdict": "beats RandomCAM",
                    },
                    {
                        "method": "EigenCAM",
                        "layer": "layer3",
                        "n": 200,
                        "road_mean": 0.02,
                        "random_mean": 0.03,
                        "diff_mean": -0.0101,
                        "diff_low": -0.0302,
                        "diff_high": 0.0103,
                        "verdict": "no clear difference",
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
    for k, (method, layer) in enumerate(MAPS):
        _npz(tmp_path / f"cams_{method.lower()}_{layer}.npz", method, layer, seed=k)
    return tmp_path


def _npz(path: Path, method: str, layer: str, seed: int) -> None:
    """What explain.py writes for one method and layer: 3 pictures, their labels and maps."""
    rng = np.random.default_rng(seed)
    maps = {f"cam_{t}": rng.random((3, 32, 32), dtype=np.float32) for t in ("pred", "true", "contrast")}
    same = np.random.default_rng(9)  # the pictures and predictions: one set for every method
    probs = same.dirichlet(np.ones(10), size=3).astype(np.float32)
    images = same.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(path, method=method, layer=layer, classes=np.array([f"class{c}" for c in range(10)]),
             index=np.array([3, 14, 15]), true=np.array([1, 2, 3]), pred=probs.argmax(1),
             contrast_class=np.array([1, 2, 3]), probs=probs, images=images, **maps)  # fmt: skip


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
        "ECE <b>4.21%</b>",  # as evaluate.py prints it
        "ECE 4.21%",
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
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # the rows that do not beat RandomCAM are flagged, the others not
    flagged = [row for row in text.split("<tr>") if "does not beat RandomCAM" in row]
    assert len(flagged) == 1 and "EigenCAM" in flagged[0] and 'class="bad"' in flagged[0]
    assert "+0.0912 [+0.0611, +0.1213]" in text and "no clear difference" in text
    # pictures, all inline: six figures (gradcam*.png sorted by name, named in their captions),
    # and per explorer card the picture and its six maps
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == 6 + 3 * (1 + 2 * 3)
    assert all(img["src"].startswith("data:image/png;base64,") for img in images)
    assert [img["alt"] for img in images][4:6] == ["gradcam.png", "gradcam_layer3.png"]
    assert text.count('src="') == len(images) and "href" not in text and "url(" not in text
    # one inline script, the explorer's; nothing that loads anything
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert scripts == [{}]
    assert not [tag for tag, _ in page.tags if tag in {"link", "iframe", "object"}]
    assert sorted(p.name for p in full_run.iterdir() if "report" in p.name) == ["report.html"]


def test_empty_folder_gives_a_valid_page(tmp_path: Path):
    text = write_report(str(tmp_path)).read_text(encoding="utf-8")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>") and not page.mismatched and not page.stack
    assert "cifar-cam report" in text and page.h2 == [] and "<img" not in text
    assert os.listdir(tmp_path) == ["report.html"]


@pytest.mark.parametrize("epochs, says", [(1, "<b>1</b> epoch ·"), (2, "<b>2</b> epochs ·")])
def test_header_counts_epochs_in_words(tmp_path: Path, epochs: int, says: str):
    (tmp_path / "summary.json").write_text(json.dumps({"epochs": epochs, "total_s": 1.0}))
    assert says in write_report(str(tmp_path)).read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "data, shows",
    [(None, "data=None, dataset=cifar100"), ("cifar10-jpg", "data=cifar10-jpg, lr")],
)
def test_config_line_names_the_dataset_only_for_a_download(tmp_path: Path, data: str | None, shows: str):
    """With --data the config's `dataset` (what a run would download) was never used."""
    config = {"data": data, "dataset": "cifar100", "lr": 0.2}
    (tmp_path / "summary.json").write_text(json.dumps({"epochs": 1, "config": config}))
    assert shows in write_report(str(tmp_path)).read_text(encoding="utf-8")


@pytest.mark.parametrize("classes, scrolls", [(20, False), (100, True)])
def test_a_long_per_class_table_scrolls_in_its_own_box(tmp_path: Path, classes: int, scrolls: bool):
    """CIFAR-100's 100 rows would push the confusion matrix and the rest pages down."""
    row = {"images": 100, "accuracy": 0.5, "precision": 0.5, "recall": 0.5}
    per_class = {f"class {i}": row for i in range(classes)}
    (tmp_path / "evaluation.json").write_text(json.dumps({"accuracy": 0.5, "per_class": per_class}))
    text = write_report(str(tmp_path)).read_text(encoding="utf-8")
    assert text.count("<tr>") >= classes and ('<div class="scroll"><table>' in text) == scrolls


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


@pytest.fixture
def browser(tmp_path_factory):
    """`browser(url)`: a real headless Chromium page at url, with every console error, page
    error and request recorded (page.errors, page.requests)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        # Generous limits: a cold first start in a fresh CI container once took over 15 s.
        try:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_FLAGS, timeout=120_000, viewport={"width": 1200, "height": 900},
            )  # fmt: skip
        except sync_api.Error as error:  # the browser, not the report: say so and skip
            pytest.skip(f"{CHROMIUM} did not start: {str(error).splitlines()[0]}")
        context.set_default_timeout(60_000)

        def open_page(url: str):
            page = context.new_page()
            page.errors, page.requests = [], []
            page.on("console", lambda m: m.type == "error" and page.errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: page.errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: page.errors.append(f"request failed: {r.url}"))
            page.on("request", lambda r: page.requests.append(r.url))
            page.goto(url, wait_until="load")
            return page

        try:
            yield open_page
        finally:
            context.close()


def test_report_renders_in_headless_chromium(full_run: Path, browser):
    """Real browser: no console or page errors, no request for anything, every picture decoded."""
    url = write_report(full_run).as_uri()
    page = browser(url)
    decoded = page.evaluate("""() => Promise.all(Array.from(document.images).map(img =>
        img.decode().then(() => [img.alt, img.complete, img.naturalWidth],
                          () => [img.alt, false, 0])))""")
    assert page.errors == []
    assert [u for u in page.requests if not u.startswith("data:")] == [url]
    assert page.locator("h2").all_inner_texts() == SECTIONS
    assert all(complete and width > 0 for _, complete, width in decoded), decoded
    assert len(decoded) == 6 + 3 * (1 + 2 * 3)


SHOWN = """card => { const m = card.querySelector('img.map:not([hidden])');
                     return [m.dataset.key, m.src, getComputedStyle(m).opacity]; }"""


def test_explorer_switches_maps_and_opacity(full_run: Path, browser):
    """Clicking a card's buttons shows another map over the picture; the slider sets the
    overlay's opacity (0.5 to start, as explain.py's pictures)."""
    page = browser(write_report(full_run).as_uri())
    card = page.locator(".card").first
    key, src, opacity = card.evaluate(SHOWN)
    assert key == "GradCAM layer2|pred" and opacity == "0.5"
    card.locator('button[data-value="contrast"]').click()  # why the predicted class, not the true one
    contrast = card.evaluate(SHOWN)
    assert contrast[0] == "GradCAM layer2|contrast" and contrast[1] != src
    card.locator('button[data-value="SESS layer4"]').click()
    assert card.evaluate(SHOWN)[0] == "SESS layer4|contrast"
    assert page.locator(".card").nth(1).evaluate(SHOWN)[0] == "GradCAM layer2|pred"  # other cards unchanged
    page.locator('.explorer-controls button[data-value="true"]').click()  # every card at once
    assert {c.evaluate(SHOWN)[0] for c in page.locator(".card").all()} == {
        "SESS layer4|true", "GradCAM layer2|true"}  # fmt: skip
    page.locator("#opacity").fill("0.3")
    assert card.evaluate(SHOWN)[2] == "0.3" and page.locator("#opacity-value").inner_text() == "30 %"
    assert page.errors == []


PRESSED = """card => { const m = card.querySelector('img.map:not([hidden])');
    const pressed = Array.from(card.querySelectorAll('button[aria-pressed=true]'), b => b.dataset.value);
    const buttons = Array.from(card.querySelectorAll('button'), b => b.dataset.value);
    return [m.dataset.key, pressed, buttons]; }"""


def test_every_card_shows_the_map_its_pressed_buttons_name(full_run: Path, browser):
    """The user's pictures have no true class and one method: choosing, for every card, a method
    or target a card lacks shows that card the nearest map it has, with its buttons saying which;
    the 'every card' row offers only targets some card has."""
    _npz(full_run / "user_cams.npz", "GradCAM", "layer2", seed=5)
    with np.load(full_run / "user_cams.npz") as npz:
        arrays = {**npz, "true": np.full(3, -1), "cam_true": np.full((3, 32, 32), np.nan, np.float32)}
    np.savez(full_run / "user_cams.npz", **arrays)
    page = browser(write_report(full_run).as_uri())
    for value in ["SESS layer4", "true", "contrast"]:
        page.locator(f'.explorer-controls button[data-value="{value}"]').click()
        for card in page.locator(".card").all():
            key, pressed, buttons = card.evaluate(PRESSED)
            assert sorted(pressed) == sorted(v for v in key.split("|") if v in buttons), (key, pressed)
    shown = [c.evaluate(PRESSED)[0] for c in page.locator(".card").all()]
    assert shown == ["SESS layer4|contrast"] * 3 + ["GradCAM layer2|contrast"] * 3
    only_pictures = full_run / "pictures"
    only_pictures.mkdir()
    (full_run / "user_cams.npz").rename(only_pictures / "user_cams.npz")
    controls = browser(write_report(only_pictures).as_uri()).locator(".explorer-controls button")
    assert controls.evaluate_all("bs => bs.map(b => b.dataset.value)") == [
        "GradCAM layer2",
        "pred",
        "contrast",
    ]


def test_a_class_never_predicted_shows_so_not_a_precision(tmp_path: Path):
    rows = {"cat": {"images": 2, "accuracy": 1.0, "precision": 0.5, "recall": 1.0}}
    rows["frog"] = {"images": 2, "accuracy": 0.0, "precision": None, "recall": 0.0}
    (tmp_path / "evaluation.json").write_text(json.dumps({"accuracy": 0.5, "per_class": rows}))
    text = write_report(str(tmp_path)).read_text(encoding="utf-8")
    assert "<td>50.00%</td>" in text and "<td>never predicted</td>" in text
