"""Accessibility: axe-core (npm, package.json's devDependencies) run in Chromium against every
page of a real server, with real content (the tiny model's run, probed; a scaling ladder; a
shared probe; search results; an error page): no serious or critical violation. And the keyboard
path through the probe: Tab along the tokens, Enter into a token's panel, highlight, share."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from app.sweep_loader import load_sweep
from tests.app.servers import ROOT, SHOTS, free_port, running_server
from tests.app.sweeprun import ladder_id, make_sweep

AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
TEXT = 'try:\n    value = json.loads(text)\nexcept ValueError:\n    value = None\n'
BLOCKING = ("serious", "critical")


@pytest.fixture(scope="module")
def a11y_server(tiny_db, tmp_path_factory):
    """The tiny run (probe-able) and a scaling ladder in one database, served for real."""
    folder = tmp_path_factory.mktemp("a11y")
    database = folder / "saescope.db"
    shutil.copy(tiny_db.removeprefix("sqlite:///"), database)
    url = f"sqlite:///{database}"
    load_sweep(make_sweep(folder / "sweep"), url)
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"], port) as (base, _):
        yield base


def every_page(base: str, sae: str) -> list[str]:
    ladder = json.load(urllib.request.urlopen(f"{base}/ladders/{ladder_id()}.json"))
    rung = ladder["rungs"][len(ladder["rungs"]) // 2]["sae_id"]
    share = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{base}/api/share", data=json.dumps({"sae": sae, "text": TEXT}).encode(),
        headers={"Content-Type": "application/json"})))
    probe = {"sae": sae, "text": TEXT}
    steering = {"sae": sae, "prompt": "def greet(name):", "latents": "1:4", "tokens": 8}
    steer_share = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{base}/api/steer/share", data=json.dumps(steering | {"latents": [[1, 4]]}).encode(),
        headers={"Content-Type": "application/json"})))
    return [
        "/", "/ladders", f"/ladders/{ladder_id()}", f"/saes/{sae}", f"/saes/{sae}?min_density_pct=1&sort=explanation_f1",
        f"/saes/{sae}/features/3", f"/saes/{sae}/features/3?context=full&" + urlencode({"text": TEXT}),
        f"/saes/{rung}/features/2", f"/search?sae={sae}", f"/search?sae={sae}&q=self", f"/search?sae={sae}&q=%20x",
        "/search/example?" + urlencode(probe),
        "/probe", "/probe?" + urlencode(probe | {"token": 3}), "/probe?" + urlencode(probe | {"latent": 1, "all": 1, "bos": 1}),
        "/probe?" + urlencode({"sae": sae, "text": TEXT * 40}),  # over the limit: the error and its offer
        f"/p/{share['id']}?token=2", "/steer", "/steer?" + urlencode(steering), f"/s/{steer_share['id']}",
        "/api", "/no/such/page",
    ]


def violations(page) -> list[dict]:
    page.add_script_tag(path=str(AXE))
    return page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
        .map(v => ({id: v.id, impact: v.impact, help: v.help,
                    nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))""")


@pytest.mark.slow  # about a minute per width: 22 pages, each loaded and checked by axe
@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_no_serious_accessibility_violation_on_any_page(a11y_server, browser, tiny_sae_id, width, height):
    assert AXE.is_file(), "axe-core is missing: npm install (make setup)"
    # axe is injected as a script of the test's own: the page's CSP rightly refuses it otherwise
    context = browser.new_context(bypass_csp=True, viewport={"width": width, "height": height})
    found = {}
    for path in every_page(a11y_server, tiny_sae_id):
        page = context.new_page()
        page.goto(a11y_server + path)
        page.wait_for_load_state("networkidle")
        blocking = [v for v in violations(page) if v["impact"] in BLOCKING]
        if blocking:
            found[path] = blocking
        page.close()
    context.close()
    assert found == {}, json.dumps(found, indent=1, ensure_ascii=False)


def test_the_probe_by_keyboard_alone(a11y_server, browser, tiny_sae_id):
    """Tab along the tokens (each opens its panel), Enter into the panel, highlight a latent,
    and share, never touching the mouse."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{a11y_server}/probe?" + urlencode({"sae": tiny_sae_id, "text": TEXT}))
    page.wait_for_load_state("networkidle")
    active = "() => { const e = document.activeElement; return {tag: e.tagName, cls: e.className, text: e.textContent.trim(), pos: e.dataset.position || null, panel: Boolean(e.closest('#token-detail'))}; }"

    page.locator("#probe-state button", has_text="Share").focus()
    for _ in range(3):  # Share, then the first tokens
        page.keyboard.press("Tab")
    token = page.evaluate(active)
    assert "tok" in token["cls"] and token["pos"] is not None, token
    panel = page.locator(f"#token-detail .token-detail[data-position='{token['pos']}']")
    panel.wait_for()

    page.keyboard.press("Enter")  # into the panel
    deadline = time.monotonic() + 10
    while not page.evaluate(active)["panel"]:
        assert time.monotonic() < deadline, page.evaluate(active)
        time.sleep(0.05)
    while page.evaluate(active)["text"] != "highlight":  # the first latent's link, then its button
        page.keyboard.press("Tab")
        assert page.evaluate(active)["panel"], page.evaluate(active)
    page.keyboard.press("Enter")  # highlight
    page.locator(".highlight-note").wait_for()
    deadline = time.monotonic() + 10
    while "tok" not in page.evaluate(active)["cls"]:  # the focus is back on the token, the text in view
        assert time.monotonic() < deadline, page.evaluate(active)
        time.sleep(0.05)
    assert page.evaluate(active)["pos"] == token["pos"]
    box = page.locator(".probe-tokens").bounding_box()
    assert box["y"] < 800 and box["y"] + box["height"] > 0

    for _ in range(80):  # back to Share
        if page.evaluate(active)["text"] == "Share":
            break
        page.keyboard.press("Shift+Tab")
    assert page.evaluate(active)["text"] == "Share"
    page.keyboard.press("Enter")
    link = page.locator(".share-url")
    link.wait_for()
    assert "latent=" in link.get_attribute("href")
    page.screenshot(path=str(Path(SHOTS) / "probe-keyboard.png"))
    page.close()


def test_the_researchers_path(a11y_server, browser, tiny_sae_id):
    """The feature page's examples are above the fold at 1280×800; on the probe a mouse click on
    "highlight" in the ranking keeps the shaded text in view and a clicked token's panel comes
    into view; at 390 px search results and the ranking need no sideways scrolling."""
    desktop = browser.new_page(viewport={"width": 1280, "height": 800})
    listing = json.load(urllib.request.urlopen(f"{a11y_server}/saes/{tiny_sae_id}.json?sort=explanation_f1&per_page=1"))
    desktop.goto(f"{a11y_server}/saes/{tiny_sae_id}/features/{listing['latents'][0]['index']}")
    first = desktop.locator("#examples ol.examples li").first.bounding_box()
    assert first["y"] + first["height"] <= 800, first  # the first top example, whole, without scrolling

    desktop.goto(f"{a11y_server}/probe?" + urlencode({"sae": tiny_sae_id, "text": TEXT * 3}))
    desktop.wait_for_load_state("networkidle")
    button = desktop.locator(".text-latents button.highlight").nth(6)
    button.scroll_into_view_if_needed()
    button.click()
    desktop.locator(".highlight-note").wait_for()
    desktop.wait_for_load_state("networkidle")
    text = desktop.locator(".probe-tokens").bounding_box()
    assert text["y"] < 800 * 0.6 and text["y"] + text["height"] > 0, text  # the shaded text in view

    desktop.evaluate("window.scrollTo(0, 0)")
    desktop.set_viewport_size({"width": 1280, "height": 500})
    token = desktop.locator(".probe-tokens .tok").nth(40)
    token.scroll_into_view_if_needed()
    token.click()
    panel = desktop.locator("#token-detail .token-detail[data-position='40']")
    panel.wait_for()
    time.sleep(0.3)
    box = desktop.locator("#token-detail").bounding_box()
    assert box["y"] < 500 and box["y"] + box["height"] > 0, box  # the panel came into view
    desktop.close()

    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    for path in (f"/search?sae={tiny_sae_id}&q=self", "/probe?" + urlencode({"sae": tiny_sae_id, "text": TEXT})):
        phone.goto(a11y_server + path)
        phone.wait_for_load_state("networkidle")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390, path
        for explanation in phone.locator("table.stack td.wide").all()[:5]:
            cell = explanation.bounding_box()
            assert cell["x"] >= 0 and cell["x"] + cell["width"] <= 390, (path, cell)  # on screen, not scrolled off
    phone.goto(f"{a11y_server}/saes/{tiny_sae_id}/features/{listing['latents'][0]['index']}")
    chip = phone.locator("ol.examples .tok.on").first
    chip.tap()
    assert "tip" in chip.get_attribute("class")  # its value shown, as hovering shows it
    assert phone.evaluate("(el) => getComputedStyle(el, '::after').content", chip.element_handle()) == f'"{chip.get_attribute("data-tip")}"'
    phone.close()
