"""Corpus text is untrusted. A run whose contexts are made of script tags, attribute-breaking
quotes, `javascript:` URLs, bidi overrides and the like is loaded, served by a real server and
opened in Chromium: nothing executes, no element or attribute is injected, and every token shows
literally, as the text it is."""

from __future__ import annotations

import pytest
import torch

from app.loader import load_run
from app.render import token_text
from app.urls import URLs
from tests.app.servers import free_port, running_server
from tests.app.webrun import make_synthetic_run
from trainer.config import run_slug
from trainer.runfolder import load_harvest, save_harvest


def in_full_context(token: str) -> str:
    """A token as a whole context shows it: newlines visible, and breaking the line."""
    return token_text(token).replace("↵", "↵\n")


QUANTILE_BINS, SAMPLES_PER_BIN = 4, 2  # make_synthetic_run's defaults
HOSTILE = [
    "<script>alert('script tag')</script>",
    "<script>window.pwned = 1</script>",
    '"><img src=x onerror="alert(\'img onerror\')">',
    "' onmouseover='alert(\"single quote\")' x='",
    '" onfocus="alert(1)" autofocus="',
    "javascript:alert('js url')",
    '<a href="javascript:alert(\'link\')">click me</a>',
    "</span></div><svg onload=alert('svg')>",
    "<iframe src=\"javascript:alert('frame')\"></iframe>",
    "<style>body{display:none}</style>",
    "<!--",
    "]]>",
    "&lt;b&gt;not bold&lt;/b&gt;",
    "{{ 7*7 }}",
    "${7*7}",
    "\u202eevil\u202c",  # RIGHT-TO-LEFT OVERRIDE ... POP
    "\u202egnp.exe",  # an override left open
    "\u2067rtl isolate",
    "\u200f",  # RIGHT-TO-LEFT MARK
    " plain",
    "\n",
    "\t",
]
# Shown on the index and SAE pages: the pages show a model's last path part, so no "/" in it.
HOSTILE_MODEL = "evil<img src=x onerror=alert('model')>\"><b>model"
N_LATENTS = 8


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    run = make_synthetic_run(tmp_path_factory.mktemp("hostile") / "run", n_latents=N_LATENTS, n_examples=4,
                             context_length=len(HOSTILE), n_contexts=6, vocab=HOSTILE, model=HOSTILE_MODEL)
    harvest = load_harvest(run)
    harvest.token_ids[0] = torch.arange(len(HOSTILE))  # context 0: every hostile token once, in order
    save_harvest(run, harvest)
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'hostile.db'}"
    sae_id = load_run(run, url)
    assert sae_id == run_slug(HOSTILE_MODEL, 6, N_LATENTS, N_LATENTS // 2)
    port = free_port()
    serve = f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"
    with running_server(["-c", serve], port) as (base, _):
        yield base, sae_id, harvest


INJECTED = """() => ({
  scripts: [...document.scripts].map(s => s.src || ('inline:' + s.textContent)),
  handlers: [...document.querySelectorAll('*')].flatMap(el => [...el.attributes]
      .filter(a => a.name.startsWith('on')).map(a => el.tagName + ' ' + a.name)),
  javascriptUrls: [...document.querySelectorAll('[href], [src], [action], [formaction]')]
      .map(el => el.getAttribute('href') || el.getAttribute('src') || el.getAttribute('action') || el.getAttribute('formaction'))
      .filter(v => /^\\s*javascript:/i.test(v)),
  foreign: [...document.querySelectorAll('main img, main svg:not(.chart), main iframe, main style, main b')].map(el => el.outerHTML),
  pwned: window.pwned,
  hidden: getComputedStyle(document.body).display === 'none',
})"""


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    events = {"dialogs": [], "errors": [], "console": []}
    page.on("dialog", lambda dialog: (events["dialogs"].append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: events["errors"].append(str(error)))
    page.on("console", lambda message: events["console"].append(message.text))
    page.goto(url)
    page.wait_for_load_state("networkidle")
    return page, events


def assert_nothing_ran(page, events):
    found = page.evaluate(INJECTED)
    assert [s for s in found["scripts"] if not s.endswith((URLs().htmx(), URLs().static("app.js")))] == []
    assert found["handlers"] == [] and found["javascriptUrls"] == [] and found["foreign"] == []
    assert found["pwned"] is None and not found["hidden"]
    assert events["dialogs"] == [] and events["errors"] == []
    # A CSP report would mean markup got through escaping and only the policy stopped it.
    assert [m for m in events["console"] if "Content Security Policy" in m] == []


def test_hostile_contexts_show_literally_and_run_nothing(hostile_server, browser):
    base, sae_id, harvest = hostile_server
    for index in range(N_LATENTS):
        page, events = open_page(browser, f"{base}/saes/{sae_id}/features/{index}?context=full")
        assert_nothing_ran(page, events)
        contexts = page.eval_on_selector_all(
            ".examples .context", "els => els.map(c => [...c.querySelectorAll('.tok')].map(t => t.textContent))")
        # top and quantile examples; a top context that repeats another's snippet is folded into it (×n)
        folded = sum(int(n.strip("×")) - 1 for n in page.eval_on_selector_all(".copies", "els => els.map(e => e.textContent)"))
        assert len(contexts) + folded == 4 + QUANTILE_BINS * SAMPLES_PER_BIN
        for shown in contexts:
            assert len(shown) == len(HOSTILE)
            assert all(text in {in_full_context(token) for token in HOSTILE} for text in shown)
        titles = page.eval_on_selector_all(".tok", "els => els.map(t => t.getAttribute('title'))")
        assert all(title.replace(".", "").isdigit() for title in titles)  # only numbers in attributes
        # The explanation (made of hostile tokens) and the logit tables read as text too.
        explanation = page.text_content(".explanation-text")
        assert explanation.replace("·", " ") == harvest.explanations[index]["text"].replace("⟦", "").replace("⟧", "") \
            .replace("\n", "↵").replace("\t", "⇥")
        logit_tokens = page.eval_on_selector_all("table.logits code", "els => els.map(c => c.textContent)")
        assert len(logit_tokens) == 2 * harvest.logit_top_ids.shape[1]
        page.close()


def test_every_hostile_token_reads_as_itself_and_bidi_stays_inside_its_token(hostile_server, browser):
    base, sae_id, harvest = hostile_server
    latent = int((harvest.top_context == 0).nonzero()[0, 0])  # a latent that shows context 0
    page, events = open_page(browser, f"{base}/saes/{sae_id}/features/{latent}?context=full")
    rows = page.eval_on_selector_all(
        ".context", "els => els.map(c => [...c.querySelectorAll('.tok')].map(t => t.textContent))")
    assert [in_full_context(token) for token in HOSTILE] in rows  # context 0: each token once, in order
    # An override left open inside one token must not reorder what follows: the next token
    # still starts to the right of where the overriding token starts.
    boxes = page.evaluate("""(needle) => {
      for (const context of document.querySelectorAll('.context')) {
        const toks = [...context.querySelectorAll('.tok')];
        const i = toks.findIndex(t => t.textContent === needle);
        if (i >= 0 && i + 1 < toks.length) {
          return [toks[i].getBoundingClientRect().left, toks[i + 1].getBoundingClientRect().left,
                  getComputedStyle(toks[i]).unicodeBidi];
        }
      }
    }""", token_text("\u202egnp.exe"))
    start, next_start, bidi = boxes
    assert next_start > start, "a bidi override leaked out of its token"
    assert bidi == "isolate"
    assert_nothing_ran(page, events)
    page.close()


@pytest.mark.parametrize("path", ["/", "/saes/{sae}", "/saes/{sae}?sort=index&order=asc", "/probe",
                                  "/saes/{sae}?sort=explanation_f1", "/search?sae={sae}&q=%3Cscript%3E",
                                  "/search?sae={sae}&q=javascript"])
def test_hostile_model_name_on_other_pages(hostile_server, browser, path):
    base, sae_id, _ = hostile_server
    page, events = open_page(browser, base + path.format(sae=sae_id))
    assert_nothing_ran(page, events)
    if path == "/" or path.startswith("/saes/{sae}?") or path == "/saes/{sae}":
        assert HOSTILE_MODEL in page.inner_text("main")  # shown as text
    page.close()
