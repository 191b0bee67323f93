"""The probe's input checks, which answer before any model is loaded, and what the page says
about SAEs it cannot probe here (the real model's tests are tests/test_probe_*.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from app.loader import load_run
from app.main import create_app
from app.settings import Settings


def test_empty_text_is_422(synthetic_client, synthetic_sae_id):
    for text in ("", "  \n\t "):
        response = synthetic_client.post("/api/probe", json={"sae": synthetic_sae_id, "text": text})
        assert response.status_code == 422 and response.json() == {"detail": "text must not be empty"}


def test_too_long_text_is_413_naming_the_limit(synthetic_client, synthetic_sae_id):
    response = synthetic_client.post("/api/probe", json={"sae": synthetic_sae_id, "text": "x" * 4001})
    assert response.status_code == 413 and "4000" in response.json()["detail"]


def test_unknown_sae_is_404(synthetic_client):
    response = synthetic_client.post("/api/probe", json={"sae": "no-such-sae", "text": "hello"})
    assert response.status_code == 404 and "no-such-sae" in response.json()["detail"]


@pytest.mark.parametrize("body", [{"text": "hi"}, {"sae": "x", "text": "hi", "top_k": 0}, {"sae": "x", "text": "hi", "top_k": 65}])
def test_malformed_request_is_422(synthetic_client, body):
    assert synthetic_client.post("/api/probe", json=body).status_code == 422


def test_missing_weights_is_503(tmp_path, run_dir, synthetic_sae_id):
    moved = tmp_path / "moved-run"
    shutil.copytree(run_dir, moved)
    url = f"sqlite:///{tmp_path / 'probe.db'}"
    load_run(moved, url)
    (moved / "sae.safetensors").unlink()  # the database outlived the run folder
    with TestClient(create_app(Settings(database_url=url))) as client:
        response = client.post("/api/probe", json={"sae": synthetic_sae_id, "text": "hello"})
        assert response.status_code == 503 and "not available on this server" in response.json()["detail"]
        page = client.get("/probe", params={"sae": synthetic_sae_id, "text": "hello"})
        assert page.status_code == 503 and "not available on this server" in page.text
        # the selector still lists it, marked, with the reason
        listing = client.get("/probe").text
        assert f'<option value="{synthetic_sae_id}" selected disabled title="weights not on this server' in listing
        assert f"<code>{synthetic_sae_id}</code> cannot be probed on this server: weights not on this server" in listing
        # and sharing it still works: the link keeps the text; the probe says why it cannot run
        share = client.post("/api/share", json={"sae": synthetic_sae_id, "text": "hello"}).json()
        shared = client.get(share["json_url"]).json()
        assert shared["text"] == "hello" and shared["probe"] is None and "not available" in shared["error"]
        # the share's page is a 200 (a link preview skips a 503), saying why, with its preview tags
        page = client.get(share["url"])
        assert page.status_code == 200 and "Retry-After" not in page.headers
        assert '<p class="error" role="alert">' in page.text and "not available on this server" in page.text
        head = page.text.split("</head>", 1)[0]
        assert '<meta property="og:title" content="“hello” · saescope probe">' in head
        assert f'<meta property="og:url" content="http://testserver{share["url"]}">' in head


def test_shared_page_while_the_probe_is_busy_is_503(synthetic_client, synthetic_sae_id, monkeypatch):
    async def busy(*args, **kwargs):
        raise HTTPException(503, "the probe is busy; try again in 2 s", headers={"Retry-After": "2"})

    share = synthetic_client.post("/api/share", json={"sae": synthetic_sae_id, "text": "hello"}).json()
    monkeypatch.setattr(synthetic_client.app.state.probe, "encode", busy)
    page = synthetic_client.get(share["url"])
    assert page.status_code == 503 and page.headers["Retry-After"] == "2" and "Trying again in 2 s" in page.text
    twin = synthetic_client.get(share["json_url"])
    assert twin.status_code == 503 and twin.headers["Retry-After"] == "2"


@pytest.mark.parametrize("text, detail", [
    ("bell \x07 rings", "text contains the control character U+0007 at character 5; only tab, newline and carriage return are allowed"),
    ("nul \x00", "text contains the control character U+0000 at character 4; only tab, newline and carriage return are allowed"),
    ("c1 \x85", "text contains the control character U+0085 at character 3; only tab, newline and carriage return are allowed"),
    ("half \ud83d of an emoji", "text is not valid Unicode: a lone surrogate U+D83D at character 5"),
])
def test_control_characters_and_lone_surrogates_are_422(synthetic_client, synthetic_sae_id, text, detail):
    body = json.dumps({"sae": synthetic_sae_id, "text": text})  # ASCII: BEL and the surrogate as \u escapes
    response = synthetic_client.post("/api/probe", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json() == {"detail": detail}


def test_tab_newline_and_carriage_return_pass_the_checks(synthetic_client):
    synthetic_client.app.state.probe.check_text("a\tb\nc\r\nd ✓ 😀")  # raises on a problem


def test_invalid_utf8_is_400_saying_so(synthetic_client, synthetic_sae_id):
    body = b'{"sae": "%s", "text": "caf\xe9"}' % synthetic_sae_id.encode()  # Latin-1, not UTF-8
    response = synthetic_client.post("/api/probe", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json() == {"detail": "the request body is not valid UTF-8 (byte 0xe9 at offset 51)".replace("51", str(body.index(b"\xe9")))}
    page = synthetic_client.get(f"/probe?sae={synthetic_sae_id}&text=caf%E9")
    assert page.status_code == 400 and "the query parameter &#39;text&#39; is not valid UTF-8" in page.text
    twin = synthetic_client.get(f"/probe.json?sae={synthetic_sae_id}&text=caf%E9")
    assert twin.status_code == 400 and twin.json() == {"detail": "the query parameter 'text' is not valid UTF-8"}
    form = synthetic_client.post("/probe/share", content=f"sae={synthetic_sae_id}&text=caf%E9".encode(),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400 and "is not valid UTF-8" in form.text


def test_empty_text_on_the_page_is_no_error(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get("/probe", params={"sae": synthetic_sae_id, "text": ""})
    assert page.status_code == 200 and "appear here as you type" in page.text


def test_openapi_documents_probe_and_share(synthetic_client):
    paths = synthetic_client.get("/openapi.json").json()["paths"]
    assert {"/api/probe", "/probe.json", "/api/share", "/p/{share_id}.json"} <= set(paths)
    probe = paths["/api/probe"]["post"]
    assert {"400", "404", "413", "422", "503"} <= set(probe["responses"])
    assert "/probe/tokens/{position}" not in paths and "/p/{share_id}" not in paths  # HTML, not API


def test_openapi_422_has_both_shapes_and_503_its_retry_after(synthetic_client, synthetic_sae_id):
    schema = synthetic_client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    resolve = lambda s: components[s["$ref"].rsplit("/", 1)[1]] if "$ref" in s else s  # noqa: E731
    operations = {"/api/probe": "post", "/probe.json": "get", "/api/share": "post", "/p/{share_id}.json": "get"}
    for path, method in operations.items():
        responses = schema["paths"][path][method]["responses"]
        detail = resolve(responses["422"]["content"]["application/json"]["schema"])["properties"]["detail"]
        shapes = [resolve(s) for s in detail.get("anyOf", [detail])]
        if path != "/p/{share_id}.json":  # its 422 is FastAPI's own only: no check of its there gives a sentence
            assert {"type": "string"} in shapes, path
        field_list = next(s for s in shapes if s.get("type") == "array")
        assert {"loc", "msg", "type"} <= set(resolve(field_list["items"])["required"]), path
    # what the API answers has the shapes documented
    sentence = synthetic_client.post("/api/probe", json={"sae": synthetic_sae_id, "text": " "})
    assert sentence.status_code == 422 and isinstance(sentence.json()["detail"], str)
    for request in (synthetic_client.post("/api/probe", json={"sae": synthetic_sae_id, "text": "hi", "top_k": 0}),
                    synthetic_client.get("/probe.json", params={"sae": synthetic_sae_id, "text": "hi", "top_k": 0})):
        fields = request.json()["detail"]
        assert request.status_code == 422 and isinstance(fields, list)
        assert {"loc", "msg", "type"} <= set(fields[0]) and fields[0]["loc"][-1] == "top_k"
    # a 503 may carry Retry-After (the probe busy), an integer of seconds
    for path in ("/api/probe", "/probe.json", "/p/{share_id}.json"):
        busy = next(iter(schema["paths"][path].values()))["responses"]["503"]
        assert busy["headers"]["Retry-After"]["schema"] == {"type": "integer"}, path
        assert not busy["headers"]["Retry-After"].get("required"), path  # a missing model sends none
    assert "503" not in schema["paths"]["/api/share"]["post"]["responses"]  # sharing never runs the probe
