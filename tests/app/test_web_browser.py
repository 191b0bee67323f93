"""A real browser against a real server: token shading, hover values, and no script injection."""

from __future__ import annotations

import pytest

from tests.app.servers import SHOTS, free_port, running_server


@pytest.fixture(scope="module")
def synthetic_server(database_url):
    port = free_port()
    serve = f"from app.server import serve; serve({database_url!r}, '127.0.0.1', {port})"  # what the CLI calls
    with running_server(["-c", serve], port) as (base, _):
        yield base


def test_feature_page_in_a_browser(synthetic_server, browser, synthetic_sae_id):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    dialogs, errors = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{synthetic_server}/saes/{synthetic_sae_id}/features/0")
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
    page.goto(f"{synthetic_server}/saes/{synthetic_sae_id}?per_page=15")
    page.screenshot(path=str(SHOTS / "sae.png"), full_page=True)
    page.goto(f"{synthetic_server}/")
    page.screenshot(path=str(SHOTS / "index.png"), full_page=True)
    page.goto(f"{synthetic_server}/probe?sae={synthetic_sae_id}&text=")
    page.screenshot(path=str(SHOTS / "probe-empty.png"), full_page=True)
    assert dialogs == [] and errors == []
    page.close()


def test_every_page_fits_a_phone(synthetic_server, browser, synthetic_sae_id):
    """At 390 px nothing makes the page scroll sideways (the header wraps, a wide table scrolls
    inside itself) and no heading breaks inside a word."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    for path in ["/", f"/saes/{synthetic_sae_id}", f"/saes/{synthetic_sae_id}/features/0", f"/saes/{synthetic_sae_id}/features/0?context=full",
                 f"/search?sae={synthetic_sae_id}&q=the", "/api", "/ladders", f"/probe?sae={synthetic_sae_id}&text=hello", "/no-such-page"]:
        page.goto(f"{synthetic_server}{path}")
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
        assert page.evaluate("getComputedStyle(document.querySelector('h1')).wordBreak") != "break-all", path
    page.goto(f"{synthetic_server}/saes/{synthetic_sae_id}/features/0")
    page.screenshot(path=str(SHOTS / "feature-phone.png"), full_page=True)
    page.close()
