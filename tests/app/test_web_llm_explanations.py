"""Explanations from a language model (RUN/llm_explanations.jsonl) in the database and on the
pages: the loader carries them (alone, when only they changed), the feature page and its JSON
twin, the SAE page's list and the search results show the best-scoring explanation first and
say where each came from; on SQLite and PostgreSQL (`empty_url`)."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import make_engine
from app.explanations import llm_explanation_rows
from app.loader import load_run, unload_sae
from app.main import create_app
from app.models import LatentExplanation, Sae
from app.settings import Settings
from app.urls import URLs
from tests.app.webrun import CAT, make_cfg, make_run
from trainer.llm_explanations import LlmExplanation, LlmExplanationWriter, llm_explanations_path

SAE_ID = make_cfg().slug
HOSTILE = "<img src=x onerror=alert(1)> tags"


def record(latent: int, text: str, counts: tuple[int, int, int, int], model: str = "TestLM", status: str = "ok",
           version: int = 1) -> LlmExplanation:
    tp, fn, tn, fp = counts
    score = (tp / (tp + fn) + tn / (tn + fp)) / 2 if status == "ok" else None
    return LlmExplanation(latent=latent, model=model, url="http://127.0.0.1:9/v1/chat/completions",
                          prompt_version=version, status=status, text=text if status == "ok" else None, score=score,
                          true_positives=tp, false_negatives=fn, true_negatives=tn, false_positives=fp,
                          error=None if status == "ok" else "boom")


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def write(run, *records: LlmExplanation) -> None:
    with LlmExplanationWriter(run) as out:
        for r in records:
            out.append(r)


def client_of(url: str) -> TestClient:
    return TestClient(create_app(Settings(database_url=url)))


def stored(url: str) -> list[tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(
                select(LatentExplanation.latent, LatentExplanation.source, LatentExplanation.text,
                       LatentExplanation.score, LatentExplanation.n_scored).order_by(LatentExplanation.latent,
                                                                                      LatentExplanation.source))]
    finally:
        engine.dispose()


def test_load_carries_llm_explanations_and_reloads_them_alone(run, empty_url):
    # latent CAT's pattern has F1 ~0.985: its LLM explanation (informedness 0.6) ranks second;
    # latent 5's LLM explanation (informedness 1.0) ranks above its random pattern.
    write(run, record(CAT, "the word cat", (3, 2, 5, 0)), record(5, HOSTILE, (5, 0, 5, 0)),
          record(6, "", (0, 0, 0, 0), status="error"), record(7, "old prompt", (5, 0, 5, 0)),
          record(7, "new prompt", (3, 2, 3, 2), version=2), record(5, "second model", (3, 2, 3, 2), model="OtherLM"))
    assert load_run(run, empty_url) == SAE_ID
    assert stored(empty_url) == [(CAT, "TestLM", "the word cat", 0.8, 10), (5, "OtherLM", "second model", 0.6, 10),
                                 (5, "TestLM", HOSTILE, 1.0, 10), (7, "TestLM", "new prompt", 0.6, 10)]

    # `saescope explain` adds one: the same load puts the SAE's explanations in place, no --replace
    engine = make_engine(empty_url)
    with engine.connect() as conn:
        created = conn.execute(select(Sae.created_at)).scalar_one()
    write(run, record(9, "the ninth", (2, 3, 4, 1)))
    assert load_run(run, empty_url) == SAE_ID
    assert [row[0] for row in stored(empty_url)] == [CAT, 5, 5, 7, 9]
    with engine.connect() as conn:
        assert conn.execute(select(Sae.created_at)).scalar_one() == created  # the SAE itself was left alone
        assert llm_explanation_rows(conn, SAE_ID)[-1] == (SAE_ID, 9, "TestLM", "the ninth")
        assert llm_explanation_rows(conn) == llm_explanation_rows(conn, SAE_ID)
        assert llm_explanation_rows(conn, "no-such-sae") == []
    assert load_run(run, empty_url) == SAE_ID  # the same files: nothing to do
    assert unload_sae(engine, SAE_ID)
    engine.dispose()
    assert stored(empty_url) == []


def meaning(url: str, q: str) -> list[int]:
    with client_of(url) as client:
        response = client.get(URLs().search(sae=SAE_ID, q=q, fmt="json"))
        assert response.status_code == 200, response.text
        return [hit["index"] for hit in response.json()["ranked"]]


def test_search_by_meaning_finds_llm_explanations_also_when_they_come_alone(run, empty_url):
    write(run, record(5, "exception handlers in a parser", (5, 0, 5, 0)))
    load_run(run, empty_url)
    assert meaning(empty_url, "exception handling") == [5]  # stemmed: exception, handl(ers|ing)
    assert meaning(empty_url, "walrus") == []
    write(run, record(9, "a walrus in a docstring", (5, 0, 5, 0)))
    load_run(run, empty_url)  # only the explanations changed: the search documents follow them
    assert meaning(empty_url, "walrus") == [9]
    assert meaning(empty_url, "exception handling") == [5]


def test_pages_show_the_best_explanation_first_and_its_source(run, empty_url):
    write(run, record(CAT, "the word cat", (3, 2, 5, 0)), record(5, HOSTILE, (5, 0, 5, 0)))
    load_run(run, empty_url)
    urls = URLs()
    with client_of(empty_url) as client:
        cat = client.get(urls.feature(SAE_ID, CAT, fmt="json")).json()
        assert [(e["kind"], e["source"], e["text"]) for e in cat["explanations"]] == [
            ("patterns", "token patterns", "the⟦ cat⟧"), ("llm", "TestLM", "the word cat")]
        assert cat["explanations"][1]["score"] == 0.8 and cat["explanations"][1]["rank_score"] == pytest.approx(0.6)
        assert cat["explanation"]["text"] == "the⟦ cat⟧"  # the pattern's own record, as before

        five = client.get(urls.feature(SAE_ID, 5, fmt="json")).json()
        assert [e["kind"] for e in five["explanations"]] == ["llm", "patterns"]
        page = client.get(urls.feature(SAE_ID, 5)).text
        assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt; tags" in page  # autoescaped
        box = page[page.index('class="explanation-box"'):]
        box = box[: box.index("</section>")]
        assert box.index("onerror") < box.index("F1")  # the LLM's first, then the pattern's
        assert "detection <strong>1.00</strong>" in box and "by TestLM · 10 contexts" in box

        # The SAE page's list: each latent's explanations best first, each saying where it came from
        listed = client.get(urls.sae(SAE_ID, fmt="json", sort="index", order="asc", per_page=10)).json()["latents"]
        assert [e["source"] for e in listed[5]["explanations"]] == ["TestLM", "token patterns"]
        assert [e["source"] for e in listed[CAT]["explanations"]] == ["token patterns", "TestLM"]
        html = client.get(urls.sae(SAE_ID, sort="index", order="asc", per_page=10)).text
        cells = CellText.of(html, "explanation-cell")
        assert cells[5].startswith("<img src=x onerror=alert(1)> tags TestLM · detection 1.00")
        assert cells[CAT].startswith("the·cat F1 0.98 ") and "the word cat TestLM · detection 0.80" in cells[CAT]

        # Search results: the latents found carry theirs too
        found = client.get(urls.search(sae=SAE_ID, q="cat", fmt="json")).json()
        hit = next(h for h in found["explanations"] if h["index"] == CAT)
        assert [e["source"] for e in hit["explanations"]] == ["token patterns", "TestLM"]
        assert "TestLM · detection 0.80" in client.get(urls.search(sae=SAE_ID, q="cat")).text


def test_the_sae_page_sums_up_each_models_detection_scores(run, empty_url):
    write(run, record(CAT, "the word cat", (3, 2, 5, 0)), record(5, "five", (5, 0, 5, 0)),  # 0.8, 1.0
          record(6, "six", (2, 3, 3, 2), model="OtherLM"))  # 0.5
    load_run(run, empty_url)
    with client_of(empty_url) as client:
        quality = client.get(URLs().sae(SAE_ID, fmt="json")).json()["sae"]["quality"]
        assert quality["detection"] == [
            {"source": "TestLM", "latents": 2, "score": pytest.approx(0.9), "share_good": 1.0},
            {"source": "OtherLM", "latents": 1, "score": pytest.approx(0.5), "share_good": 0.0}]  # the best model first
        html = client.get(URLs().sae(SAE_ID)).text
        stats = html[html.index('class="stats quality"'):]
        stats = " ".join(stats[: stats.index("</div>\n</div>")].split())
        assert stats.index("TestLM, 2 latents") < stats.index("OtherLM, 1 latents")
        assert '<span class="value">0.900</span>' in stats
    engine = make_engine(empty_url)
    unload_sae(engine, SAE_ID)
    engine.dispose()
    llm_explanations_path(run).unlink()
    load_run(run, empty_url)
    with client_of(empty_url) as client:  # none: the list is empty, and no stat is drawn
        quality = client.get(URLs().sae(SAE_ID, fmt="json")).json()["sae"]["quality"]
        assert quality["detection"] == [] and "LLM detection" not in client.get(URLs().sae(SAE_ID)).text


def test_a_database_loaded_before_the_kept_summaries_gets_them_when_migrated(run, empty_url):
    """Detection per model and explainability are kept with the SAE by the loader (migration
    0009); an SAE loaded before gets the same from its rows when the database is upgraded."""
    from app.db import downgrade, upgrade

    write(run, record(CAT, "the word cat", (3, 2, 5, 0)), record(6, "six", (2, 3, 3, 2), model="OtherLM"))
    load_run(run, empty_url)
    with client_of(empty_url) as client:
        loaded = client.get(URLs().sae(SAE_ID, fmt="json")).json()["sae"]["quality"]
    assert [d["source"] for d in loaded["detection"]] == ["TestLM", "OtherLM"]
    assert loaded["explainability"]["latents"] > 0
    downgrade(empty_url, "0008")  # the summaries' columns go, the rows they come from stay
    upgrade(empty_url)
    with client_of(empty_url) as client:
        assert client.get(URLs().sae(SAE_ID, fmt="json")).json()["sae"]["quality"] == loaded


class CellText(HTMLParser):
    """The text of each <td class="..."> cell with a class, in order."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted, self.cells, self.depth = wanted, [], 0

    @classmethod
    def of(cls, html: str, wanted: str) -> list[str]:
        parser = cls(wanted)
        parser.feed(html)
        return [" ".join(cell.split()) for cell in parser.cells]

    def handle_starttag(self, tag, attrs):
        if tag == "td" and self.wanted in (dict(attrs).get("class") or "").split():
            self.cells.append("")
            self.depth = 1
        elif self.depth and tag == "td":
            self.depth += 1

    def handle_endtag(self, tag):
        if self.depth and tag == "td":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.cells[-1] += data


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def explained_server(tmp_path_factory):
    from tests.app.servers import free_port, running_server

    run = make_run(tmp_path_factory.mktemp("explained") / "run")
    write(run, record(CAT, "the word cat after the article 'the'", (3, 2, 5, 0)),
          record(5, "the body of an exception handler: the lines after except", (5, 0, 4, 1)),
          record(5, HOSTILE, (3, 2, 3, 2), model="OtherLM"))
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'explained.db'}"
    load_run(run, url)
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"], port) as (base, _):
        yield base


@pytest.mark.parametrize("width", [1280, 390])
def test_explanations_fit_the_page_and_markup_stays_text(explained_server, browser, width):
    from tests.app.servers import SHOTS

    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    urls = URLs()
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, path in [("feature", urls.feature(SAE_ID, 5)), ("list", urls.sae(SAE_ID, sort="index", order="asc", per_page=10))]:
        page.goto(explained_server + path)
        if name == "list":
            page.locator("#latents").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / f"llm-explanations-{name}-{width}.png"))
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{name} overflows at {width} px"
        assert page.locator("img[src=x]").count() == 0  # the hostile explanation is text
        assert page.get_by_text(HOSTILE).count() >= 1
    box = page.goto(explained_server + urls.feature(SAE_ID, 5)) and page.locator(".explanation-box")
    first = box.locator(".explanation-text").first.inner_text()
    assert first == "the body of an exception handler: the lines after except"
    assert "by TestLM · 10 contexts" in box.inner_text() and "by OtherLM" in box.inner_text()
    assert problems == []
    page.close()
