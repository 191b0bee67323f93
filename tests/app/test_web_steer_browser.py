"""Steering in a real browser against a real server running the tiny real model: from a feature
page's "Steer with this latent" to both continuations, share, and the short link opened in a
fresh browser context showing the same texts; screenshots at a desktop and a phone size."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from tests.app.servers import SHOTS
from tests.app.test_web_probe_browser import probe_server, watch  # noqa: F401 (probe_server: a fixture)

PROMPT = "def read_config(path):\n    with open(path) as f:\n        return"


def texts(page) -> tuple[str, str]:
    return page.locator("#steer-default").inner_text(), page.locator("#steer-steered").inner_text()


def test_steer_from_a_feature_page_share_and_reopen(probe_server, browser, tiny_sae_id):  # noqa: F811
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems = watch(page)
    page.goto(f"{probe_server}/saes/{tiny_sae_id}/features/3")
    # the ablation section computes when it scrolls into view
    page.locator("#ablation").scroll_into_view_if_needed()
    page.locator("#ablation .context .tok.mark").first.wait_for()
    assert page.locator("#ablation .context").count() == 5
    page.locator("#ablation").screenshot(path=str(SHOTS / "feature-ablation.png"))
    page.evaluate("window.scrollTo(0, 0)")
    page.get_by_role("link", name="Steer with this latent").click()
    page.wait_for_url("**/steer?**")
    assert page.locator("#steer-latents").input_value() == "3:4"

    page.locator("#steer-prompt").fill(PROMPT)
    page.locator("#steer-latents").fill("3:20, 5:-4")
    page.locator("#steer-tokens").fill("12")
    page.get_by_role("button", name="Steer").click()
    page.locator("#steer-steered").wait_for()
    default, steered = texts(page)
    assert default.startswith("def read_config(path):↵\n") and steered.startswith("def read_config(path):↵\n")
    assert default != steered and page.locator("#steer-steered .tok.diverged").count() > 0
    # the address bar holds the view
    query = parse_qs(urlparse(page.url).query)
    assert query["latents"] == ["3:20, 5:-4"] and query["tokens"] == ["12"] and query["prompt"] == [PROMPT]
    page.screenshot(path=str(SHOTS / "steer.png"), full_page=True)

    page.get_by_role("button", name="Share").click()
    link = page.locator("#steer-share-url")
    link.wait_for()
    url = link.get_attribute("href")
    assert "/s/" in url

    fresh = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        shared = fresh.new_page()
        more = watch(shared)
        shared.goto(url)
        shared.locator("#steer-steered").wait_for()
        assert texts(shared) == (default, steered)
        assert "Shared steering" in shared.locator("h1 + .shared-note").inner_text()
        shared.screenshot(path=str(SHOTS / "steer-phone.png"), full_page=True)
        width = shared.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width} px)"
        assert more == []
    finally:
        fresh.close()
    assert problems == []
    page.close()
