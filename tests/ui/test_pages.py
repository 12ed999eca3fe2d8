"""The web UI end to end: real Chromium, real gateway, real analysed SAEs and heads (see conftest.py).

Each page loads without console errors; clicking and dragging patches changes the listed latents; moving a slider
changes the prediction shown; an upload works; names holding HTML show as text; the key prompt works. Screenshots
of every page go to test-artifacts/ui/.
"""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from .conftest import HTML_CLASS, OPEN_PREFIX, png

WAIT_MS = 120_000
"""Generous: the machine running the suite is shared and slow; the first request of a kind loads models."""
expect.set_options(timeout=WAIT_MS)


class UI:
    """One browser tab on the UI with the API key already given, recording console errors."""

    def __init__(self, browser, stack, key: str | None):
        self.stack = stack
        self.context = browser.new_context(viewport={"width": 1300, "height": 950})
        self.context.set_default_timeout(WAIT_MS)
        if key:
            self.context.add_init_script(f"sessionStorage.setItem('saev.apiKey', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page: {e}"))

    def open(self, route: str) -> None:
        self.page.goto(f"{self.stack.url}/ui/#/{route}")
        self.page.wait_for_selector("body[data-ready='1']")

    def pick_dataset_image(self, n: int = 0) -> None:
        self.page.locator("#dataset-images button").nth(n).click()
        expect(self.page.locator("#image-name")).to_contain_text("dataset image")

    def latents(self, where: str = "#explorer-latents") -> list[str]:
        items = self.page.locator(f"{where} li[data-latent]")
        expect(items.first).to_be_visible()
        return items.evaluate_all("els => els.map(e => e.dataset.latent)")

    def no_script_ran(self) -> None:
        assert self.page.evaluate("window.__xss") is None, "a name was rendered as HTML"


@pytest.fixture
def ui(browser, ui_stack):
    tab = UI(browser, ui_stack, ui_stack.api_key)
    yield tab
    tab.context.close()


def test_every_page_loads_without_console_errors(ui, ui_stack, shot):
    page = ui.page
    ui.open("latents")
    rows = page.locator("#latent-table tbody tr")
    expect(rows.first).to_be_visible()
    freqs = [float(t.split()[-1]) for t in page.locator("#latent-table tbody td:nth-child(2)").all_inner_texts()]
    assert freqs == sorted(freqs, reverse=True) and len(freqs) >= 10
    page.locator("#latent-table tbody img").first.evaluate("img => img.complete || new Promise(r => img.onload = r)")
    shot(page, "features")

    # filters: a mean-value floor and a frequency ceiling, applied through the form
    page.fill("input[name=minm]", "0.6")
    page.fill("input[name=maxf]", "0.25")
    page.click("#latent-filters button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")
    expect(page.locator("#latent-summary")).to_contain_text("mean-value filter")
    means = [float(t) for t in page.locator("#latent-table tbody td:nth-child(3)").all_inner_texts()]
    freqs = [float(t.split()[-1]) for t in page.locator("#latent-table tbody td:nth-child(2)").all_inner_texts()]
    assert means and min(means) >= 0.6 and max(freqs) <= 0.25

    latent = page.locator("#latent-table tbody tr").first.get_attribute("data-latent")
    page.locator("#latent-table tbody tr").first.locator("a").first.click()
    page.wait_for_selector("body[data-ready='1']")
    expect(page.locator("#latent-stats")).to_contain_text("Max value")
    expect(page.locator("#latent-histogram canvas")).to_be_visible()
    tiles = page.locator("#exemplar-grid img")
    expect(tiles.first).to_be_visible()
    assert tiles.count() >= 2
    widths = [tiles.nth(i).evaluate("img => img.decode().then(() => img.naturalWidth)") for i in range(tiles.count())]
    assert min(widths) > 0
    # the exemplars' image ids hold the HTML class name: shown as text
    expect(page.locator("#exemplar-grid")).to_contain_text(HTML_CLASS)
    assert page.locator("#exemplar-grid img[src='x']").count() == 0
    assert f"Latent #{latent}" in page.locator("h1").inner_text()
    shot(page, "latent")

    # an exemplar opens in the explorer
    first = page.locator("#exemplar-grid figure").first
    image_id = first.locator("figcaption").inner_text().split(" · ")[0]
    first.get_by_role("button", name="Explore this image").click()
    expect(page.locator("#explorer-latents")).to_be_visible()
    expect(page.locator("#image-name")).to_contain_text(f"Image: {image_id} (dataset image")
    expect(page.locator("#dataset-images button.on")).to_have_count(1)
    ui.latents()
    shot(page, "explorer")
    ui.open("compare")
    ui.pick_dataset_image(1)
    a, b = ui.latents("#compare-a"), ui.latents("#compare-b")
    assert a and b and a != b  # two SAEs, two sets of latents
    shot(page, "compare")
    ui.no_script_ran()
    assert ui.errors == []


def test_clicking_and_dragging_patches_changes_the_listed_latents(ui):
    page = ui.page
    ui.open("explore")
    ui.pick_dataset_image(2)
    everywhere = ui.latents()
    canvas = page.locator("#page .patch-canvas.selectable")
    box = canvas.bounding_box()
    cell = box["width"] / 16

    def listed_after(action) -> list[str]:
        before = ui.latents()
        action()
        page.wait_for_function("prev => { const ids = [...document.querySelectorAll("
                               "'#explorer-latents li[data-latent]')].map(e => e.dataset.latent).join(',');"
                               " return ids && ids !== prev; }", arg=",".join(before))
        return ui.latents()

    one = listed_after(lambda: page.mouse.click(box["x"] + 0.5 * cell, box["y"] + 0.5 * cell))
    expect(page.locator(".selection-summary")).to_have_text("1 patch selected")
    assert one != everywhere

    def drag():
        page.mouse.move(box["x"] + 8.5 * cell, box["y"] + 8.5 * cell)
        page.mouse.down()
        page.mouse.move(box["x"] + 10 * cell, box["y"] + 10 * cell, steps=4)
        page.mouse.move(box["x"] + 11.5 * cell, box["y"] + 11.5 * cell, steps=4)
        page.mouse.up()

    boxed = listed_after(drag)
    expect(page.locator(".selection-summary")).to_have_text("16 patches selected")
    assert boxed != one
    # a latent's heatmap is drawn over the image when it is chosen
    page.locator("#explorer-latents li[data-latent]").first.click()
    expect(page.locator("#explorer-latents li.on")).to_have_count(1)
    assert ui.errors == []


def _after_probs(page) -> list[str]:
    return page.locator("#class-probs .after-prob").all_inner_texts()


def test_moving_a_slider_changes_the_prediction_shown(ui, ui_stack, shot):
    page = ui.page
    ui.open("playground")
    # the probe is not loaded yet, so not listed: give its id; once used, it is listed with its class names
    page.select_option("#head-select", label="another head id…")
    page.fill("#head-id", ui_stack.probe_id)
    page.press("#head-id", "Enter")
    ui.pick_dataset_image(5)  # a cat
    expect(page.locator("#class-probs")).to_be_visible()
    expect(page.locator("#head-select")).to_have_value(ui_stack.probe_id)
    page.locator("#add-strongest").click()
    sliders = page.locator("#edits input[type=range]")
    expect(sliders).to_have_count(3)
    expect(page.locator("#class-probs")).to_contain_text(HTML_CLASS)
    expect(page.locator("#drift-relative")).to_be_visible()  # the edits' result (drift comes after it)
    page.wait_for_selector("#intervention-results[aria-busy='false']")
    before = _after_probs(page)
    # both class names show as text, the HTML one included
    names = page.locator("#class-probs .class-name").all_inner_texts()
    assert sorted(names) == sorted(["cat", HTML_CLASS])
    for i in range(3):
        sliders.nth(i).fill("4")  # amplify every latent to 4x its maximum
    page.wait_for_function("prev => { const r = document.getElementById('intervention-results');"
                           " const now = [...document.querySelectorAll('#class-probs .after-prob')]"
                           ".map(e => e.textContent);"
                           " return r.getAttribute('aria-busy') === 'false' && now.join() !== prev; }",
                           arg=",".join(before))
    after = _after_probs(page)
    assert after != before
    expect(page.locator("#edits .value-label").first).to_have_text("amplify (4× max)")
    expect(page.locator("#drift-relative")).to_be_visible()
    assert float(page.locator("#drift-relative").inner_text()) > 0
    shot(page, "playground-probe")

    # the saliency head: maps before and after, side by side
    page.select_option("#head-select", ui_stack.saliency_id)
    expect(page.locator("#intervention-results figure canvas")).to_have_count(3)
    expect(page.locator("#prediction")).to_contain_text("Patches whose label changed")
    page.wait_for_selector("#intervention-results[aria-busy='false']")
    shot(page, "playground-saliency")
    ui.no_script_ran()
    assert ui.errors == []


def test_an_uploaded_image_is_explored_and_its_name_shows_as_text(ui, ui_stack, shot):
    import numpy as np

    page = ui.page
    ui.open("explore")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    pixels[:, 60:] = (250, 40, 40)
    name = "<img src=x onerror=window.__xss=2>.png"
    page.set_input_files("#upload", {"name": name, "mimeType": "image/png", "buffer": png(pixels)})
    expect(page.locator("#image-name")).to_have_text(f"Image: {name} (uploaded)")
    uploaded = ui.latents()
    assert uploaded
    shot(page, "explorer-upload")
    ui.pick_dataset_image(0)
    page.wait_for_function("prev => [...document.querySelectorAll('#explorer-latents li[data-latent]')]"
                           ".map(e => e.dataset.latent).join() !== prev", arg=",".join(uploaded))
    ui.no_script_ran()
    assert ui.errors == []


def test_the_page_asks_for_the_key_once_and_keeps_it(browser, ui_stack, shot):
    tab = UI(browser, ui_stack, key=None)
    try:
        page = tab.page
        page.goto(f"{ui_stack.url}/ui/")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        shot(page, "key-prompt")
        dialog.locator("input").fill("wrong-key")
        dialog.locator("button").click()
        expect(dialog.locator(".key-note")).to_contain_text("refused")
        dialog.locator("input").fill(ui_stack.api_key)
        dialog.locator("button").click()
        expect(page.locator("#latent-table tbody tr").first).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('saev.apiKey')") == ui_stack.api_key
        src = page.locator("#latent-table tbody img").first.get_attribute("src")
        assert src.endswith(f"key={ui_stack.api_key}")
        # another page of the same tab asks no more
        page.goto(f"{ui_stack.url}/ui/#/explore")
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        expect(page.locator("#dataset-images button").first).to_be_visible()
        assert not dialog.is_visible()
        # the 401s of the first load are the only console errors
        assert all("401" in e for e in tab.errors), tab.errors
    finally:
        tab.context.close()


def test_without_keys_under_a_route_prefix_the_page_asks_nothing(browser, ui_stack):
    tab = UI(browser, ui_stack, key=None)
    try:
        page = tab.page
        page.goto(f"{ui_stack.url}{OPEN_PREFIX}/ui/#/latents")
        page.wait_for_selector("body[data-ready='1']")
        expect(page.locator("#latent-table tbody tr").first).to_be_visible()
        src = page.locator("#latent-table tbody img").first.get_attribute("src")
        assert src.startswith(f"{OPEN_PREFIX}/v1/saes/") and "key=" not in src
        page.locator("#latent-table tbody img").first.evaluate("img => img.decode()")
        assert not page.locator("#key-dialog").is_visible()
        assert tab.errors == []
    finally:
        tab.context.close()
