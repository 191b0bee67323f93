"""The probe in a real browser against a real server running the tiny real model: type text,
see the shading appear, click a token, move along the tokens with Tab, follow a latent link,
highlight a latent, share, open the short link in a new page and see the same view; a text full
of markup stays text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app.servers import SHOTS, free_port

ROOT = Path(__file__).resolve().parents[2]
TEXT = 'def greet(name):\n    """Say hello."""\n    return "Hello, " + name\n'
PAYLOAD = '<script>alert("probe")</script><img src=x onerror=alert(2)>'
EMPTY = "rgba(0, 0, 0, 0)"


@pytest.fixture(scope="module")
def probe_server(tiny_db):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    serve = f"from app.server import serve; serve({tiny_db!r}, '127.0.0.1', {port})"
    proc = subprocess.Popen([sys.executable, "-c", serve], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if urllib.request.urlopen(f"{base}/healthz", timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stdout.read().decode())
                time.sleep(0.1)
        else:
            raise RuntimeError("server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def watch(page) -> list[str]:
    problems: list[str] = []
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
    return problems


def until(condition, timeout: float = 15.0) -> None:
    """Poll from Python: page.wait_for_function evaluates a string in the page, which the CSP
    (no 'unsafe-eval') forbids, as it should."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def shaded(page) -> int:
    return page.eval_on_selector_all(
        ".probe-tokens .tok", f"els => els.filter(el => getComputedStyle(el).backgroundColor !== '{EMPTY}').length")


def test_type_click_highlight_share_and_reopen(probe_server, browser, tiny_sae_id):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = watch(page)
    page.goto(f"{probe_server}/probe?sae={tiny_sae_id}")
    assert page.locator(".probe-tokens .tok").count() == 0

    # type: the tokens appear as the typing pauses, and the address bar follows
    page.locator("#probe-text").press_sequentially(TEXT, delay=15)
    page.locator(".probe-tokens .tok").nth(5).wait_for()
    page.wait_for_load_state("networkidle")
    assert "text=def+greet" in page.url or "text=def%20greet" in page.url
    tokens = page.locator(".probe-tokens .tok")
    assert "".join(tokens.all_inner_texts()).replace("·", " ").replace("↵", "") == TEXT
    assert tokens.first.get_attribute("title") == "first position: left out"

    # nearly every latent of the tiny SAE is frequent: show them all, and the shading appears
    page.locator("#probe-all").check()
    page.wait_for_url(re.compile(r".*[?&]all=1"))
    until(lambda: shaded(page) > 0)
    assert shaded(page) >= tokens.count() - 1
    # Back and Forward give each state whole, the typed text included (htmx's own snapshots of the
    # page lacked it: the box was empty under the tokens of the state before)
    with_all = page.url
    with page.expect_event("load"):  # the page is loaded again from its address
        page.go_back()
    assert "all=1" not in page.url
    assert page.locator("#probe-text").input_value() == TEXT and not page.locator("#probe-all").is_checked()
    with page.expect_event("load"):
        page.go_forward()
    assert page.url == with_all and shaded(page) > 0
    assert page.locator("#probe-text").input_value() == TEXT and page.locator("#probe-all").is_checked()

    # click a token: its latents, with activations and densities, each linking to its page
    tokens.nth(3).click()
    detail = page.locator("#token-detail .token-detail")
    detail.wait_for()
    assert "position 3" in detail.inner_text()
    rows = detail.locator("tbody tr")
    assert rows.count() >= 1
    assert re.fullmatch(r"\d+\.\d{3}", rows.first.locator("td.num").inner_text())
    assert rows.first.locator("td.density").inner_text().endswith("%")
    # the whole table, its highlight buttons included, fits the panel: nothing to scroll to
    assert detail.evaluate("el => el.closest('.panel').scrollWidth <= el.closest('.panel').clientWidth")
    assert rows.first.locator("button", has_text="highlight").is_visible()

    # the keyboard does the same: Tab moves to the next token and lists its latents, Shift+Tab back
    for key, position in (("Tab", 4), ("Shift+Tab", 3)):
        page.keyboard.press(key)
        assert page.locator(".probe-tokens .tok:focus").get_attribute("data-position") == str(position)
        page.locator(f'#token-detail .token-detail[data-position="{position}"]').wait_for()
        assert f"position {position}" in detail.inner_text() and rows.count() >= 1
    page.wait_for_url(re.compile(r".*[?&]token=3$"))  # the open token is in the address bar too
    # the frequent-latents box is its own request on the same text: the panel stays open
    page.locator("#probe-all").uncheck()
    page.wait_for_url(lambda url: "token=3" in url and "all=1" not in url)
    page.locator('#token-detail .token-detail[data-position="3"]').wait_for()
    page.locator("#probe-all").check()
    page.wait_for_url(lambda url: "token=3" in url and "all=1" in url)
    page.locator('#token-detail .token-detail[data-position="3"]').wait_for()
    assert page.locator(".probe-tokens .tok.current").evaluate_all("els => els.map(el => el.dataset.position)") == ["3"]
    latent_link = rows.first.locator("a").first
    latent = latent_link.inner_text().lstrip("#")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)
    page.screenshot(path=str(SHOTS / "probe.png"), full_page=True)

    # follow the latent link to its feature page, and come back to the same probe
    probe_url = page.url
    latent_link.click()
    page.wait_for_url(re.compile(rf".*/features/{latent}$"))
    assert page.locator("h1").inner_text() == f"Latent #{latent}"
    page.go_back()
    page.wait_for_url(probe_url)
    page.locator(".probe-tokens .tok").first.wait_for()

    # highlight a latent from the whole-text ranking: every token shaded by it, in the URL
    ranking = page.locator(".text-latents tbody tr")
    chosen = ranking.first.locator("a").inner_text().lstrip("#")
    ranking.first.locator("button", has_text="highlight").click()
    page.wait_for_url(re.compile(rf".*[?&]latent={chosen}(&|$)"))
    page.locator(".highlight-note").wait_for()
    assert f"#{chosen}" in page.locator(".highlight-note").inner_text()
    tips = page.locator(".probe-tokens .tok").evaluate_all("els => els.map(el => el.dataset.tip)")
    assert all(tip.startswith(f"#{chosen}: ") for tip in tips[1:])
    assert page.locator(".text-latents tr.selected").count() == 1
    # the token panel stays open on the token it showed, now marked in the text
    assert "position 3" in detail.inner_text()
    assert page.locator(".probe-tokens .tok.current").get_attribute("data-position") == "3"

    # share: a short link, which opens the same view in a new page
    page.locator("#probe-state button", has_text="Share").click()
    link = page.locator(".share-url")
    link.wait_for()
    href = link.get_attribute("href")  # relative; the text shown and copied is whole
    assert re.fullmatch(rf"/p/[a-z2-7]{{10}}\?latent={chosen}&all=1&token=3", href), href
    assert link.inner_text() == probe_server + href
    # copy: the link reaches the clipboard (127.0.0.1 is a secure context, so the clipboard API)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=probe_server)
    copy = page.locator(".share-link button.copy")
    copy.click()
    until(lambda: copy.inner_text() == "copied")
    assert page.evaluate("navigator.clipboard.readText()") == probe_server + href
    page.screenshot(path=str(SHOTS / "probe-highlight.png"), full_page=True)
    view = {
        "tokens": page.locator(".probe-tokens").inner_text(),
        "tips": tips,
        "ranking": page.locator(".text-latents").inner_text(),
        "highlight": page.locator(".highlight-note").inner_text(),
        "panel": detail.inner_text(),
    }

    shared = browser.new_page(viewport={"width": 1280, "height": 900})
    shared_problems = watch(shared)
    shared.goto(probe_server + href)
    shared.locator(".probe-tokens .tok").first.wait_for()
    assert shared.locator("#probe-text").input_value() == TEXT
    assert shared.locator("#probe-all").is_checked()
    assert {
        "tokens": shared.locator(".probe-tokens").inner_text(),
        "tips": shared.locator(".probe-tokens .tok").evaluate_all("els => els.map(el => el.dataset.tip)"),
        "ranking": shared.locator(".text-latents").inner_text(),
        "highlight": shared.locator(".highlight-note").inner_text(),
        "panel": shared.locator("#token-detail .token-detail").inner_text(),
    } == view
    assert shared.locator('meta[property="og:title"]').get_attribute("content").startswith("“def greet(name):")
    assert tiny_sae_id in shared.locator('meta[property="og:description"]').get_attribute("content")
    shared.locator(".probe-tokens .tok").nth(2).click()  # the shared page is as live as the first
    # The shared view opens with a panel already, so wait for the clicked token's own: a focus
    # sent while this request is in flight would abort it (hx-sync replace), which htmx logs.
    shared.locator('#token-detail .token-detail[data-position="2"]').wait_for()
    shared.locator(".probe-tokens .tok").nth(5).focus()  # focus alone, as a screen reader moves it
    shared.locator('#token-detail .token-detail[data-position="5"]').wait_for()
    assert "position 5" in shared.locator("#token-detail .token-detail").inner_text()
    shared.wait_for_url(re.compile(r".*/p/[a-z2-7]{10}\?latent=\d+&all=1&token=5$"))  # still the short link
    shared.mouse.move(0, 0)
    shared.screenshot(path=str(SHOTS / "probe-shared.png"), full_page=True)
    assert problems == [] and shared_problems == []
    shared.close()
    page.close()


def test_markup_in_the_text_stays_text(probe_server, browser, tiny_sae_id):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    problems = watch(page)
    page.goto(f"{probe_server}/probe?sae={tiny_sae_id}&all=1")
    page.locator("#probe-text").fill(PAYLOAD)
    page.locator(".probe-tokens .tok").nth(3).wait_for()
    page.wait_for_load_state("networkidle")
    assert page.locator(".probe-tokens").inner_text().replace("·", " ") == PAYLOAD
    assert page.locator(".probe-result script, .probe-result img").count() == 0
    page.locator(".probe-tokens .tok").nth(1).click()
    page.locator("#token-detail .token-detail").wait_for()
    page.reload()  # the same markup from the server's own rendering of the URL
    page.locator(".probe-tokens .tok").first.wait_for()
    assert page.locator(".probe-result script, .probe-result img").count() == 0
    assert page.locator("#probe-text").input_value() == PAYLOAD
    assert problems == []
    page.close()
