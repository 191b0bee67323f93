"""Search by meaning (full text, ranked) on both backends over a small run built so that each
latent fires on one known word in one known context, and find by example on the tiny real model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.fulltext import COLUMN_WEIGHTS, fts5_query, query_words, tsquery
from app.loader import load_run
from app.main import create_app
from app.search_documents import ExplanationText, identifier_parts, index_words, search_documents
from app.python_roles import roles
from app.settings import Settings
from tests.app.databases import BACKENDS, empty_database
from tests.app.servers import SHOTS, free_port, running_server
from tests.app.webrun import explanation, make_cfg, make_run, write_weights
from tests.synthetic import random_harvest
from trainer.runconfig import RunConfig
from trainer.runfolder import Harvest, load_harvest, save_harvest, save_metrics

T = 14
# Each latent's one context (its tokens) and the position it fires on, and its explanation.
CASES = {
    "explained": ([" x", " =", " 1", "\n"], 0, "error"),  # "error" in its explanation only
    "key_error": ([" raise", " Key", "Error", "(", ")", "\n"], 2, None),  # fires on the word KeyError
    "near_error": ([" error", " =", " x", "\n"], 2, None),  # "error" just before where it fires
    "snake": ([" self", ".", "error", "_handler", "(", ")", "\n"], 3, None),  # fires on error_handler
    "in_except": ([" try", ":", "\n", "    ", " x", "\n", " except", ":", "\n", "    ", " pass", "\n"], 10, None),
    "handler_explained": ([" pass", "\n"], 0, "exception handler body"),
    "hostile": ([" y", "\n"], 0, 'say "NEAR" - * : ^ ( ) AND OR NOT'),
    "camel": ([" HTTPServer2", "(", ")", "\n"], 0, None),
}
NAMES = list(CASES)
LATENT = {name: i for i, name in enumerate(NAMES)}
N_LATENTS = 16  # the rest never fire


def build_run(run_dir: Path) -> Path:
    vocab = ["<|bos|>", *sorted({token for tokens, _, _ in CASES.values() for token in tokens}), " filler"]
    ids = {token: i for i, token in enumerate(vocab)}
    harvest = random_harvest(N_LATENTS, vocab, K=2, T=T, C=len(CASES), Q=2, S=1, seed=3)
    h = {name: tensor.numpy().copy() for name, tensor in harvest.tensors.items()}
    h["token_ids"][:] = ids[" filler"]
    h["top_context"][:] = -1
    h["top_activations"][:] = 0
    h["quantile_context"][:] = -1  # two firings per latent, on the same token: its top example's and one sample
    explanations = [explanation("", [], None, None) for _ in range(N_LATENTS)]
    for latent, (tokens, position, text) in enumerate(CASES.values()):
        h["token_ids"][latent, 1:1 + len(tokens)] = [ids[token] for token in tokens]  # position 0: left out
        h["top_context"][latent, 0] = latent
        h["top_activations"][latent, 0, 1 + position] = 2.0
        h["quantile_context"][latent, 0, 0], h["quantile_position"][latent, 0, 0] = latent, 1 + position
        if text:
            explanations[latent] = explanation(text, [[ids[tokens[position]]]], 0.9, 0.8)
    h["top_max"] = h["top_activations"].max(-1).astype(np.float32)
    h["max_activation"] = h["top_max"][:, 0].copy()
    h["density"][len(CASES):] = 0
    RunConfig(model="test/Search-Model", layer=2, d_in=8, n_latents=N_LATENTS, k=4).save(run_dir)
    write_weights(run_dir, 8, N_LATENTS, 0)
    save_metrics(run_dir, {"fvu": 0.1, "l0": 4.0, "dead_fraction": 0.5})
    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in h.items()}
    save_harvest(run_dir, Harvest(tensors=tensors, explanations=explanations, vocab=vocab, info=harvest.info))
    return run_dir


@pytest.fixture(scope="module", params=BACKENDS)
def client(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    with empty_database(request.param, folder) as url:
        sae_id = load_run(build_run(folder / "run"), url)
        with TestClient(create_app(Settings(database_url=url))) as test_client:
            test_client.sae_id = sae_id
            yield test_client
        test_client.app.state.engine.dispose()


def ranked(client, q: str) -> list[int]:
    response = client.get("/search.json", params={"sae": client.sae_id, "q": q})
    assert response.status_code == 200, (q, response.text)
    return [hit["index"] for hit in response.json()["ranked"]]


# ---------------------------------------------------------------- words


def test_identifiers_split_into_lower_cased_parts():
    assert identifier_parts("KeyError") == ["key", "error"]
    assert identifier_parts("error_handler") == ["error", "handler"]
    assert identifier_parts("HTTPServer2") == ["http", "server", "2"]
    assert identifier_parts("utf8") == ["utf", "8"] and identifier_parts("error") == []
    assert index_words("raise KeyError(self.error_handler)") == ["raise", "keyerror", "key", "error", "self", "error", "handler"]
    assert query_words('"NEAR" - * : ^ KeyError error_handler') == ["near", "keyerror", "error", "handler"]


def test_python_roles_come_from_the_tokenizer_and_pydoc():
    text = 'for x in y:  # each\n    print("%d" % x)\n'
    found = {text[start:end]: role for start, end, role in roles(text)}
    assert found["for"].startswith("the for statement") and "looping" in found["for"].split()
    assert found["# each"] == "comment"
    assert found['"%d"'] == "string literal" and found["%"] == "operators formatting"
    assert "function definitions" in roles("def f(): pass\n")[0][2]
    assert {"exception", "handlers", "exceptions"} <= set(roles("try:\n    pass\nexcept KeyError:\n    pass\n")[0][2].split())
    inside = 'the value.\n    """\n    if x:\n        return 1\n'  # a context that starts in a docstring
    found = {inside[start:end]: role for start, end, role in roles(inside)}
    assert found['the value.\n    """'] == "string literal docstring" and found["if"].startswith("the if statement")


def test_queries_are_quoted_terms_never_syntax():
    assert fts5_query(["or", "handling", "x"]) == '"or" OR "handling" OR "handling"* OR "x"'
    assert tsquery(["or", "handling"]) == "'or' | 'handling' | 'handling':*"
    assert query_words("") == [] and query_words("*:-^()") == []


def test_the_document_takes_explanations_from_every_source():
    """The builder's explanations are (latent, source, text) rows: a second source's text (a
    language model's, say) is searched beside the n-gram pattern."""
    arrays = {"density": np.ones(2), "top_context": np.array([[0], [-1]]), "top_activations": np.array([[[0, 1.0]], [[0, 0]]]),
              "quantile_context": -np.ones((2, 1, 1), dtype=np.int64), "quantile_position": np.zeros((2, 1, 1), dtype=np.int64),
              "token_ids": np.array([[0, 1]])}
    rows = search_documents(arrays, [" raise", " ValueError"], [
        ExplanationText(0, "ngram", "⟦ ValueError⟧"), ExplanationText(0, "llm", "raising an exception"),
        ExplanationText(7, "llm", "a latent the SAE does not have")])
    assert rows["explanation"] == ["valueerror value error . raising an exception", ""]
    assert rows["fires_on"] == ["valueerror value error", ""]
    assert rows["context"] == ["", ""]  # a word around one firing only is left out
    assert json.loads(rows["top_tokens"][0]) == [" ValueError"] and json.loads(rows["top_tokens"][1]) == []


def test_migration_weights_are_the_query_layers():
    from importlib import import_module

    migration = import_module("app.migrations.versions.0008_search_by_meaning")
    assert migration.SQLITE_RANK == f"bm25({', '.join(map(str, COLUMN_WEIGHTS))}, 0.0, 0.0, 0.0)"


# ---------------------------------------------------------------- on both backends


def test_error_finds_identifiers_that_contain_it(client):
    found = ranked(client, "error")
    assert {LATENT["key_error"], LATENT["snake"], LATENT["explained"], LATENT["near_error"]} <= set(found)
    assert ranked(client, "KeyError")[0] == LATENT["key_error"]
    assert ranked(client, "Error_Handler")[0] == LATENT["snake"]  # any case, any separator
    assert ranked(client, "server")[0] == LATENT["camel"] and ranked(client, "http")[0] == LATENT["camel"]


def test_stemming_handling_finds_handler(client):
    found = ranked(client, "handling")
    assert LATENT["snake"] in found and LATENT["handler_explained"] in found
    assert LATENT["in_except"] in ranked(client, "exceptions")  # exceptions -> except, before the token it fires on


def test_ranking_explanation_then_firing_word_then_context(client):
    found = ranked(client, "error")
    order = [found.index(LATENT[name]) for name in ("explained", "key_error", "near_error")]
    assert order == sorted(order), found
    both = ranked(client, "exception handling")
    assert both[0] == LATENT["handler_explained"] and LATENT["in_except"] in both[1:]  # both words beat one


@pytest.mark.parametrize("q", ['"', '""', '"unbalanced', "*", "x*", "NEAR", "NEAR(x y)", "near/2", "-", "-x", "x -y",
                               ":", "fires_on:x", "explanation : error", "^x", "(", ")", "AND", "OR", "NOT", "x AND",
                               "{x}", "'", "\\", "x' | 'y", "x & !y", "x <-> y", "%", "_", "\u200b", "ß" * 50,
                               " ".join(f"w{i}" for i in range(50)), "a" * 200])
def test_special_characters_are_text(client, q):
    response = client.get("/search.json", params={"sae": client.sae_id, "q": q})
    assert response.status_code == 200, response.text
    assert client.get("/search", params={"sae": client.sae_id, "q": q}).status_code == 200


def test_fts_operators_in_a_query_match_as_words(client):
    assert ranked(client, "NEAR")[0] == LATENT["hostile"]
    assert ranked(client, '"NEAR" OR') [0] == LATENT["hostile"]  # the words near and or: its explanation has both
    assert ranked(client, "") == [] and ranked(client, "  ") == []


def test_too_long_query_is_422_and_other_results_stay(client):
    assert client.get("/search.json", params={"sae": client.sae_id, "q": "x" * 201}).status_code == 422
    data = client.get("/search.json", params={"sae": client.sae_id, "q": "#3"}).json()
    assert data["latent"]["index"] == 3  # a number still names a latent


def test_results_page_shows_ranked_latents_and_what_they_fire_on(client):
    html = client.get("/search", params={"sae": client.sae_id, "q": "KeyError"}).text
    section = re.search(r'<section class="by-meaning">.*?</section>', html, re.S).group()
    assert f'href="/saes/{client.sae_id}/features/{LATENT["key_error"]}"' in section
    assert '<code class="tok-plain">Error</code>' in section  # the token it fires on
    assert 'name="text"' in html and 'action="/search/example"' in html  # the find-by-example form


def test_reload_and_unload_keep_one_document_per_latent(client):
    from sqlalchemy import text as sql

    from app.loader import unload_sae

    engine = client.app.state.engine
    with engine.connect() as conn:
        count = conn.execute(sql("SELECT count(*) FROM latent_search WHERE sae_id = :s"), {"s": client.sae_id}).scalar_one()
    assert count == N_LATENTS


def test_unload_removes_the_documents(tmp_path):
    from sqlalchemy import text as sql

    from app.db import make_engine
    from app.loader import unload_sae

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    sae_id = load_run(build_run(tmp_path / "run"), url)
    engine = make_engine(url)
    try:
        assert unload_sae(engine, sae_id)
        with engine.connect() as conn:
            assert conn.execute(sql("SELECT count(*) FROM latent_search")).scalar_one() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plain_reload_writes_documents_an_older_load_lacks(backend, tmp_path):
    """An SAE loaded before search by meaning existed has no documents: loading the same files
    again writes them, and only them (the SAE's row and its latents stay as they were)."""
    from sqlalchemy import select, text as sql

    from app.db import make_engine
    from app.models import Sae

    with empty_database(backend, tmp_path) as url:
        run = build_run(tmp_path / "run")
        sae_id = load_run(run, url)
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(sql("DELETE FROM latent_search WHERE sae_id = :s"), {"s": sae_id})
                created = conn.execute(select(Sae.created_at)).scalar_one()
            load_run(run, url)
            with engine.connect() as conn:
                assert conn.execute(sql("SELECT count(*) FROM latent_search")).scalar_one() == N_LATENTS
                assert conn.execute(select(Sae.created_at)).scalar_one() == created
        finally:
            engine.dispose()
        with TestClient(create_app(Settings(database_url=url))) as test_client:
            found = test_client.get("/search.json", params={"q": "KeyError", "sae": sae_id}).json()["ranked"]
            assert found[0]["index"] == LATENT["key_error"]


# ---------------------------------------------------------------- find by example (tiny real model)


SNIPPET = "try:\n    value = table[key]\nexcept KeyError:\n    value = None\n"


@pytest.fixture(scope="module")
def tiny_example_db(tmp_path_factory, tiny_model_dir):
    """(database URL, SAE id, run): the synthetic run's SAE sized for the tiny model (d_model 32,
    block 1), so the probe runs."""
    run = make_run(tmp_path_factory.mktemp("example") / "run", model=str(tiny_model_dir), d_in=32, layer=1)
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'example.db'}"
    sae_id = load_run(run, url)
    assert sae_id == make_cfg(str(tiny_model_dir), 32, 1).slug
    return url, sae_id, run


@pytest.fixture(scope="module")
def tiny(tiny_example_db):
    url, sae_id, run = tiny_example_db
    with TestClient(create_app(Settings(database_url=url))) as test_client:
        yield test_client, sae_id, run


def test_find_by_example_ranks_by_activation_times_information(tiny):
    client, sae_id, run = tiny
    density = load_harvest(run).density.numpy()
    rarest = float(density[density > 0].min())  # a latent never seen firing counts as rare as the rarest seen
    found = client.get("/search/example.json", params={"sae": sae_id, "text": SNIPPET, "limit": 100}).json()
    probe = client.post("/api/probe", json={"sae": sae_id, "text": SNIPPET, "top_k": 64, "top_n": 500, "sort": "sum",
                                            "hide_frequent_and_first": False}).json()
    sums = {hit["index"]: hit["sum"] for hit in probe["top_latents"]}
    counted = [token for token in probe["tokens"] if token["position"] >= len(found["excluded_positions"])]
    recount = {}
    for token in counted:
        for hit in token["top_latents"]:
            recount[hit["index"]] = recount.get(hit["index"], 0) + hit["activation"]
    assert found["latents"] and found["n_tokens"] == len(probe["tokens"])
    assert {hit["index"] for hit in found["latents"]} == set(recount)
    for hit in found["latents"]:
        assert hit["sum"] == pytest.approx(recount[hit["index"]], rel=1e-4)
        assert hit["specificity"] == pytest.approx(hit["sum"] * math.log(1 / max(hit["density"], rarest)), rel=1e-4)
        assert hit["url"] == f"/saes/{sae_id}/features/{hit['index']}" and hit["fires_on"]
    scores = [hit["specificity"] for hit in found["latents"]]
    assert scores == sorted(scores, reverse=True)
    assert sums  # the probe saw the same latents fire
    posted = client.post("/api/search/example", json={"sae": sae_id, "text": SNIPPET, "limit": 100}).json()
    assert posted["latents"] == found["latents"]
    assert len(client.get("/search/example.json", params={"sae": sae_id, "text": SNIPPET}).json()["latents"]) <= 20


def test_find_by_example_page_and_fragment(tiny):
    client, sae_id, _ = tiny
    html = client.get("/search/example", params={"sae": sae_id, "text": "<script>alert(1)</script>"}).text
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert re.search(rf'href="/saes/{sae_id}/features/\d+"', html)
    fragment = client.get("/search/example", params={"sae": sae_id, "text": SNIPPET},
                          headers={"HX-Request": "true", "HX-Target": "example-results"}).text
    assert fragment.startswith('<div id="example-results"') and "<html" not in fragment
    assert client.get("/search/example", params={"sae": sae_id}).status_code == 200  # the empty form


def test_find_by_example_limits_and_errors(tiny):
    client, sae_id, _ = tiny
    long = client.post("/api/search/example", json={"sae": sae_id, "text": "x" * 4001})
    assert long.status_code == 413 and "at most 4000" in long.json()["detail"]
    assert client.get("/search/example", params={"sae": sae_id, "text": "x" * 4001}).status_code == 413
    for text in ("", "   ", "a\x01b"):
        assert client.post("/api/search/example", json={"sae": sae_id, "text": text}).status_code == 422
    assert client.post("/api/search/example", json={"sae": sae_id, "text": "x", "limit": 0}).status_code == 422
    assert client.post("/api/search/example", json={"sae": "nope", "text": "x"}).status_code == 404
    assert client.get("/search/example.json", params={"text": "x"}).status_code == 422  # the twin needs the SAE


def test_find_by_example_without_the_model_is_503(client):
    """The search run names a model no server has: the probe's 503, said on the page too."""
    assert client.post("/api/search/example", json={"sae": client.sae_id, "text": "x = 1"}).status_code == 503
    page = client.get("/search/example", params={"sae": client.sae_id, "text": "x = 1"})
    assert page.status_code == 503 and "cannot be loaded on this server" in page.text
    assert page.headers["Cache-Control"] == "no-store"


# ---------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def example_server(tiny_example_db):
    url, sae_id, _ = tiny_example_db
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"], port) as (base, _):
        yield base, sae_id


@pytest.mark.parametrize("width", [1280, 390])
def test_search_page_in_a_browser(example_server, browser, width):
    """Words, then a pasted snippet: both lists link latents; the snippet's view is a link; a
    phone scrolls nothing sideways."""
    base, sae_id = example_server
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base}/search?sae={sae_id}&q=cat")
    page.wait_for_load_state("networkidle")
    assert page.locator("section.by-meaning tbody tr").count() > 0
    page.fill("#example-text", SNIPPET)
    page.click("form.example-form button")
    page.wait_for_selector("#example-results tbody tr")
    rows = page.locator("#example-results tbody tr")
    assert rows.count() == 20 and rows.first.locator("a").get_attribute("href").startswith(f"/saes/{sae_id}/features/")
    assert "/search/example?" in page.url and "text=try" in page.url  # the view is a link
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"search-example-{width}.png"), full_page=True)
    page.goto(f"{base}/search?sae={sae_id}&q=the+cat")
    page.screenshot(path=str(SHOTS / f"search-{width}.png"), full_page=True)
    assert errors == []
    page.close()
