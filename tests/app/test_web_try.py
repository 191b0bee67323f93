"""The feature page's "try your own text" box and the probe's explanations, on a real (tiny,
random) model: the synthetic run's SAE weights sized for it, so the probe really runs."""

from __future__ import annotations

import re
from html import unescape

import pytest
from fastapi.testclient import TestClient

from app.loader import load_run
from app.main import create_app
from app.render import explanation_html
from app.settings import Settings
from tests.app.webrun import make_cfg, make_run
from trainer.runfolder import load_harvest

TEXT = "def greet(name):\n    return 'Hello, ' + name\n"
HX = {"HX-Request": "true", "HX-Target": "try-result"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
    """(client, sae id, run folder): the tests' run pointed at the tiny model (d_model 32, block 1)."""
    run = make_run(tmp_path_factory.mktemp("try") / "run", model=str(tiny_model_dir), d_in=32, layer=1)
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'try.db'}"
    sae_id = load_run(run, url)
    assert sae_id == make_cfg(str(tiny_model_dir), 32, 1).slug
    with TestClient(create_app(Settings(database_url=url))) as client:
        yield client, sae_id, run


def probe_activations(client, sae_id: str, latent: int, text: str) -> list[float]:
    """The latent on every token, from the probe's own JSON (all latents of each token)."""
    data = client.get("/probe.json", params={"sae": sae_id, "text": text, "all": 1, "top_k": 64}).json()
    return [next((hit["activation"] for hit in token["top_latents"] if hit["index"] == latent), 0.0)
            for token in data["tokens"]]


def test_try_box_shows_the_latent_on_every_token(tiny):
    client, sae_id, _ = tiny
    expected = probe_activations(client, sae_id, 7, TEXT)
    fragment = client.get(f"/saes/{sae_id}/features/7", params={"text": TEXT}, headers=HX).text
    assert fragment.startswith('<div id="try-result"') and "<html" not in fragment
    shown = [float(value) for value in re.findall(r'<span class="tok[^"]*" style="[^"]*" title="([0-9.]+)"', fragment)]
    assert shown == pytest.approx(expected, abs=1e-3) and len(shown) > 5
    assert f"Fires on {sum(v > 0 for v in expected)} of {len(expected)} tokens" in fragment
    page = client.get(f"/saes/{sae_id}/features/7", params={"text": TEXT}).text  # the link opens the same view
    assert "cannot run" not in page and 'class="context try-tokens"' in page
    assert unescape(re.search(r'<textarea name="text"[^>]*>(.*?)</textarea>', page, re.S).group(1)) == TEXT


def test_try_box_text_is_text(tiny):
    client, sae_id, _ = tiny
    fragment = client.get(f"/saes/{sae_id}/features/0", params={"text": "<script>alert(1)</script>"}, headers=HX).text
    assert "<script" not in fragment and "&lt;" in fragment


def test_try_box_limits_and_errors(tiny):
    client, sae_id, _ = tiny
    too_long = client.get(f"/saes/{sae_id}/features/0", params={"text": "x" * 4001}, headers=HX)
    assert too_long.status_code == 200 and "at most 4000" in too_long.text  # the page stays; the box says why
    control = client.get(f"/saes/{sae_id}/features/0", params={"text": "a\x01b"}, headers=HX).text
    assert "control character" in control
    assert "<p class=\"muted hint\">" in client.get(f"/saes/{sae_id}/features/0", params={"text": "  "}, headers=HX).text


def shows_explanation(html: str, text: str) -> bool:
    """The explanation as the lists render it (dimmed, with a title, when its F1 is weak)."""
    return re.search(rf'<span class="explanation( weak)?"[^>]*>{re.escape(str(explanation_html(text)))}</span>', html) is not None


def test_probe_results_carry_explanations(tiny):
    client, sae_id, run = tiny
    explanations = [e["text"] or None for e in load_harvest(run).explanations]
    data = client.post("/api/probe", json={"sae": sae_id, "text": TEXT, "top_n": 64, "hide_frequent_and_first": False}).json()
    assert data["top_latents"]
    for latent in data["top_latents"]:
        assert latent["explanation"] == explanations[latent["index"]]
    assert any(latent["explanation"] for latent in data["top_latents"])
    page = client.get("/probe", params={"sae": sae_id, "text": TEXT, "all": 1}).text
    shown = next(latent for latent in data["top_latents"] if latent["explanation"])
    assert shows_explanation(page, shown["explanation"])


def test_probe_token_fragment_shows_explanations(tiny):
    client, sae_id, run = tiny
    explanations = [e["text"] or None for e in load_harvest(run).explanations]
    data = client.post("/api/probe", json={"sae": sae_id, "text": TEXT, "top_k": 64}).json()
    position, latent = next((t["position"], hit["index"]) for t in data["tokens"][1:] for hit in t["top_latents"]
                            if explanations[hit["index"]])
    fragment = client.post(f"/probe/tokens/{position}", data={"sae": sae_id, "text": TEXT, "all": "1"}).text
    assert shows_explanation(fragment, explanations[latent])
    assert "<script>" not in fragment  # latent 0's explanation, wherever it shows, is escaped
