"""The feature page, the SAE page and search in Chromium against a real server: hover a token and
a histogram bar, read the axis labels, toggle snippet / full context, try your own text (a real
tiny model runs the SAE), follow a nearest-latent link, search from the header and as you type.
Screenshots of each page go to SAESCOPE_SHOTS (/tmp/shots) to be looked at."""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from app.loader import load_run
from tests.app.servers import SHOTS, free_port, running_server
from tests.app.webrun import CAT, DEF_LATENT, FEW, make_run


@pytest.fixture(scope="module")
def tiny_model_server(tmp_path_factory, tiny_model_dir):
    """A server over the tests' run, pointed at the tiny model so that the try box runs."""
    run = make_run(tmp_path_factory.mktemp("browse") / "run", model=str(tiny_model_dir), d_in=32, layer=1)
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'browse.db'}"
    sae_id = load_run(run, url)
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"], port) as (base, _):
        yield base, sae_id


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
    yield page
    assert problems == []
    page.close()


def until(condition, timeout: float = 15.0) -> None:
    """Poll from Python (wait_for_function evaluates a string, which the CSP rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def address(page) -> str:
    """The address bar now (page.url is only refreshed while Playwright talks to the page)."""
    return page.evaluate("location.href")


def query(page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(address(page)).query, keep_blank_values=True)


def test_feature_page_hover_and_charts(tiny_model_server, page):
    base, sae_id = tiny_model_server
    page.goto(f"{base}/saes/{sae_id}/features/0")
    page.wait_for_load_state("networkidle")
    peak = page.locator(".examples .tok.mark").first  # the firing each example shows
    assert peak.get_attribute("title") == "5.000"
    peak.hover()
    assert "5.000" in peak.evaluate("el => getComputedStyle(el, '::after').content")  # the value on hover
    labels = page.locator("svg.chart.activations .axis-label").all_text_contents()
    assert labels == ["activation", "firings"]
    assert page.locator("svg.chart.logits .axis-label").all_text_contents() == ["logit effect", "tokens"]
    bar = page.locator("svg.chart.activations g.bin").nth(3)
    bar.hover()
    assert re.fullmatch(r"activation [\d.]+ to [\d.]+: [\d,]+ firings \([\d.]+%\)", bar.locator("title").text_content())
    assert bar.locator(".hist-bar").evaluate("el => getComputedStyle(el).fill") != bar.locator(".hist-bar").evaluate(
        "el => getComputedStyle(el.ownerSVGElement.querySelector('g.bin:not(:hover) .hist-bar')).fill")  # hover shows
    assert "Share of the harvest's tokens" in page.locator(".stat", has_text="Density").get_attribute("title")
    assert page.locator(".explanation-text").inner_text() == "<script>alert(1)"  # literally
    assert page.evaluate("window.pwned") is None


def test_snippet_full_toggle_keeps_a_link(tiny_model_server, page):
    base, sae_id = tiny_model_server
    page.goto(f"{base}/saes/{sae_id}/features/{CAT}")
    page.wait_for_load_state("networkidle")
    snippet_lengths = page.eval_on_selector_all(".examples .context", "els => els.map(c => c.querySelectorAll('.tok').length)")
    page.click(".toggle a:has-text('Full context')")
    until(lambda: "context=full" in address(page))
    until(lambda: page.locator(".toggle a.active").inner_text() == "Full context")
    full_lengths = page.eval_on_selector_all(".examples .context", "els => els.map(c => c.querySelectorAll('.tok').length)")
    assert set(full_lengths) == {16} and sum(full_lengths) > sum(snippet_lengths)
    assert page.locator("#try-context").get_attribute("disabled") is None  # the try form now asks for full contexts
    page.reload()  # the address bar holds the view
    assert page.locator(".toggle a.active").inner_text() == "Full context"
    page.click(".toggle a:has-text('Snippet')")
    until(lambda: "context=full" not in address(page))
    assert max(page.eval_on_selector_all(".examples .context", "els => els.map(c => c.querySelectorAll('.tok').length)")) < 16


def test_try_your_own_text(tiny_model_server, page):
    base, sae_id = tiny_model_server
    page.goto(f"{base}/saes/{sae_id}/features/{FEW}")
    page.wait_for_load_state("networkidle")
    text = "def greet(name):\n    return 'Hello, ' + name <b>bold?</b>"
    page.fill("#try textarea", text)
    page.click("#try button[type=submit]")
    until(lambda: page.locator("#try-result .try-tokens .tok").count() > 5, timeout=60)  # the model loads once
    until(lambda: query(page).get("text") == [text])  # the address bar holds the typed text: a link
    tokens = page.locator("#try-result .tok")
    titles = tokens.evaluate_all("els => els.map(el => el.getAttribute('title'))")
    assert all(re.fullmatch(r"\d+\.\d{3}", title) for title in titles)
    assert "<b>" in page.locator("#try-result .try-tokens").inner_text()  # typed markup stays text
    assert page.locator("#try-result b").count() == 0
    assert re.search(r"Fires on \d+ of \d+ tokens", page.locator("#try-result").inner_text())
    page.reload()
    until(lambda: page.locator("#try-result .try-tokens .tok").count() == len(titles))


def test_follow_a_nearest_latent(tiny_model_server, page):
    base, sae_id = tiny_model_server
    page.goto(f"{base}/saes/{sae_id}/features/5")
    page.wait_for_load_state("networkidle")
    link = page.locator("a.neighbour").first
    target = link.inner_text().lstrip("#")
    link.click()
    page.wait_for_load_state("networkidle")
    assert page.url.endswith(f"/features/{target}") and page.locator("h1").inner_text() == f"Latent #{target}"
    page.click("text=Random")
    page.wait_for_load_state("networkidle")
    assert re.search(r"/features/\d+$", page.url)


def test_search_from_the_header_and_as_you_type(tiny_model_server, page):
    base, sae_id = tiny_model_server
    page.goto(f"{base}/saes/{sae_id}")
    page.wait_for_load_state("networkidle")
    page.fill("header .site-search input[name=q]", "cat")
    page.press("header .site-search input[name=q]", "Enter")
    page.wait_for_load_state("networkidle")
    assert "/search?" in page.url and f"sae={sae_id}" in page.url
    first = page.locator(".by-explanation tbody tr").first
    assert first.locator("a").inner_text() == f"#{CAT}"
    page.fill("form.search-form input[name=q]", " def")
    until(lambda: page.locator(".by-token h3 code").count() > 0 and page.locator(".by-token h3 code").first.inner_text() == "·def")
    until(lambda: query(page).get("q") == [" def"])  # the leading space is kept in the link
    assert page.locator(".by-token tbody tr").first.locator("a").inner_text() == f"#{DEF_LATENT}"


def test_screenshots(tiny_model_server, page):
    """Full-page screenshots to look at (the closing note describes them)."""
    base, sae_id = tiny_model_server
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, path in [("feature-dashboard", f"/saes/{sae_id}/features/{CAT}?text=def+f(x):+return+x"),
                       ("sae-density", f"/saes/{sae_id}?per_page=12"), ("search", f"/search?sae={sae_id}&q=+def")]:
        page.goto(base + path)
        page.wait_for_load_state("networkidle")
        until(lambda: "try-tokens" in page.content() or name != "feature-dashboard", timeout=60)
        page.mouse.move(0, 0)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000


# ---------------------------------------------------------------- a real harvest


@pytest.fixture(scope="module")
def real_server(tiny_db):
    """The tiny run trained, evaluated and harvested by the trainer itself (tests/conftest.py)."""
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({tiny_db!r}, '127.0.0.1', {port})"], port) as (base, _):
        yield base


def test_a_real_harvest_in_the_browser(real_server, page, tiny_run):
    """The best-explained latent of a real trained tiny SAE: every part shows, the try box runs
    the real SAE and agrees with the probe."""
    import json
    import urllib.request

    from trainer.runconfig import RunConfig

    sae_id = RunConfig.load(tiny_run).slug
    listing = json.load(urllib.request.urlopen(f"{real_server}/saes/{sae_id}.json?sort=explanation_f1&per_page=1"))
    index = listing["latents"][0]["index"]
    page.goto(f"{real_server}/saes/{sae_id}/features/{index}")
    page.wait_for_load_state("networkidle")
    assert page.locator(".explanation-text mark.fires").count() >= 1
    assert page.locator("svg.chart.activations g.bin").count() > 1 and page.locator("a.neighbour").count() > 0
    assert page.locator("table.logits.up tbody tr").count() > 0 and page.locator(".examples .context").count() > 5
    assert "position 0" in page.locator(".excluded").inner_text()
    text = "def main():\n    return sorted(items, key=len)\n"
    page.fill("#try textarea", text)
    page.click("#try button[type=submit]")
    until(lambda: page.locator("#try-result .try-tokens .tok").count() > 5, timeout=60)
    shown = [float(t) for t in page.locator("#try-result .tok").evaluate_all("els => els.map(el => el.title)")]
    request = urllib.request.Request(f"{real_server}/api/probe", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"sae": sae_id, "text": text, "top_k": 64}).encode())
    probe = json.load(urllib.request.urlopen(request))
    expected = [next((hit["activation"] for hit in token["top_latents"] if hit["index"] == index), 0.0)
                for token in probe["tokens"]]
    assert shown == pytest.approx(expected, abs=1e-3)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)
    page.screenshot(path=str(SHOTS / "feature-real.png"), full_page=True)
    page.goto(f"{real_server}/saes/{sae_id}?per_page=12&sort=explanation_f1")
    page.screenshot(path=str(SHOTS / "sae-real.png"), full_page=True)
