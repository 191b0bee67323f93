"""A real browser against a real server: token shading, hover values, and no script injection."""

from __future__ import annotations

import pytest
from servers import SHOTS, free_port, running_server


@pytest.fixture(scope="module")
def server(database_url):
    port = free_port()
    serve = f"from app.server import serve; serve({database_url!r}, '127.0.0.1', {port})"  # what the CLI calls
    with running_server(["-c", serve], port) as (base, _):
        yield base


def test_feature_page_in_a_browser(server, browser, sae_id):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    dialogs, errors = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server}/saes/{sae_id}/features/0")
    page.wait_for_load_state("networkidle")

    tokens = page.locator(".context .tok")
    assert tokens.count() >= 16
    peak = page.locator(".tok", has_text="alert(1)").first
    background = peak.evaluate("el => getComputedStyle(el).backgroundColor")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent"), background
    assert peak.get_attribute("title") == "5.000"
    peak.hover()
    tooltip = peak.evaluate("el => getComputedStyle(el, '::after').content")
    assert "5.000" in tooltip
    shaded = page.eval_on_selector_all(
        ".tok.on", "els => els.filter(el => getComputedStyle(el).backgroundColor !== 'rgba(0, 0, 0, 0)').length")
    assert shaded > 0
    assert page.locator(".tok", has_text="<script>").count() >= 1  # shown as text
    assert page.evaluate("typeof htmx") == "object"  # htmx loaded from node_modules
    assert dialogs == [] and errors == []

    SHOTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)
    page.screenshot(path=str(SHOTS / "feature.png"), full_page=True)
    page.goto(f"{server}/saes/{sae_id}?per_page=15")
    page.screenshot(path=str(SHOTS / "sae.png"), full_page=True)
    page.goto(f"{server}/")
    page.screenshot(path=str(SHOTS / "index.png"), full_page=True)
    page.goto(f"{server}/probe?sae={sae_id}&text=")
    page.screenshot(path=str(SHOTS / "probe-empty.png"), full_page=True)
    assert dialogs == [] and errors == []
    page.close()
