// End-to-end test of nin-serve's web page (GET /) in headless Chromium.
//
// Needs a running server: NIN_BASE_URL=http://127.0.0.1:PORT (.ci/web-test.sh
// starts one). Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM),
// driven by playwright-core. The model's answers are never hard-coded: the
// page must show what the server's own JSON says for the same bytes, so the
// test works with any weights file.
//
//   NIN_BASE_URL=http://127.0.0.1:8080 node --test tests/web/page.test.mjs

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { testImage, photoLike, png } from "./fashion-mnist.mjs";

const BASE = process.env.NIN_BASE_URL;
if (!BASE) throw new Error("set NIN_BASE_URL to a running nin-serve, e.g. http://127.0.0.1:8080");
const CLASSIFY = "/classify?top_k=10&explain=true";

// Image 0 of the slice is an ankle boot, image 1 a pullover, image 2 a trouser.
const boot = testImage(0);
const bootPng = png(boot);
const photo = photoLike(testImage(1), 4, 19); // 150x112, dark on white
const photoPng = png(photo);
const trouserPng = png(testImage(2));

const shots = mkdtempSync(join(tmpdir(), "nin-web-"));
let browser;
let page;
const pageErrors = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
  page.on("pageerror", (error) => pageErrors.push(`uncaught: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" && /Content.Security.Policy/i.test(message.text())) {
      pageErrors.push(`CSP: ${message.text()}`);
    }
  });
});

after(async () => {
  await browser?.close();
});

/** The server's JSON for `bytes`, asked directly (not through the page). */
async function serverAnswer(bytes, contentType) {
  const response = await fetch(BASE + CLASSIFY, {
    method: "POST", headers: { "Content-Type": contentType }, body: bytes,
  });
  return { status: response.status, body: await response.json() };
}

/** Runs `action`, waits for the page's /classify call and its rendering. */
async function pageClassifies(action) {
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().includes("/classify")),
    action(),
  ]);
  await page.waitForFunction(() => document.getElementById("result").getAttribute("aria-busy") === "false");
  return response.request().headers()["content-type"];
}

const percent = (p) => (100 * p).toFixed(1) + "%";

/** The page shows exactly `answer`, with a heatmap of `width` x `height`. */
async function assertShows(answer, width, height) {
  assert.equal(await page.locator("#error").textContent(), "");
  assert.ok(await page.locator("#result").isVisible(), "#result is visible");
  assert.equal(await page.locator("#label").textContent(), answer.label);
  assert.equal(await page.locator("#confidence").textContent(), percent(answer.confidence));

  const bars = await page.locator("#bars li").evaluateAll((items) => items.map((li) => ({
    id: Number(li.dataset.classId),
    p: Number(li.dataset.probability),
    text: li.textContent,
  })));
  assert.equal(bars.length, 10);
  for (let i = 1; i < bars.length; i++) {
    assert.ok(bars[i - 1].p >= bars[i].p, `bars sorted: ${bars[i - 1].p} >= ${bars[i].p}`);
  }
  assert.deepEqual(bars.map((b) => b.id), answer.top_k.map((c) => c.class_id));
  bars.forEach((bar, i) => {
    const expected = answer.top_k[i];
    assert.ok(Math.abs(bar.p - expected.probability) < 1e-5, `${bar.p} vs ${expected.probability}`);
    assert.equal(bar.text, expected.label + percent(expected.probability));
  });

  await page.waitForFunction(() => {
    const h = document.getElementById("heatmap");
    return !h.hidden && h.complete && h.naturalWidth > 0;
  });
  const heatmap = await page.locator("#heatmap").evaluate((h) => ({
    width: h.naturalWidth, height: h.naturalHeight, visible: h.checkVisibility(),
  }));
  assert.deepEqual(heatmap, { width, height, visible: true });
  assert.deepEqual([answer.explanation.width, answer.explanation.height], [width, height]);

  const facts = await page.locator("#facts").textContent();
  assert.match(facts, new RegExp(`${width}×${height} px`));
  assert.match(facts, answer.preprocessing.inverted ? /Invertedyes/ : /Invertedno/);
}

test("GET / serves the page as UTF-8 HTML with caching and a strict CSP", async () => {
  const response = await fetch(BASE + "/");
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "text/html; charset=utf-8");
  assert.match(response.headers.get("cache-control"), /max-age=\d+/);
  assert.match(response.headers.get("content-security-policy"), /default-src 'none'/);
  const html = await response.text();
  assert.doesNotMatch(html, /(src|href)=["']?(https?:)?\/\//i, "no external resources");
});

test("the page loads with its title, heading and labelled controls", async () => {
  const response = await page.goto(BASE + "/");
  assert.equal(response.status(), 200);
  assert.match(await page.title(), /nin.*Fashion-MNIST/);
  assert.match(await page.locator("h1").textContent(), /Fashion-MNIST classifier/);
  assert.equal(await page.getByLabel(/choose a file/i).getAttribute("id"), "file");
  assert.equal(await page.getByLabel(/opacity/i).getAttribute("id"), "opacity");
  assert.equal(await page.locator("#result").getAttribute("aria-live"), "polite");
  assert.equal(await page.locator("#error").getAttribute("role"), "alert");
  assert.ok(await page.locator("#result").isHidden(), "no result before an image");
  assert.ok(await page.locator("#picture").isHidden(), "no picture before an image");
});

test("choosing a Fashion-MNIST image shows the server's answer and its activation map", async () => {
  const sent = await pageClassifies(() =>
    page.setInputFiles("#file", { name: "ankle-boot.png", mimeType: "image/png", buffer: bootPng }));
  assert.equal(sent, "image/png");
  const { status, body } = await serverAnswer(bootPng, "image/png");
  assert.equal(status, 200);
  await assertShows(body, 28, 28);
  const preview = await page.locator("#preview").evaluate((i) => [i.naturalWidth, i.naturalHeight]);
  assert.deepEqual(preview, [28, 28]);
  assert.equal(await page.locator("#filename").textContent(), "ankle-boot.png");
  await page.screenshot({ path: join(shots, "boot.png"), fullPage: true });
});

test("dropping a photo-like picture (dark on white, 150x112) works and reports the inversion", async () => {
  const sent = await pageClassifies(async () => {
    const dataTransfer = await page.evaluateHandle((bytes) => {
      const dt = new DataTransfer();
      dt.items.add(new File([new Uint8Array(bytes)], "pullover.png", { type: "image/png" }));
      return dt;
    }, [...photoPng]);
    await page.dispatchEvent("#drop", "drop", { dataTransfer });
  });
  assert.equal(sent, "image/png");
  const { body } = await serverAnswer(photoPng, "image/png");
  assert.equal(body.preprocessing.inverted, true);
  await assertShows(body, photo.width, photo.height);
  assert.equal(await page.locator("#filename").textContent(), "pullover.png");
  assert.equal(await page.locator("#file").inputValue(), "", "the chooser no longer names the old file");

  // The opacity slider drives the overlay.
  await page.locator("#opacity").fill("25");
  assert.equal(await page.locator("#heatmap").evaluate((h) => getComputedStyle(h).opacity), "0.25");
  assert.equal(await page.locator("#opacity-value").textContent(), "25%");
  await page.locator("#opacity").fill("60");

  const path = join(shots, "photo.png");
  await page.screenshot({ path, fullPage: true });
  console.log(`screenshots: ${shots} (boot.png, photo.png, error.png); this one: ${path}`);
});

test("pasting an image classifies it", async () => {
  await pageClassifies(() => page.evaluate((bytes) => {
    const dt = new DataTransfer();
    dt.items.add(new File([new Uint8Array(bytes)], "trouser.png", { type: "image/png" }));
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
  }, [...trouserPng]));
  const { body } = await serverAnswer(trouserPng, "image/png");
  await assertShows(body, 28, 28);
});

test("a file that is not an image shows the server's error message", async () => {
  const notes = Buffer.from("these are notes, not a picture\n");
  const sent = await pageClassifies(() =>
    page.setInputFiles("#file", { name: "notes.txt", mimeType: "text/plain", buffer: notes }));
  const { status, body } = await serverAnswer(notes, sent);
  assert.equal(status, 400);
  assert.equal(body.error.code, "invalid_image");
  await page.waitForFunction(() => document.getElementById("error").textContent !== "");
  assert.equal(await page.locator("#error").textContent(), body.error.message);
  assert.ok(await page.locator("#result").isHidden(), "no stale result next to an error");
  await page.waitForFunction(() => document.getElementById("picture").hidden); // the browser cannot show it either
  await page.screenshot({ path: join(shots, "error.png"), fullPage: true });

  // The next good image clears the error.
  await pageClassifies(() =>
    page.setInputFiles("#file", { name: "ankle-boot.png", mimeType: "image/png", buffer: bootPng }));
  const { body: good } = await serverAnswer(bootPng, "image/png");
  await assertShows(good, 28, 28);
});

test("no uncaught errors or CSP violations in the page", () => {
  assert.deepEqual(pageErrors, []);
});
