"""End-to-end test of nin-serve's web page (GET /) in headless Chromium.

Needs a running server: NIN_BASE_URL=http://127.0.0.1:PORT (.ci/web-test.sh
starts one). Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM), driven
by Python Playwright (no browser download). The model's answers are never
hard-coded: the page must show what the server's own JSON says for the same
bytes, so the test works with any weights file.

The tests share one page and run in file order, like a user's session (the
error test checks that the next good image clears the error, the last one
checks the whole session for uncaught errors).

    NIN_BASE_URL=http://127.0.0.1:8080 python -m pytest tests/web
"""

import io
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from playwright.sync_api import sync_playwright

from fashion_mnist import photo_like, png, slice_image

BASE = os.environ.get("NIN_BASE_URL", "").rstrip("/")
if not BASE:
    raise RuntimeError(
        "set NIN_BASE_URL to a running nin-serve, e.g. http://127.0.0.1:8080"
    )
CLASSIFY = "/classify?top_k=10&explain=true"

# Image 0 of the slice is an ankle boot, image 1 a pullover, image 2 a trouser.
BOOT = slice_image(0)
BOOT_PNG = png(BOOT)
PHOTO = photo_like(slice_image(1), 4, 19)  # 150x112, dark on white
PHOTO_PNG = png(PHOTO)
TROUSER_PNG = png(slice_image(2))

SHOTS = Path(tempfile.mkdtemp(prefix="nin-web-"))


@pytest.fixture(scope="module")
def page_errors():
    return []


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, page_errors):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.on("pageerror", lambda error: page_errors.append(f"uncaught: {error.message}"))

    def on_console(message):
        if message.type == "error" and re.search(r"Content.Security.Policy", message.text, re.I):
            page_errors.append(f"CSP: {message.text}")

    page.on("console", on_console)
    return page


def http(path, body=None, content_type=None):
    """(status, headers, body bytes) of a request to the server, not through the page."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(BASE + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:  # 4xx, 5xx: still an answer
        with error:
            return error.code, error.headers, error.read()


def server_answer(data, content_type):
    """The server's JSON for `data`, asked directly (not through the page)."""
    status, _, body = http(CLASSIFY, data, content_type)
    return status, json.loads(body)


def page_classifies(page, action):
    """Runs `action`, waits for the page's /classify call and its rendering;
    returns the Content-Type the page sent."""
    with page.expect_response(lambda r: "/classify" in r.url) as response:
        action()
    page.wait_for_function(
        "() => document.getElementById('result').getAttribute('aria-busy') === 'false'"
    )
    return response.value.request.headers["content-type"]


def percent(p):
    """The page's percent(): JavaScript's (100 * p).toFixed(1) + "%" (exact
    value of the double, ties away from zero)."""
    return f"{Decimal(100 * p).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def assert_shows(page, answer, width, height):
    """The page shows exactly `answer`, with a heatmap of `width` x `height`."""
    assert page.locator("#error").text_content() == ""
    assert page.locator("#result").is_visible(), "#result is visible"
    assert page.locator("#label").text_content() == answer["label"]
    assert page.locator("#confidence").text_content() == percent(answer["confidence"])

    bars = page.locator("#bars li").evaluate_all(
        """(items) => items.map((li) => ({
            id: Number(li.dataset.classId),
            p: Number(li.dataset.probability),
            text: li.textContent,
        }))"""
    )
    assert len(bars) == 10
    for before, after in zip(bars, bars[1:]):
        assert before["p"] >= after["p"], f"bars sorted: {before['p']} >= {after['p']}"
    assert [b["id"] for b in bars] == [c["class_id"] for c in answer["top_k"]]
    for bar, expected in zip(bars, answer["top_k"]):
        assert abs(bar["p"] - expected["probability"]) < 1e-5, f"{bar['p']} vs {expected['probability']}"
        assert bar["text"] == expected["label"] + percent(expected["probability"])

    page.wait_for_function(
        """() => {
            const h = document.getElementById("heatmap");
            return !h.hidden && h.complete && h.naturalWidth > 0;
        }"""
    )
    heatmap = page.locator("#heatmap").evaluate(
        "(h) => ({ width: h.naturalWidth, height: h.naturalHeight, visible: h.checkVisibility() })"
    )
    assert heatmap == {"width": width, "height": height, "visible": True}
    assert [answer["explanation"]["width"], answer["explanation"]["height"]] == [width, height]

    facts = page.locator("#facts").text_content()
    assert re.search(f"{width}×{height} px", facts)
    assert re.search("Invertedyes" if answer["preprocessing"]["inverted"] else "Invertedno", facts)


def choose(page, name, mime_type, data):
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime_type, "buffer": data}])


def test_get_root_serves_the_page_as_utf8_html_with_caching_and_a_strict_csp():
    status, headers, body = http("/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert re.search(r"max-age=\d+", headers["cache-control"])
    assert re.search(r"default-src 'none'", headers["content-security-policy"])
    html = body.decode("utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html, re.I), "no external resources"


def test_the_page_loads_with_its_title_heading_and_labelled_controls(page):
    response = page.goto(BASE + "/")
    assert response.status == 200
    assert re.search(r"nin.*Fashion-MNIST", page.title())
    assert re.search(r"Fashion-MNIST classifier", page.locator("h1").text_content())
    assert page.get_by_label(re.compile("choose a file", re.I)).get_attribute("id") == "file"
    assert page.get_by_label(re.compile("opacity", re.I)).get_attribute("id") == "opacity"
    assert page.locator("#result").get_attribute("aria-live") == "polite"
    assert page.locator("#error").get_attribute("role") == "alert"
    assert page.locator("#result").is_hidden(), "no result before an image"
    assert page.locator("#picture").is_hidden(), "no picture before an image"


def test_choosing_a_fashion_mnist_image_shows_the_servers_answer_and_its_activation_map(page):
    sent = page_classifies(page, lambda: choose(page, "ankle-boot.png", "image/png", BOOT_PNG))
    assert sent == "image/png"
    status, body = server_answer(BOOT_PNG, "image/png")
    assert status == 200
    assert_shows(page, body, 28, 28)
    preview = page.locator("#preview").evaluate("(i) => [i.naturalWidth, i.naturalHeight]")
    assert preview == [28, 28]
    assert page.locator("#filename").text_content() == "ankle-boot.png"
    page.screenshot(path=SHOTS / "boot.png", full_page=True)


def test_dropping_a_photo_like_picture_works_and_reports_the_inversion(page):
    """A dark-on-white 150x112 picture, dropped on the page."""

    def drop():
        data_transfer = page.evaluate_handle(
            """(bytes) => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], "pullover.png", { type: "image/png" }));
                return dt;
            }""",
            list(PHOTO_PNG),
        )
        page.dispatch_event("#drop", "drop", {"dataTransfer": data_transfer})

    sent = page_classifies(page, drop)
    assert sent == "image/png"
    _, body = server_answer(PHOTO_PNG, "image/png")
    assert body["preprocessing"]["inverted"] is True
    assert_shows(page, body, PHOTO.width, PHOTO.height)
    assert page.locator("#filename").text_content() == "pullover.png"
    assert page.locator("#file").input_value() == "", "the chooser no longer names the old file"

    # The activation map leaves the picture visible where there is no
    # activation: the white margins left and right of the garment, outside
    # the region the model looked at, still show white at the default
    # opacity (an opaque black map there made them dark grey, about 100).
    shot = Image.open(io.BytesIO(page.locator("#stage").screenshot())).convert("L")
    margin = shot.width * 19 // PHOTO.width - 2
    for left in (1, shot.width - margin - 1):
        strip = shot.crop((left, 1, left + margin, shot.height - 1))
        assert ImageStat.Stat(strip).mean[0] > 230, (left, ImageStat.Stat(strip).mean)

    # The opacity slider drives the overlay.
    page.locator("#opacity").fill("25")
    assert page.locator("#heatmap").evaluate("(h) => getComputedStyle(h).opacity") == "0.25"
    assert page.locator("#opacity-value").text_content() == "25%"
    page.locator("#opacity").fill("60")

    path = SHOTS / "photo.png"
    page.screenshot(path=path, full_page=True)
    print(f"screenshots: {SHOTS} (boot.png, photo.png, error.png); this one: {path}")


def test_pasting_an_image_classifies_it(page):
    page_classifies(
        page,
        lambda: page.evaluate(
            """(bytes) => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], "trouser.png", { type: "image/png" }));
                document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
            }""",
            list(TROUSER_PNG),
        ),
    )
    _, body = server_answer(TROUSER_PNG, "image/png")
    assert_shows(page, body, 28, 28)


def test_a_file_that_is_not_an_image_shows_the_servers_error_message(page):
    notes = b"these are notes, not a picture\n"
    sent = page_classifies(page, lambda: choose(page, "notes.txt", "text/plain", notes))
    status, body = server_answer(notes, sent)
    assert status == 400
    assert body["error"]["code"] == "invalid_image"
    page.wait_for_function("() => document.getElementById('error').textContent !== ''")
    assert page.locator("#error").text_content() == body["error"]["message"]
    assert page.locator("#result").is_hidden(), "no stale result next to an error"
    # The browser cannot show it either.
    page.wait_for_function("() => document.getElementById('picture').hidden")
    page.screenshot(path=SHOTS / "error.png", full_page=True)

    # The next good image clears the error.
    page_classifies(page, lambda: choose(page, "ankle-boot.png", "image/png", BOOT_PNG))
    _, good = server_answer(BOOT_PNG, "image/png")
    assert_shows(page, good, 28, 28)


def test_no_uncaught_errors_or_csp_violations_in_the_page(page_errors):
    assert page_errors == []
