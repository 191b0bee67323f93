"""The probe on a tiny real model: the API equals the trainer's own encoding of the same text,
the whole-text ranking equals aggregates of it, the page shows the same numbers, and the limits
answer with the status codes and messages the README promises."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
import torch
from fastapi.testclient import TestClient
from torch.testing import assert_close

from app.main import create_app
from trainer.thresholds import FREQUENT_THRESHOLD
from app.settings import Settings
from trainer import runfolder
from trainer.inference import LatentEncoder

TEXTS = [
    "def probe(x):\n    return x + 1  # <b>bold</b>",
    "  two leading spaces\n\n\tand a tab",
    "Ünïcödé ✓ — and 😀 emoji",
    "<script>alert(1)</script><img src=x onerror=alert(2)>",
]


@pytest.fixture(scope="module")
def encoder(tiny_run):
    return LatentEncoder.from_run(tiny_run)


@pytest.fixture(scope="module")
def explanations(tiny_run):
    return runfolder.load_harvest(tiny_run).explanations


@pytest.fixture(scope="module")
def density(tiny_run):
    return runfolder.load_harvest(tiny_run).density


def expected_ranking(z: torch.Tensor, density: torch.Tensor, hide: bool, sort: str, top_n: int) -> list[dict]:
    """The whole-text ranking computed the plain way, from the full (T, n) latents."""
    z = z.clone()
    if hide:
        z[:1] = 0  # the first position, as the harvest leaves it out
        z[:, density > FREQUENT_THRESHOLD] = 0
    peak, total, count = z.max(0).values, z.sum(0), (z > 0).sum(0)
    score = peak if sort == "max" else total
    fired = [i for i in range(z.shape[1]) if count[i] > 0]
    fired.sort(key=lambda i: (-score[i].item(), i))
    return [{"index": i, "max": peak[i].item(), "sum": total[i].item(), "n_tokens": int(count[i])} for i in fired[:top_n]]


@pytest.mark.parametrize("text", TEXTS)
def test_api_equals_direct_encoding(tiny_client, tiny_sae_id, encoder, text):
    response = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text, "top_k": 4})
    assert response.status_code == 200, response.text
    result = response.json()
    expected = encoder.encode_text(text)
    assert result["n_tokens"] == len(expected.token_ids)
    assert [t["token"] for t in result["tokens"]] == expected.tokens
    assert [t["token_id"] for t in result["tokens"]] == expected.token_ids
    assert [t["position"] for t in result["tokens"]] == list(range(len(expected.token_ids)))
    values, indices = expected.latents.topk(4, dim=-1)
    for token, vals, idxs in zip(result["tokens"], values.tolist(), indices.tolist()):
        want = [(i, v) for v, i in zip(vals, idxs) if v > 0]
        got = [(latent["index"], latent["activation"]) for latent in token["top_latents"]]
        assert [i for i, _ in got] == [i for i, _ in want]
        assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]), atol=1e-4, rtol=1e-4)


def test_the_beginning_of_text_token_takes_the_first_position(tiny_client, tiny_sae_id, encoder, density):
    """With bos, the model's beginning-of-text token (the tiny GPT-2-style tokenizer's end-of-text,
    its document separator) goes before the text: it is the left-out first position, and the
    text's own first token is encoded after it, and counted."""
    text = TEXTS[0]
    start = encoder.lm.tokenizer.eos_token_id
    ids = [start] + encoder.tokenize(text)
    expected = encoder.encode_ids(ids)
    result = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text, "bos": True, "top_n": 10}).json()
    assert result["bos"] is True and [t["token_id"] for t in result["tokens"]] == ids
    assert result["tokens"][0]["token"] == "<|endoftext|>"
    assert [t["token"] for t in result["tokens"][1:]] == encoder.encode_text(text).tokens
    assert result["excluded_positions"] == [0]
    got = [(r["index"], r["n_tokens"]) for r in result["top_latents"]]
    want = [(r["index"], r["n_tokens"]) for r in expected_ranking(expected, density, True, "max", 10)]
    assert got == want  # the text's first token is among the counted ones
    twin = tiny_client.get("/probe.json", params={"sae": tiny_sae_id, "text": text, "bos": 1}).json()
    assert twin["bos"] is True and twin["url"] == "/probe?" + urlencode({"sae": tiny_sae_id, "text": text, "bos": 1})
    assert tiny_client.get("/probe.json", params={"sae": tiny_sae_id, "text": text}).json()["bos"] is False
    # the page: the box ticked, the token marked, the state kept by the token panel
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text, "bos": 1}).text
    assert 'name="bos" value="1" checked' in page and 'class="tok excluded bos"' in page.replace(" on excluded", " excluded")
    fragment = tiny_client.post("/probe/tokens/1", data={"sae": tiny_sae_id, "text": text, "bos": "1"}, headers={"HX-Request": "true"})
    assert fragment.headers["HX-Replace-Url"] == "/probe?" + urlencode({"sae": tiny_sae_id, "text": text, "bos": 1, "token": 1})


def test_a_text_over_the_token_limit_offers_its_first_tokens(tiny_client, tiny_sae_id, encoder):
    text = TEXTS[0] * 40
    limit = min(512, encoder.lm.max_positions or 512)
    assert len(encoder.tokenize(text)) > limit
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text})
    assert page.status_code == 413 and f"the probe accepts at most {limit}" in page.text
    link = re.search(r'<a class="button" href="([^"]+)">Probe its first (\d+) tokens</a>', page.text)
    assert link and int(link.group(2)) == limit
    shorter = tiny_client.get(link.group(1).replace("&amp;", "&"))
    assert shorter.status_code == 200 and f"<strong>{limit}</strong> tokens through" in shorter.text
    box = shorter.text.split('name="text" rows="6"', 1)[1].split(">", 1)[1]
    assert box.lstrip("\n").startswith("def probe(x):")  # the text's own beginning, in the box


def test_texts_encoded_together_equal_each_alone(encoder):
    """Padding on the right changes nothing a causal model computes for the real tokens, up to the
    rounding of the forward's matmuls (whose blocking differs with the batch's shape): fp32's last
    bits, or bf16's (8-bit mantissa) where the forward runs in it."""
    texts = [encoder.tokenize(text) for text in TEXTS]
    assert len({len(ids) for ids in texts}) > 1  # padding is exercised
    tolerance = 1e-4 if encoder.lm.forward_dtype == torch.float32 else 1e-2
    for ids, together in zip(texts, encoder.encode_topk_batch(texts)):
        alone = encoder.encode_topk(ids)
        assert together.values.shape == (len(ids), encoder.sae.k)
        assert_close(together.values, alone.values, atol=tolerance, rtol=tolerance)
        fired = alone.values > 1e-3  # the order of near-equal values may differ in the last bits
        assert torch.equal(together.indices[fired], alone.indices[fired])


@pytest.mark.parametrize("hide", [True, False])
@pytest.mark.parametrize("sort", ["max", "sum"])
def test_whole_text_ranking_equals_aggregates(tiny_client, tiny_sae_id, encoder, density, explanations, hide, sort):
    text = TEXTS[0] * 3
    body = {"sae": tiny_sae_id, "text": text, "top_n": 10, "sort": sort, "hide_frequent_and_first": hide}
    result = tiny_client.post("/api/probe", json=body).json()
    want = expected_ranking(encoder.encode_text(text).latents, density, hide, sort, 10)
    got = result["top_latents"]
    assert [latent["index"] for latent in got] == [latent["index"] for latent in want]
    for g, w in zip(got, want):
        assert g["n_tokens"] == w["n_tokens"]
        assert_close(torch.tensor([g["max"], g["sum"]]), torch.tensor([w["max"], w["sum"]]), atol=1e-3, rtol=1e-4)
        assert g["density"] == pytest.approx(density[g["index"]].item())
        assert g["explanation"] == (explanations[g["index"]]["text"] or None)  # the harvest's, as loaded
        f1 = explanations[g["index"]]["f1"] if g["explanation"] else None
        assert g["explanation_f1"] == (None if f1 is None else pytest.approx(f1))
        assert g["url"] == f"/saes/{tiny_sae_id}/features/{g['index']}"
    assert result["excluded_positions"] == ([0] if hide else [])
    assert result["hide_frequent_and_first"] is hide and result["frequent_density"] == FREQUENT_THRESHOLD
    if not hide:
        assert got, "latents fire on the text"


def test_the_option_s_name_from_before_frequent_still_counts(tiny_client, tiny_sae_id):
    """`hide_dense_and_first` was the option's name while "dense" also meant the probe's 1 %."""
    body = {"sae": tiny_sae_id, "text": TEXTS[0], "hide_dense_and_first": False}
    assert tiny_client.post("/api/probe", json=body).json()["hide_frequent_and_first"] is False


def test_json_twin_of_the_page_equals_the_api(tiny_client, tiny_sae_id, encoder):
    text = TEXTS[1]
    api = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text}).json()
    twin = tiny_client.get("/probe.json", params={"sae": tiny_sae_id, "text": text})
    assert twin.status_code == 200 and twin.json() == api
    assert api["url"].startswith("/probe?") and tiny_client.get(api["url"]).status_code == 200
    # the url keeps the whole view, as the page's address bar does
    state = {"latent": str(api["tokens"][1]["top_latents"][0]["index"]), "sort": "sum", "all": "1"}
    twin = tiny_client.get("/probe.json", params={"sae": tiny_sae_id, "text": text, **state}).json()
    assert twin["url"] == "/probe?" + urlencode({"sae": tiny_sae_id, "text": text, **state})
    # the highlighted latent over every token, as the page shades it
    latent, highlighted = int(state["latent"]), twin["highlighted"]
    assert api["highlighted"] is None and highlighted["index"] == latent
    assert highlighted["url"] == f"/saes/{tiny_sae_id}/features/{latent}"
    assert_close(torch.tensor(highlighted["activations"]), encoder.encode_text(text).latents[:, latent], rtol=1e-5, atol=1e-5)


def test_page_shows_the_same_numbers(tiny_client, tiny_sae_id, encoder):
    text = TEXTS[0]
    expected = encoder.encode_text(text).latents
    latent = int(expected[1:].max(0).values.argmax())  # a latent that fires after position 0
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text, "latent": latent, "all": 1})
    assert page.status_code == 200
    tips = re.findall(r'data-tip="([^"]*)"', page.text.split('class="context probe-tokens', 1)[1].split("</div>", 1)[0])
    assert tips == [f"#{latent}: {value:.3f}" for value in expected[:, latent].tolist()]
    assert f"Highlighting latent <a href=\"/saes/{tiny_sae_id}/features/{latent}\">#{latent}</a>" in page.text


def test_the_page_says_how_many_frequent_latents_it_hides(tiny_client, tiny_sae_id, encoder, density):
    text = TEXTS[0]
    z = encoder.encode_text(text).latents[1:]  # the counted positions
    hidden = int(((z > 0).any(0) & (density > FREQUENT_THRESHOLD)).sum())
    assert hidden > 0, "the tiny SAE has frequent latents that fire here"
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text}).text
    assert f"fire on more than {FREQUENT_THRESHOLD * 100:g} % of all tokens and say little about one text, do not shade the text; {hidden} of them fire here" in page
    assert f"show frequent latents (firing on more than {FREQUENT_THRESHOLD * 100:g} % of tokens) and the first token" in page
    assert "of them fire here" not in tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text, "all": 1}).text


def test_the_ranking_lists_frequent_latents_dimmed_in_their_place(tiny_client, tiny_sae_id, encoder, density):
    """The text's strongest latents are never hidden: frequent ones that rank as high as the
    rest are listed in their place, marked, not left out."""
    text = TEXTS[0]
    peak = encoder.encode_text(text).latents[1:].max(0).values  # the counted positions
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text}).text
    table = page.split('class="data compact text-latents stack"', 1)[1].split("</table>", 1)[0]
    rows = [(kind, int(i)) for kind, i in
            re.findall(r'<tr class="([^"]*)">\s*(?:\{#[^#]*#\}\s*)?<td><span class="latent-head"><a href="/saes/[^"]+/features/(\d+)"', table)]
    assert rows and rows[0][1] == int(peak.argmax())  # the strongest first, frequent or not
    assert all(("frequent" in kind) == bool(density[i] > FREQUENT_THRESHOLD) for kind, i in rows)
    assert any("frequent" in kind for kind, _ in rows)  # (the tiny SAE's latents are nearly all frequent)
    twin = tiny_client.get("/probe.json", params={"sae": tiny_sae_id, "text": text, "top_n": 25}).json()
    assert [i for kind, i in rows if "frequent" not in kind] == [t["index"] for t in twin["top_latents"]]  # the API's ranking is as it was


def test_token_fragment_lists_that_tokens_latents(tiny_client, tiny_sae_id, encoder):
    text = TEXTS[0]
    expected = encoder.encode_text(text).latents[3]
    fragment = tiny_client.post("/probe/tokens/3", data={"sae": tiny_sae_id, "text": text, "all": "1"}, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    fired = [i for i in expected.argsort(descending=True).tolist() if expected[i] > 0]
    listed = [int(i) for i in re.findall(r'<span class="latent-head"><a href="/saes/[^"]+/features/(\d+)">', fragment.text)]
    assert listed == fired
    assert f"{expected[fired[0]].item():.3f}" in fragment.text and "position 3" in fragment.text
    missing = tiny_client.post("/probe/tokens/999", data={"sae": tiny_sae_id, "text": text}, headers={"HX-Request": "true"})
    assert missing.status_code == 404 and "no token 999" in missing.text


def test_a_tokens_frequent_latents_are_dimmed_in_their_place_not_hidden(tiny_client, tiny_sae_id, encoder, density):
    """Frequent latents stay out of the shading, but a token's panel lists every latent firing on
    it in order of strength, frequent ones dimmed and marked: its strongest may be one of them."""
    text = TEXTS[0]
    for position, z in enumerate(encoder.encode_text(text).latents):
        fired = [i for i in z.argsort(descending=True).tolist() if z[i] > 0]
        frequent = [i for i in fired if density[i] > FREQUENT_THRESHOLD]
        if position > 0 and frequent:  # (nearly every latent of the tiny SAE is frequent)
            break
    fragment = tiny_client.post(f"/probe/tokens/{position}", data={"sae": tiny_sae_id, "text": text}, headers={"HX-Request": "true"}).text
    rows = re.findall(r'<tr class="([^"]*)">\s*<td><span class="latent-head"><a href="/saes/[^"]+/features/(\d+)">', fragment)
    assert [int(i) for _, i in rows] == fired  # every one, strongest first
    assert [int(i) for kind, i in rows if "frequent" in kind] == frequent
    assert fragment.count('<span class="tag" title="fires on more than') == len(frequent)


def test_the_open_token_is_view_state(tiny_client, tiny_sae_id):
    """A focused token's fragment puts the token into the address bar (replaced, not pushed) and
    into the state form, so highlighting keeps its panel open; a page whose address names a token
    opens that panel, and so does its share link."""
    text, latent = TEXTS[0], 7
    fragment = tiny_client.post("/probe/tokens/3", data={"sae": tiny_sae_id, "text": text, "latent": str(latent), "sort": "sum"},
                           headers={"HX-Request": "true"})
    state = {"sae": tiny_sae_id, "text": text, "latent": latent, "sort": "sum", "token": 3}
    assert fragment.headers["HX-Replace-Url"] == "/probe?" + urlencode(state)
    assert '<input type="hidden" id="probe-token" name="token" value="3" hx-swap-oob="true">' in fragment.text

    page = tiny_client.get("/probe", params=state, headers={"HX-Request": "true"}).text
    panel = page.split('<div id="token-detail">', 1)[1].split("</section>", 1)[0]
    assert 'data-position="3"' in panel and "position 3" in panel and "hx-swap-oob" not in panel
    assert '<input type="hidden" id="probe-token" name="token" value="3">' in page
    assert len(re.findall(r'class="tok[^"]* current"', page)) == 1 and 'current" tabindex="0" data-position="3"' in page

    closed = tiny_client.get("/probe", params={**state, "token": 999}).text  # beyond the text: the panel stays closed
    assert "Click a token" in closed and 'id="probe-token" name="token" value="" disabled' in closed
    assert tiny_client.get("/probe", params={**state, "token": "x"}).status_code == 422

    shared = tiny_client.post("/probe/share", data={**state, "all": ""}, follow_redirects=False)
    assert shared.status_code == 303 and shared.headers["location"].endswith("?latent=7&sort=sum&token=3")
    share_page = tiny_client.get(shared.headers["location"]).text
    assert "position 3" in share_page.split('<div id="token-detail">', 1)[1]
    # on the shared page, focusing a token keeps the short link in the address bar
    share_id = shared.headers["location"].split("/p/", 1)[1].split("?", 1)[0]
    assert f"""hx-vals='{{"share": "{share_id}"}}'""" in share_page
    on_share = tiny_client.post("/probe/tokens/5", data={"sae": tiny_sae_id, "text": text, "share": share_id},
                           headers={"HX-Request": "true"})
    assert on_share.headers["HX-Replace-Url"] == f"/p/{share_id}?token=5"


def test_characters_split_over_byte_tokens_show_whole(tiny_client, tiny_sae_id):
    """An emoji or CJK character spans several byte tokens: the API's token pieces join into the
    text, and the page shows each character (on the token that completes it), never U+FFFD,
    with a mark on the tokens that hold its first bytes."""
    text = TEXTS[2]
    result = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text}).json()
    assert "".join(token["token"] for token in result["tokens"]) == text
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text})
    tokens = page.text.split('class="context probe-tokens', 1)[1].split("</div>", 1)[0]
    assert "\ufffd" not in tokens
    assert "😀" in tokens and "✓" in tokens and "Ü" in tokens
    assert '<span class="ws mark">…</span>' in tokens


def test_html_and_script_in_the_text_render_as_text(tiny_client, tiny_sae_id):
    text = TEXTS[3]
    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text})
    assert page.status_code == 200
    body = page.text.split("<main>", 1)[1]
    assert "<script>alert" not in body and "<img" not in body  # no tag of the text's own
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in body  # the text box


def test_token_limit_is_413_naming_it(tiny_db, tiny_sae_id):
    with TestClient(create_app(Settings(database_url=tiny_db, probe_max_tokens=8))) as client:
        response = client.post("/api/probe", json={"sae": tiny_sae_id, "text": TEXTS[0]})
        assert response.status_code == 413
        assert re.fullmatch(r"text is \d+ tokens; the probe accepts at most 8", response.json()["detail"])
        page = client.get("/probe", params={"sae": tiny_sae_id, "text": TEXTS[0]})
        assert page.status_code == 413 and "at most 8" in page.text
        assert client.post("/api/probe", json={"sae": tiny_sae_id, "text": "abc"}).status_code == 200


def test_cache_and_coalescing_give_the_same_result(tiny_client, tiny_sae_id):
    text = "the same text, asked for twice"
    first = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text}).json()
    second = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text}).json()
    assert first == second


def test_preload_loads_every_sae_at_start_up(tiny_db, tiny_sae_id):
    with TestClient(create_app(Settings(database_url=tiny_db, probe_preload=True))) as client:
        assert client.app.state.probe.loaded() == [tiny_sae_id]
    with TestClient(create_app(Settings(database_url=tiny_db))) as client:
        assert client.app.state.probe.loaded() == []  # lazily, on the first probe
        client.post("/api/probe", json={"sae": tiny_sae_id, "text": "x = 1"})
        assert client.app.state.probe.loaded() == [tiny_sae_id]


def test_cli_serve_has_preload():
    from saescope.cli import build_parser

    assert build_parser().parse_args(["serve", "--preload"]).preload is True
    assert build_parser().parse_args(["serve"]).preload is False
