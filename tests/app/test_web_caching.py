"""Caching and compression (app/caching.py): strong ETags from the load, 304s, Cache-Control by
kind of page, gzip over 1 KB, static files under hashed names, HEAD on every GET route."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.caching import GZIP_MIN_BYTES, IMMUTABLE
from app.loader import load_run
from app.main import ROUTERS, create_app
from app.settings import Settings
from app.urls import URLs
from tests.app.webrun import make_run


@pytest.fixture
def loaded(empty_url, run_dir):
    load_run(run_dir, empty_url)
    return empty_url


def test_pages_carry_a_strong_etag_of_the_load_and_answer_304(synthetic_client, synthetic_sae_id):
    urls = [f"/saes/{synthetic_sae_id}/features/3?context=full", f"/saes/{synthetic_sae_id}/features/3.json",
            f"/saes/{synthetic_sae_id}", "/", "/index.json", f"/search?sae={synthetic_sae_id}&q=cat",
            f"/saes/{synthetic_sae_id}/latents.csv"]
    for url in urls:
        first = synthetic_client.get(url)
        assert first.status_code == 200, url
        etag = first.headers["ETag"]
        assert re.fullmatch(r'"[0-9a-f]{32}(-gz)?"', etag), etag  # strong: no W/
        again = synthetic_client.get(url)
        assert again.headers["ETag"] == etag  # the same load, the same answer
        cached = synthetic_client.get(url, headers={"If-None-Match": etag})
        assert cached.status_code == 304 and cached.content == b"" and cached.headers["ETag"].strip('"') in etag
        assert cached.headers["Content-Security-Policy"]  # still secured
        assert synthetic_client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    # An htmx part of the same URL is another answer: another tag.
    page = f"/saes/{synthetic_sae_id}/features/3"
    part = synthetic_client.get(page, headers={"HX-Request": "true", "HX-Target": "examples"})
    assert part.headers["ETag"] != synthetic_client.get(page).headers["ETag"]
    assert "HX-Target" in part.headers["Vary"] and "Accept-Encoding" in part.headers["Vary"]


def test_cache_control_long_for_a_latent_short_for_lists(synthetic_client, synthetic_sae_id):
    latent = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/3")
    assert latent.headers["Cache-Control"] == "public, max-age=3600"
    for url in ("/", "/index.json", "/ladders", "/probe", f"/search?sae={synthetic_sae_id}"):
        assert synthetic_client.get(url).headers["Cache-Control"] == "no-cache", url
    random = synthetic_client.get(f"/saes/{synthetic_sae_id}/random", follow_redirects=False)
    assert random.headers["Cache-Control"] == "no-store" and "ETag" not in random.headers
    missing = synthetic_client.get("/saes/nope")
    assert missing.status_code == 404 and "ETag" not in missing.headers


def test_a_new_load_changes_every_etag(loaded, tmp_path):
    with TestClient(create_app(Settings(database_url=loaded))) as client:
        before = client.get("/").headers["ETag"]
        assert client.get("/", headers={"If-None-Match": before}).status_code == 304
        load_run(make_run(tmp_path / "other", seed=1), loaded, sae_id="another")
        time.sleep(1.1)  # the stamp is read again at most once a second
        after = client.get("/", headers={"If-None-Match": before})
        assert after.status_code == 200 and after.headers["ETag"] != before and "another" in after.text


def test_large_answers_are_gzipped_small_ones_not(synthetic_client, synthetic_sae_id):
    url = f"/saes/{synthetic_sae_id}/features/3?context=full"
    plain = synthetic_client.get(url, headers={"Accept-Encoding": "identity"})
    zipped = synthetic_client.get(url, headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in plain.headers and zipped.headers["Content-Encoding"] == "gzip"
    assert int(zipped.headers["Content-Length"]) < len(plain.content) / 3  # bytes on the wire
    assert zipped.text == plain.text
    assert zipped.headers["ETag"] == plain.headers["ETag"][:-1] + '-gz"'  # two encodings, two strong tags
    # either tag revalidates
    assert synthetic_client.get(url, headers={"If-None-Match": plain.headers["ETag"]}).status_code == 304
    small = synthetic_client.get("/healthz", headers={"Accept-Encoding": "gzip"})
    assert len(small.content) < GZIP_MIN_BYTES and "Content-Encoding" not in small.headers


def test_static_files_under_hashed_names_are_immutable(synthetic_client):
    page = synthetic_client.get("/").text
    linked = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert {URLs().static("style.css"), URLs().static("app.js"), URLs().htmx()} <= set(linked)
    for url in linked:
        assert re.search(r"\.[0-9a-f]{10}\.\w+$", url), url
        response = synthetic_client.get(url)
        assert response.status_code == 200 and response.headers["Cache-Control"] == IMMUTABLE
        assert synthetic_client.get(url, headers={"If-None-Match": response.headers["ETag"]}).status_code == 304
    plain = synthetic_client.get("/static/app.js")
    outdated = synthetic_client.get("/static/app.0123456789.js")  # a page from before a release
    for response in (plain, outdated):
        assert response.status_code == 200 and response.headers["Cache-Control"] == "no-cache"
    assert synthetic_client.get("/static/nope.0123456789.js").status_code == 404


def test_every_get_route_answers_head(synthetic_client, synthetic_sae_id):
    gets = [route.path for router in ROUTERS for route in router.routes
            if isinstance(route, APIRoute) and "GET" in route.methods]
    values = {"sae_id": synthetic_sae_id, "index": "3", "share_id": "nope", "ladder_id": "nope"}
    for path in gets + ["/healthz", "/favicon.ico", URLs().static("style.css")]:
        url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
        get = synthetic_client.get(url, follow_redirects=False)
        head = synthetic_client.head(url, follow_redirects=False)
        assert head.status_code == get.status_code != 405, url
        assert head.content == b"" and head.headers.get("Content-Type") == get.headers.get("Content-Type"), url


def test_a_probe_that_could_not_run_is_not_kept(loaded, synthetic_sae_id):
    """The synthetic run's model is on no server: the try box and a shared probe say why, in
    pages that no cache keeps (the model may be there on the next ask), without an ETag."""
    with TestClient(create_app(Settings(database_url=loaded))) as client:
        tried = client.get(f"/saes/{synthetic_sae_id}/features/3", params={"text": "def f():"})
        assert tried.status_code == 200 and "cannot" in tried.text
        assert tried.headers["Cache-Control"] == "no-store" and "ETag" not in tried.headers
        shared = client.post("/api/share", json={"sae": synthetic_sae_id, "text": "def f():"}).json()
        page = client.get(f"/p/{shared['id']}")
        assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store" and "ETag" not in page.headers
        twin = client.get(f"/p/{shared['id']}.json")  # its JSON twin alike
        assert twin.status_code == 200 and twin.json()["error"] and twin.json()["probe"] is None
        assert twin.headers["Cache-Control"] == "no-store" and "ETag" not in twin.headers
