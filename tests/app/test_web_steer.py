"""Steering on the web: POST /api/steer, the /steer page and its twin, share links at /s/{id},
the limits and errors, the busy answer, and the "steer" links of the feature page and the probe;
on the tiny real model."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from app.loader import load_run
from app.main import create_app
from app.settings import Settings

PROMPT = "def main():\n    return"


def body(sae, **changes):
    return {"sae": sae, "prompt": PROMPT, "latents": [[3, 20.0], [5, -4.0]], "tokens": 10} | changes


def test_api_gives_both_continuations_and_the_steered_latents(tiny_client, tiny_sae_id):
    response = tiny_client.post("/api/steer", json=body(tiny_sae_id))
    assert response.status_code == 200
    steering = response.json()
    assert len(steering["default"]["token_ids"]) == len(steering["steered"]["token_ids"]) == 10
    assert steering["default"]["text"] == "".join(steering["default"]["tokens"])
    assert [latent["index"] for latent in steering["latents"]] == [3, 5]
    n_tokens = len(steering["prompt_tokens"]) + 10
    assert all(len(latent["activations"]) == n_tokens for latent in steering["latents"])
    assert steering["divergence"] is not None and steering["default"] != steering["steered"]
    # the same request gives the same texts; the page's twin is the same record
    assert tiny_client.post("/api/steer", json=body(tiny_sae_id)).json() == steering
    twin = tiny_client.get(steering["json_url"])
    assert twin.status_code == 200 and twin.json() == steering


def test_strength_zero_is_the_default(tiny_client, tiny_sae_id):
    steering = tiny_client.post("/api/steer", json=body(tiny_sae_id, latents=[[3, 0.0]], temperature=1.0, seed=7)).json()
    assert steering["default"] == steering["steered"] and steering["divergence"] is None


@pytest.mark.parametrize("changes, status, detail", [
    ({"latents": [[3, 101.0]]}, 422, "strength must be between -100 and 100"),
    ({"latents": [[i, 1.0] for i in range(9)]}, 422, "1 to 8 latents"),
    ({"latents": []}, 422, "1 to 8 latents"),
    ({"latents": [[3, 1.0], [3, 2.0]]}, 422, "once"),
    ({"tokens": 129}, 413, "1 to 128 new tokens"),
    ({"tokens": 0}, 422, "1 to 128 new tokens"),
    ({"temperature": 9.0}, 422, "temperature"),
    ({"top_p": 0.0}, 422, "top_p"),
    ({"prompt": " "}, 422, "the prompt must not be empty"),
    ({"prompt": "x" * 4001}, 413, "4000"),
    ({"prompt": "def f(x):\n" * 300}, 413, "tokens; steering accepts at most"),
    ({"latents": [[64, 1.0]]}, 404, "has no latent 64"),
    ({"sae": "no-such-sae"}, 404, "no-such-sae"),
])
def test_limits_and_bad_input_say_what_is_wrong(tiny_client, tiny_sae_id, changes, status, detail):
    response = tiny_client.post("/api/steer", json=body(tiny_sae_id) | changes)
    assert response.status_code == status and detail in response.json()["detail"]


def test_share_link_keeps_the_exact_texts(tiny_client, tiny_sae_id):
    first = tiny_client.post("/api/steer/share", json=body(tiny_sae_id))
    again = tiny_client.post("/api/steer/share", json=body(tiny_sae_id))
    assert (first.status_code, again.status_code) == (201, 200) and first.json()["id"] == again.json()["id"]
    share = first.json()
    assert share["url"] == f"/s/{share['id']}" and len(share["id"]) == 10
    steering = tiny_client.post("/api/steer", json=body(tiny_sae_id)).json()
    assert tiny_client.get(share["json_url"]).json()["steering"] == steering == share["steering"]
    page = tiny_client.get(share["url"])
    assert page.status_code == 200
    head = page.text.split("</head>", 1)[0]
    assert '<meta property="og:title" content="“def main(): return” steered with #3 ×20, #5 ×-4 · saescope">' in head
    assert f'<meta property="og:url" content="http://testserver{share["url"]}">' in head
    assert 'id="steer-steered"' in page.text and "Shared steering" in page.text
    assert tiny_client.get("/s/nothere").status_code == 404
    # the page's Share button: a fragment with the same link
    form = {"sae": tiny_sae_id, "prompt": PROMPT, "latents": "3:20,5:-4", "tokens": "10"}
    fragment = tiny_client.post("/steer/share", data=form, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and f"http://testserver{share['url']}" in fragment.text
    redirect = tiny_client.post("/steer/share", data=form, follow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["location"] == share["url"]


def test_page_holds_its_view_in_the_address(tiny_client, tiny_sae_id):
    blank = tiny_client.get("/steer")
    assert blank.status_code == 200 and 'id="steer-form"' in blank.text and 'id="steer-default"' not in blank.text
    page = tiny_client.get("/steer", params={"sae": tiny_sae_id, "prompt": PROMPT, "latents": "3:20,5:-4", "tokens": 10})
    assert page.status_code == 200
    assert 'id="steer-default"' in page.text and 'id="steer-steered"' in page.text and "diverged" in page.text
    assert 'rel="alternate" type="application/json"' in page.text
    fragment = tiny_client.get("/steer", params={"sae": tiny_sae_id, "prompt": PROMPT, "latents": "3:20"},
                               headers={"HX-Request": "true"})
    assert '<section id="steer-result"' in fragment.text
    assert "<html" not in fragment.text
    bad = tiny_client.get("/steer", params={"sae": tiny_sae_id, "prompt": PROMPT, "latents": "3:500"})
    assert bad.status_code == 422 and "between -100 and 100" in bad.text
    assert tiny_client.get("/steer.json", params={"sae": tiny_sae_id, "prompt": PROMPT, "latents": "x:y"}).status_code == 422


def test_prompt_markup_stays_text(tiny_client, tiny_sae_id):
    payload = '<script>alert("steer")</script>'
    page = tiny_client.get("/steer", params={"sae": tiny_sae_id, "prompt": payload, "latents": "3:2", "tokens": 4})
    assert page.status_code == 200 and payload not in page.text and "&lt;script&gt;" in page.text


def test_feature_page_and_probe_panel_link_to_steering(tiny_client, tiny_sae_id):
    feature = tiny_client.get(f"/saes/{tiny_sae_id}/features/3")
    assert f'href="/steer?sae={tiny_sae_id}&amp;latents=3%3A4"' in feature.text and "Steer with this latent" in feature.text
    probe = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": PROMPT, "token": 2})
    assert 'class="small steer-link" href="/steer?' in probe.text


def test_openapi_documents_steering(tiny_client):
    paths = tiny_client.get("/openapi.json").json()["paths"]
    assert {"/api/steer", "/api/steer/share", "/steer.json", "/s/{share_id}.json"} <= set(paths)
    assert {"404", "413", "422", "503"} <= set(paths["/api/steer"]["post"]["responses"])
    assert "/steer" not in paths and "/s/{share_id}" not in paths


def test_model_not_on_this_server_is_503(tmp_path, tiny_run, tiny_sae_id):
    moved = tmp_path / "moved-run"
    shutil.copytree(tiny_run, moved)
    url = f"sqlite:///{tmp_path / 'steer.db'}"
    load_run(moved, url)
    (moved / "sae.safetensors").unlink()
    with TestClient(create_app(Settings(database_url=url))) as client:
        response = client.post("/api/steer", json=body(tiny_sae_id))
        assert response.status_code == 503 and "not available on this server" in response.json()["detail"]
        page = client.get("/steer", params={"sae": tiny_sae_id, "prompt": PROMPT, "latents": "3:2"})
        assert page.status_code == 503 and "not available on this server" in page.text


def test_busy_is_503_with_retry_after_and_no_queue(tiny_db, tiny_sae_id):
    from app.db import session_factory, make_engine
    from app.probe_service import ProbeService
    from app.steering import SteerRequest, SteerService
    from app.urls import URLs

    settings = Settings(database_url=tiny_db, steer_max_pending=1)
    probe = ProbeService(settings, session_factory(make_engine(tiny_db)))
    service = SteerService(probe)

    async def two_at_once():
        requests = [SteerRequest(sae=tiny_sae_id, prompt=PROMPT, latents=[(3, strength)], tokens=16) for strength in (1.0, 2.0)]
        return await asyncio.gather(*(service.steer(r, URLs()) for r in requests), return_exceptions=True)

    try:
        answers = asyncio.run(two_at_once())
    finally:
        service.close()
        probe.close()
    refused = [answer for answer in answers if isinstance(answer, HTTPException)]
    done = [answer for answer in answers if not isinstance(answer, HTTPException)]
    assert len(refused) == len(done) == 1 and done[0].steered.token_ids  # whichever came second waits for nothing
    assert refused[0].status_code == 503 and "busy" in refused[0].detail and int(refused[0].headers["Retry-After"]) >= 1
