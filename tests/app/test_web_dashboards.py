"""The feature dashboards, the SAE page's density histogram and filters, and search, through the
real app over the loaded databases (SQLite and PostgreSQL: every test taking `client` runs on
both)."""

from __future__ import annotations

import re

import pytest

from app.features import SNIPPET_AFTER, SNIPPET_BEFORE
from tests.app.test_web_pages import Page
from tests.app.webrun import (
    CAT,
    DEAD,
    DEF_LATENT,
    DEF_TOKEN,
    FEW,
    HOSTILE_EXPLANATION,
    N_LATENTS,
    QUANTILE_BINS,
    SAMPLES_PER_BIN,
    T,
    TRAIN_CURVE,
    TOP_K,
    VOCAB,
)
from trainer.runfolder import load_harvest

HX = {"HX-Request": "true"}


@pytest.fixture(scope="module")
def harvest(run_dir):
    return load_harvest(run_dir)


# ---------------------------------------------------------------- the feature page's JSON


def test_feature_json_has_every_part(synthetic_client, synthetic_sae_id, harvest):
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{FEW}.json").json()
    assert set(data) == {"sae_id", "index", "density", "firings", "n_tokens", "max_activation", "mean_activation",
                         "histogram", "top_examples", "quantiles", "logits", "neighbours", "explanation", "excluded",
                         "prev", "next", "random", "url", "sae_url", "across_sizes", "ablation", "ablation_url",
                         "explanations"}
    assert data["across_sizes"] is None  # not a rung of a ladder (tests/app/test_web_ladders.py)
    assert data["n_tokens"] == 10_000 and data["firings"] == round(data["density"] * 10_000)
    histogram = data["histogram"]
    assert histogram["counts"] == harvest.histogram[FEW].tolist()
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    assert histogram["edges"][0] == 0 and histogram["edges"][-1] == pytest.approx(data["max_activation"])
    assert len(data["top_examples"]) == 3  # it fired in three contexts only
    bins = [q["bin"] for q in data["quantiles"]]
    assert bins == list(range(QUANTILE_BINS, 0, -1))  # highest bin first
    assert [len(q["examples"]) for q in data["quantiles"]] == [SAMPLES_PER_BIN] * (QUANTILE_BINS - 1) + [1]
    edges = harvest.quantile_edges[FEW].tolist()
    for q in data["quantiles"]:
        assert (q["low"], q["high"]) == pytest.approx((edges[q["bin"] - 1], edges[q["bin"]]))
        assert q["share"] == pytest.approx(1 / QUANTILE_BINS)
        for example in q["examples"]:
            assert example["activation"] == example["activations"][example["position"]]
            start, end = example["snippet"]
            assert start == max(0, example["position"] - SNIPPET_BEFORE) and end == min(T, example["position"] + SNIPPET_AFTER + 1)
    sampled = sorted(harvest.quantile_position[FEW][harvest.quantile_context[FEW] >= 0].tolist())
    assert sorted(e["position"] for q in data["quantiles"] for e in q["examples"]) == sampled


def test_feature_json_logits_neighbours_explanation(synthetic_client, synthetic_sae_id, harvest):
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0.json").json()
    top = data["logits"]["top"]
    assert [t["token_id"] for t in top] == harvest.logit_top_ids[0].tolist()
    assert [t["token"] for t in top] == [VOCAB[i] for i in harvest.logit_top_ids[0].tolist()]
    assert [t["value"] for t in top] == sorted((t["value"] for t in top), reverse=True)
    bottom = [t["value"] for t in data["logits"]["bottom"]]
    assert bottom == sorted(bottom) and all(v < 0 for v in bottom)
    assert data["logits"]["histogram"]["edges"][0] == -1 and data["logits"]["histogram"]["edges"][-1] == 1
    neighbours = data["neighbours"]
    assert [n["index"] for n in neighbours] == harvest.neighbour_index[0].tolist()
    assert [n["cosine"] for n in neighbours] == pytest.approx(harvest.neighbour_cosine[0].tolist(), abs=1e-6)
    assert neighbours[0]["url"] == f"/saes/{synthetic_sae_id}/features/{neighbours[0]['index']}.json"
    explanation = data["explanation"]
    assert explanation["text"] == HOSTILE_EXPLANATION and explanation["patterns"] == [[5, 6]]
    assert (explanation["precision"], explanation["recall"]) == (0.9, 0.5)
    assert explanation["f1"] == pytest.approx(2 * 0.9 * 0.5 / 1.4)
    assert data["excluded"] == {"positions": [0], "token_ids": [0], "tokens": ["<|bos|>"]}
    assert data["random"] == f"/saes/{synthetic_sae_id}/random.json"
    top_example = data["top_examples"][0]
    assert top_example["position"] == 3 and top_example["activation"] == pytest.approx(5.0)


def test_dead_latent_json(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{DEAD[0]}.json").json()
    assert data["explanation"] is None and data["top_examples"] == [] and data["quantiles"] == []
    assert data["firings"] == 0 and sum(data["histogram"]["counts"]) == 0


# ---------------------------------------------------------------- the feature page


def test_feature_page_charts_have_labelled_axes_and_bar_titles(synthetic_client, synthetic_sae_id, harvest):
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}").text
    charts = re.findall(r'<svg class="chart [^"]*".*?</svg>', html, re.S)
    assert len(charts) == 2
    activations, logits = charts
    assert re.findall(r'<text class="axis-label [xy]"[^>]*>([^<]*)</text>', activations) == ["activation", "firings"]
    assert re.findall(r'<text class="axis-label [xy]"[^>]*>([^<]*)</text>', logits) == ["logit effect", "tokens"]
    titles = re.findall(r'<g class="bin"><title>([^<]*)</title>', activations)
    counts = harvest.histogram[CAT].tolist()
    assert len(titles) == len(counts)
    assert all(title.endswith(f": {count:,} firings ({count / sum(counts):.1%})") for title, count in zip(titles, counts))


def test_feature_page_explains_its_numbers(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}").text
    for label, meaning in [("Density", "Share of the harvest's tokens"), ("Firings", "Harvest tokens it fires on"),
                           ("Max activation", "largest activation"), ("Mean activation", "average activation")]:
        assert re.search(rf'<div class="stat" title="[^"]*{meaning}[^"]*"><span class="label">{label}</span>', page), label
    assert 'title="Of the held-out tokens where this pattern occurs' in page  # precision
    assert 'title="Of the held-out tokens where the latent fires' in page  # recall
    assert "token n-gram patterns, scored on held-out contexts." in page and "measured on 12 held-out" in page
    assert re.search(r"leaves out\s+position 0 of each context", page)
    assert '<code class="tok-plain" title="token id 0">&lt;|bos|&gt;</code>' in page  # the excluded token, escaped
    assert '<mark class="fires" title="the token it fires on">·cat</mark>' in page


def test_hostile_explanation_is_text(synthetic_client, synthetic_sae_id):
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0").text
    assert html.count("<script") == 2  # htmx and static/app.js only
    assert '&lt;script&gt;<mark class="fires" title="the token it fires on">alert(1)</mark>' in html


def test_feature_page_links(synthetic_client, synthetic_sae_id, harvest):
    parsed = Page(synthetic_client.get(f"/saes/{synthetic_sae_id}/features/5").text)
    neighbours = [int(link.rsplit("/", 1)[1]) for link in parsed.links if re.fullmatch(rf"/saes/{synthetic_sae_id}/features/\d+", link)]
    assert neighbours[:2] == [4, 6]  # previous, next
    assert set(harvest.neighbour_index[5].tolist()) <= set(neighbours)
    assert f"/saes/{synthetic_sae_id}/random" in parsed.links
    assert f"/saes/{synthetic_sae_id}/features/5?context=full" in parsed.links


def contexts(html: str) -> list[int]:
    """Tokens shown per example context."""
    return [len(re.findall(r'<span class="tok', context)) for context in re.findall(r'<div class="context">(.*?)</div>', html, re.S)]


def test_snippet_by_default_full_on_request(synthetic_client, synthetic_sae_id):
    snippet = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}").text
    assert 'aria-current="true" class="active">Snippet' in snippet
    assert all(n <= SNIPPET_BEFORE + SNIPPET_AFTER + 1 for n in contexts(snippet)) and max(contexts(snippet)) < T
    full = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}", params={"context": "full"}).text
    n_examples = TOP_K + QUANTILE_BINS * SAMPLES_PER_BIN
    assert contexts(full) == [T] * n_examples
    assert 'aria-current="true" class="active">Full context' in full
    assert '<input type="hidden" id="try-context" name="context" value="full">' in full  # the try box keeps the state
    assert '<input type="hidden" id="try-context" name="context" value="full" disabled>' in snippet
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0", params={"context": "wide"}).status_code == 422


def test_examples_fragment_for_htmx(synthetic_client, synthetic_sae_id):
    response = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}", params={"context": "full"}, headers=HX | {"HX-Target": "examples"})
    fragment = response.text
    assert fragment.lstrip().startswith('<section id="examples"') and "<html" not in fragment
    assert "HX-Request" in response.headers["Vary"].split(", ")
    # the try box's form learns the new window out of band
    assert '<input type="hidden" id="try-context" name="context" value="full" hx-swap-oob="true">' in fragment
    assert 'hx-get="/saes/{0}/features/{1}" hx-target="#examples"'.format(synthetic_sae_id, CAT) in fragment  # back to snippets
    # another target (or none) gets the whole page
    assert "<html" in synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}", headers=HX | {"HX-Target": "other"}).text


def test_try_box_says_why_it_cannot_run(synthetic_client, synthetic_sae_id):
    """The tests' run names a model no server has: the page says so before and after a try."""
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}").text
    assert 'hx-target="#try-result"' in page and 'hx-push-url="true"' in page
    assert "cannot run on new text on this server" in page
    fragment = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}", params={"text": "the cat"},
                          headers=HX | {"HX-Target": "try-result"}).text
    assert fragment.startswith('<div id="try-result"') and '<p class="error">' in fragment
    assert "cannot run on new text here" in fragment
    # the window toggle's links learn the typed text out of band
    assert '<nav class="toggle" id="window-toggle" aria-label="context window" hx-swap-oob="true">' in fragment
    assert f'href="/saes/{synthetic_sae_id}/features/{CAT}?context=full&amp;text=the+cat"' in fragment


def test_random_latent_is_a_redirect_to_one_that_fired(synthetic_client, synthetic_sae_id):
    seen = set()
    for _ in range(40):
        response = synthetic_client.get(f"/saes/{synthetic_sae_id}/random", follow_redirects=False)
        assert response.status_code == 303 and response.headers["Cache-Control"] == "no-store"
        index = int(re.fullmatch(rf"/saes/{synthetic_sae_id}/features/(\d+)", response.headers["Location"]).group(1))
        seen.add(index)
    assert not seen & set(DEAD) and len(seen) > 10
    assert synthetic_client.get("/saes/nope/random", follow_redirects=False).status_code == 404
    twin = synthetic_client.get(f"/saes/{synthetic_sae_id}/random.json", follow_redirects=False)
    assert twin.status_code == 303 and re.fullmatch(rf"/saes/{synthetic_sae_id}/features/\d+\.json", twin.headers["Location"])
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}/random.json").json()["sae_id"] == synthetic_sae_id
    assert synthetic_client.get("/saes/nope/random.json").json() == {"detail": "no SAE 'nope'"}


# ---------------------------------------------------------------- the SAE page


def test_sae_page_density_histogram(synthetic_client, synthetic_sae_id):
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}").text
    chart = re.search(r'<svg class="chart densities".*?</svg>', html, re.S).group()
    assert re.findall(r'<text class="axis-label [xy]"[^>]*>([^<]*)</text>', chart) == [
        "density: share of tokens it fires on (log scale)", "latents"]
    assert '<text class="marker-label"' in chart and ">dense</text>" in chart
    assert re.search(r'<span class="label">Dead</span><span class="value">2</span>', html)  # in the harvest
    # evaluation's count on its held-out tokens, as a number of latents and a share of them
    evaluated = re.search(r'title="Latents that never fired on ([\d,]+) held-out tokens[^"]*"><span class="label">Dead</span>'
                          r'<span class="value">(\d+) <span class="muted small">([^<]+)</span>', html)
    assert evaluated.groups() == ("2,048", str(len(DEAD)), f"{100 * len(DEAD) / N_LATENTS:#.3g}".rstrip(".") + "%")
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}.json").json()["sae"]
    histogram = data["density_histogram"]
    assert histogram["dead"] == len(DEAD) and sum(histogram["counts"]) == N_LATENTS - len(DEAD)
    assert histogram["dense"] == 0 and histogram["dense_threshold"] == 0.1
    assert data["n_explained"] == N_LATENTS - len(DEAD) and data["harvest"]["excluded_positions"] == [0]


def test_sae_page_training_curve(synthetic_client, synthetic_sae_id):
    """metrics.json's train_curve as two charts (the batches' FVU, log-log; AuxK's dead latents),
    a point per record with its numbers on hover; the metrics table leaves the raw lists out."""
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}").text
    fvu = re.search(r'<svg class="chart training fvu".*?</svg>', html, re.S).group()
    dead = re.search(r'<svg class="chart training dead".*?</svg>', html, re.S).group()
    assert re.findall(r'<text class="axis-label [xy]"[^>]*>([^<]*)</text>', fvu) == ["tokens trained on (log scale)", "FVU (log scale)"]
    assert re.findall(r'<text class="axis-label [xy]"[^>]*>([^<]*)</text>', dead) == ["tokens trained on (log scale)", "dead latents"]
    for tokens, value, n_dead in zip(TRAIN_CURVE["tokens"], TRAIN_CURVE["fvu"], TRAIN_CURVE["dead"]):
        assert f"<title>{tokens:,} tokens: FVU {value:.4g}, {n_dead:,} dead</title>" in fvu
    assert "<th>train_curve</th>" not in html and "<th>train_tokens</th>" in html
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}.json").json()["sae"]["metrics"]["train_curve"] == TRAIN_CURVE


def test_sae_latents_sorted_by_explanation_score(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={"sort": "explanation_f1", "per_page": 100}).json()
    scores = [latent["explanation_f1"] for latent in data["latents"]]
    assert data["total"] == len(scores) == N_LATENTS - len(DEAD)  # scored explanations only
    assert scores == sorted(scores, reverse=True) and data["latents"][0]["index"] == CAT
    assert data["latents"][0]["explanation"] == "the⟦ cat⟧"
    worst = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={"sort": "explanation_f1", "order": "asc", "per_page": 5}).json()
    assert worst["latents"][0]["explanation_f1"] == min(scores)
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}").text
    assert '<mark class="fires" title="the token it fires on">·cat</mark>' in html  # explanations in the list


def test_sae_latents_filtered_by_density(synthetic_client, synthetic_sae_id, harvest):
    density = harvest.density.tolist()
    live = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={"hide_dead": 1, "sort": "density", "order": "asc", "per_page": 100}).json()
    assert live["total"] == N_LATENTS - len(DEAD) and min(latent["density"] for latent in live["latents"]) > 0
    assert live["filters"] == {"min_density": None, "max_density": None, "hide_dead": True, "hide_dense": False}
    low, high = 0.01, 0.03
    band = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={"min_density": low, "max_density": high, "sort": "max_activation",
                                                      "per_page": 5}).json()
    expected = sorted((i for i, d in enumerate(density) if low <= d <= high),
                      key=lambda i: (-harvest.max_activation[i].item(), -i))
    assert band["total"] == len(expected) and [latent["index"] for latent in band["latents"]] == expected[:5]
    assert "min_density=0.01&max_density=0.03" in band["next"]  # the next page keeps the filter
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}", params={"hide_dead": 1, "per_page": 10}).text
    parsed = Page(html)
    assert f"/saes/{synthetic_sae_id}?sort=density&order=desc&page=2&per_page=10&hide_dead=1" in parsed.links
    assert f"/saes/{synthetic_sae_id}?sort=index&order=asc&per_page=10&hide_dead=1" in parsed.links  # sorting keeps it too (index from 0)
    assert f"/saes/{synthetic_sae_id}?sort=max_activation&order=desc&per_page=10&hide_dead=1" in parsed.links  # the rest largest first
    assert 'name="hide_dead" value="1" checked' in html
    # the form sends its empty fields too: no bound, not a bad number
    form = synthetic_client.get(f"/saes/{synthetic_sae_id}", params={"min_density": "", "max_density": "", "hide_dead": 1, "per_page": 10})
    assert form.status_code == 200 and f"/saes/{synthetic_sae_id}?sort=density&order=desc&page=2&per_page=10&hide_dead=1" in Page(form.text).links


@pytest.mark.parametrize("params", [{"min_density": -0.1}, {"max_density": 1.5}, {"sort": "explanation"},
                                    {"hide_dead": "maybe"}])
def test_bad_filters_are_422(synthetic_client, synthetic_sae_id, params):
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params=params).status_code == 422


# ---------------------------------------------------------------- search


def test_search_by_token_leading_space_counts(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": " def"}).json()
    assert [match["token"] for match in data["tokens"]] == [" def", "def"]  # as typed first, then stripped
    first = data["tokens"][0]
    assert first["token_id"] == DEF_TOKEN and first["latents"][0]["index"] == DEF_LATENT
    assert first["latents"][0]["mean_activation"] == 3.0
    means = [hit["mean_activation"] for hit in first["latents"]]
    assert means == sorted(means, reverse=True)
    assert first["latents"][0]["url"] == f"/saes/{synthetic_sae_id}/features/{DEF_LATENT}"
    stripped = synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": "def"}).json()
    assert [match["token"] for match in stripped["tokens"]] == ["def", " def"]


def test_search_by_explanation_words(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": "cat"}).json()
    assert data["terms"] == ["cat"] and data["explanations"][0]["index"] == CAT
    assert all("cat" in hit["explanation"] for hit in data["explanations"])
    scores = [hit["explanation_f1"] for hit in data["explanations"]]
    assert scores == sorted(scores, reverse=True)
    both = synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": "The CAT"}).json()  # every word, any case
    assert [hit["index"] for hit in both["explanations"]] == [CAT]
    assert synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": "zebra"}).json()["explanations"] == []


def test_search_by_number_and_defaults(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get("/search.json", params={"q": "#5"}).json()  # no sae: the first SAE
    assert data["sae"] == synthetic_sae_id and data["latent"]["index"] == 5
    assert synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": str(N_LATENTS)}).json()["latent"] is None
    empty = synthetic_client.get("/search.json", params={"sae": synthetic_sae_id}).json()
    assert (empty["q"], empty["tokens"], empty["explanations"], empty["latent"]) == ("", [], [], None)
    assert synthetic_client.get("/search.json", params={"sae": "nope", "q": "x"}).status_code == 404
    assert synthetic_client.get("/search", params={"sae": "nope", "q": "x"}).status_code == 404
    assert synthetic_client.get("/search.json", params={"q": "x" * 201}).status_code == 422


def test_search_page(synthetic_client, synthetic_sae_id):
    html = synthetic_client.get("/search", params={"sae": synthetic_sae_id, "q": "<script>"}).text
    assert html.count("<script") == 2 and "&lt;script&gt;" in html  # htmx and static/app.js only
    parsed = Page(html)
    assert ("application/json", f"/search.json?sae={synthetic_sae_id}&q=%3Cscript%3E") in parsed.alternates
    page = synthetic_client.get("/search", params={"sae": synthetic_sae_id, "q": " def"}).text
    assert '<code class="tok-plain" title="token id 20">·def</code>' in page
    assert f'href="/saes/{synthetic_sae_id}/features/{DEF_LATENT}"' in page
    fragment = synthetic_client.get("/search", params={"sae": synthetic_sae_id, "q": "cat"}, headers=HX | {"HX-Target": "search-results"}).text
    assert fragment.startswith('<div id="search-results"') and f'href="/saes/{synthetic_sae_id}/features/{CAT}"' in fragment


def test_header_search_box_searches_the_page_sae(synthetic_client, synthetic_sae_id):
    for path in (f"/saes/{synthetic_sae_id}", f"/saes/{synthetic_sae_id}/features/3"):
        header = synthetic_client.get(path).text.split("</header>")[0]
        assert 'action="/search"' in header and f'<input type="hidden" name="sae" value="{synthetic_sae_id}">' in header
    assert 'name="sae"' not in synthetic_client.get("/").text.split("</header>")[0]


def test_openapi_documents_the_new_routes(synthetic_client):
    schema = synthetic_client.get("/openapi.json").json()
    assert "/search.json" in schema["paths"]
    feature = schema["components"]["schemas"]["FeatureOut"]["properties"]
    assert {"histogram", "quantiles", "logits", "neighbours", "explanation", "excluded", "random"} <= set(feature)


def test_quantile_examples_come_strongest_first(synthetic_client, synthetic_sae_id):
    """The harvest samples each bin's firings in no order; the page lists them strongest first."""
    quantiles = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}.json").json()["quantiles"]
    listed = [[example["activation"] for example in q["examples"]] for q in quantiles]  # the value shown
    assert sum(len(values) > 1 for values in listed) >= 2
    assert all(values == sorted(values, reverse=True) for values in listed)


def test_a_page_past_the_last_says_so_and_links_the_last(synthetic_client, synthetic_sae_id):
    from tests.app.webrun import N_LATENTS

    last = -(-N_LATENTS // 10)
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}", params={"page": last + 5, "per_page": 10})
    assert page.status_code == 200
    assert f"There is no page {last + 5}: the list has {last}, <a href=\"/saes/{synthetic_sae_id}?sort=density&amp;order=desc&amp;page={last}&amp;per_page=10\">the last</a>." in page.text
