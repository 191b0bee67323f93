"""Locked down: reads open, writes behind the admin token, security headers on every response,
request limits and timeouts, no stack traces, and hostile parameters answered with a 4xx."""

from __future__ import annotations

import asyncio
import hmac

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.loader import load_run
from app.main import create_app
from app.security import DOCS_PATHS
from app.settings import Settings
from tests.app.webrun import N_LATENTS, table_counts as counts

TOKEN = "s3cret-admin-token-of-some-length"


@pytest.fixture
def loaded_url(empty_url, run_dir):
    """A database of each backend with the test run loaded, ours to change."""
    load_run(run_dir, empty_url)
    return empty_url


# ------------------------------------------------------------ security headers


def assert_secured(response):
    csp = response.headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no CDN: no inline script runs
    assert directives["default-src"] == "'self'" and directives["object-src"] == "'none'"
    assert directives["frame-ancestors"] == "'none'"  # the app has no embed route
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 200),
    ("GET", "/index.json", 200),
    ("GET", "/saes/{sae}", 200),
    ("GET", "/saes/{sae}/features/0.json", 200),
    ("GET", "/static/style.css", 200),
    ("GET", "/static/vendor/htmx.org/htmx.min.js", 200),
    ("GET", "/openapi.json", 200),
    ("GET", "/healthz", 200),
    ("GET", "/no/such/page", 404),
    ("GET", "/saes/nope.json", 404),
    ("GET", "/saes/{sae}.json?per_page=0", 422),
    ("DELETE", "/api/saes/{sae}", 403),
    ("GET", "/saes/a%00b", 400),
])
def test_every_response_carries_the_security_headers(synthetic_client, synthetic_sae_id, method, path, status):
    response = synthetic_client.request(method, path.format(sae=synthetic_sae_id))
    assert response.status_code == status
    assert_secured(response)


def test_server_errors_are_secured_and_hide_the_traceback(tmp_path):
    unmigrated = f"sqlite:///{tmp_path / 'empty.db'}"  # no tables: every query fails
    with TestClient(create_app(Settings(database_url=unmigrated)), raise_server_exceptions=False) as client:
        page = client.get("/")
        assert page.status_code == 500 and "text/html" in page.headers["content-type"]
        assert "Traceback" not in page.text and "OperationalError" not in page.text and "sqlite" not in page.text
        assert_secured(page)
        api = client.get("/index.json")
        assert api.json() == {"detail": "internal server error"}
        assert_secured(api)


def test_debug_mode_shows_the_traceback_and_the_docs(tmp_path):
    """The contrast that shows the switch works: only debug mode says more."""
    unmigrated = f"sqlite:///{tmp_path / 'empty.db'}"
    settings = Settings(database_url=unmigrated, debug=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert "Traceback" in client.get("/", headers={"Accept": "text/html"}).text
        docs = client.get("/docs")
        assert docs.status_code == 200 and "'unsafe-inline'" in docs.headers["Content-Security-Policy"]


def test_no_interactive_docs_outside_debug_mode(synthetic_client):
    # Swagger UI needs a CDN and an inline script, which the CSP forbids; the schema stays.
    for path in DOCS_PATHS:
        response = synthetic_client.get(path)
        assert response.status_code == 404, path
        assert_secured(response)  # the docs' permissive policy belongs to debug mode only
    assert synthetic_client.get("/openapi.json").status_code == 200


# ------------------------------------------------------------ writes need the admin token


def test_reading_is_open_and_writes_are_off_without_a_token(synthetic_client, synthetic_sae_id):
    assert synthetic_client.get("/index.json").status_code == 200
    response = synthetic_client.delete(f"/api/saes/{synthetic_sae_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 403
    assert "no admin token" in response.json()["detail"] and "SAESCOPE_ADMIN_TOKEN" in response.json()["detail"]
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}.json").status_code == 200  # still there


def test_delete_needs_the_right_token(loaded_url, synthetic_sae_id, monkeypatch):
    compared, original = [], hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr("app.routes.admin.hmac.compare_digest", compare_digest)
    with TestClient(create_app(Settings(database_url=loaded_url, admin_token=TOKEN))) as client:
        wrong = [
            {},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer "},
            {"Authorization": f"Bearer {TOKEN[:-1]}x"},  # same length, last character wrong
            {"Authorization": f"Bearer {TOKEN}x"},
        ]
        for headers in wrong:
            response = client.delete(f"/api/saes/{synthetic_sae_id}", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert counts(loaded_url)["latents"] == N_LATENTS
        assert compared, "the token must be compared with hmac.compare_digest (constant time)"

        right = {"Authorization": f"Bearer {TOKEN}"}
        response = client.delete(f"/api/saes/{synthetic_sae_id}", headers=right)
        assert response.status_code == 200 and response.json() == {"deleted": synthetic_sae_id}
        assert set(counts(loaded_url).values()) == {0}  # every table of the SAE emptied
        assert client.get(f"/saes/{synthetic_sae_id}.json").status_code == 404
        assert client.delete(f"/api/saes/{synthetic_sae_id}", headers=right).status_code == 404
        assert client.delete("/api/saes/nope", headers={}).status_code == 401  # no token, no answer about ids


@pytest.mark.parametrize("value, expected", [("", None), ("   ", None), (None, None), (TOKEN, TOKEN)])
def test_admin_token_setting(monkeypatch, value, expected):
    monkeypatch.delenv("SAESCOPE_ADMIN_TOKEN", raising=False)
    if value is not None:
        monkeypatch.setenv("SAESCOPE_ADMIN_TOKEN", value)
    token = Settings().admin_token
    assert (token.get_secret_value() if token else None) == expected
    assert TOKEN not in repr(Settings(admin_token=TOKEN))  # never printed


def test_a_short_admin_token_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        Settings(admin_token="short")


# ------------------------------------------------------------ limits and timeouts


def test_request_size_limits(synthetic_client, synthetic_sae_id):
    limit = Settings().max_body_bytes
    big = {"sae": synthetic_sae_id, "text": "x" * limit}
    response = synthetic_client.post("/api/probe", json=big)
    assert response.status_code == 413 and "bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024

    response = synthetic_client.post("/api/probe", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_url_length_limit(database_url):
    # The default (64 KiB) is also httpx's own limit: check with a smaller one.
    with TestClient(create_app(Settings(database_url=database_url, max_url_bytes=2048))) as client:
        assert client.get("/saes/" + "x" * 2000).status_code == 404
        assert client.get("/saes/" + "x" * 2100).status_code == 414
        assert client.get("/index.json", params={"q": "x" * 2100}).status_code == 414


def test_slow_requests_get_a_504(tmp_path):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", request_timeout_s=0.2))

    @app.get("/slow.json")
    async def slow():
        await asyncio.sleep(5)

    with TestClient(app) as client:
        response = client.get("/slow.json")
        assert response.status_code == 504 and "0.2" in response.json()["detail"]
        assert_secured(response)


def test_postgres_statements_time_out(postgres_url):
    app = create_app(Settings(database_url=postgres_url, request_timeout_s=0.3))
    with pytest.raises(OperationalError, match="statement timeout"):
        with app.state.engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(3)"))
    with app.state.engine.connect() as conn:  # the schema in the URL's own options is kept too
        assert "saescope_test_" in conn.execute(text("SHOW search_path")).scalar_one()
    app.state.engine.dispose()


# ------------------------------------------------------------ hostile parameters


SQL_PAYLOADS = ["'", '"', "' OR '1'='1", "1; DROP TABLE saes; --", "%", "_", "\\", "' UNION SELECT NULL--",
                "%27%3B--", "saes.id", "*", "1)--", "\u2019", "😀", "a" * 300]


@pytest.mark.parametrize("payload", SQL_PAYLOADS)
def test_sql_metacharacters_in_paths_and_queries(synthetic_client, database_url, synthetic_sae_id, payload):
    """Every route's ids and parameters, as path segments, query values and JSON fields: a 4xx
    or a normal answer, never a 5xx, and nothing in the database changes."""
    from urllib.parse import quote

    before = counts(database_url), synthetic_client.get("/index.json").json()
    quoted = quote(payload, safe="")
    # Ids in the path: no such thing.
    for path in (f"/saes/{quoted}", f"/saes/{quoted}.json", f"/saes/{quoted}/features/0.json",
                 f"/saes/{quoted}/features/0", f"/saes/{quoted}/random.json", f"/saes/{quoted}/random",
                 f"/saes/{synthetic_sae_id}/features/{quoted}.json", f"/saes/{synthetic_sae_id}/features/{quoted}",
                 f"/ladders/{quoted}", f"/ladders/{quoted}.json", f"/p/{quoted}", f"/p/{quoted}.json"):
        response = synthetic_client.get(path)
        assert 400 <= response.status_code < 500, (path, response.status_code)
    # Typed parameters (numbers, booleans, choices): a 422.
    typed = {f"/saes/{synthetic_sae_id}.json": ("sort", "order", "page", "per_page", "min_density", "max_density",
                                      "hide_dead", "hide_dense"),
             f"/saes/{synthetic_sae_id}": ("sort", "order", "page", "per_page", "min_density", "max_density"),
             f"/saes/{synthetic_sae_id}/features/0": ("context",),
             "/search.json": ("limit",), "/search": ("limit",),
             "/probe.json": ("sort", "all", "latent", "top_k", "top_n"),
             "/probe": ("latent", "sort", "all"),
             "/p/nope.json": ("sort", "all", "latent")}
    for path, names in typed.items():
        for name in names:
            response = synthetic_client.get(path, params={"sae": synthetic_sae_id, "text": "hello", name: payload})
            assert response.status_code == 422, (path, name, response.status_code)
    for name in ("latent", "sort", "all"):  # the share page looks its id up first: a 404 or a 422
        response = synthetic_client.get("/p/nope", params={name: payload})
        assert response.status_code in (404, 422), (name, response.status_code)
    # Free text and SAE ids in the query string or a body: a normal answer or a 4xx.
    searches = [("/search.json", {"q": payload}), ("/search", {"q": payload}), ("/search.json", {"sae": payload}),
                ("/search", {"sae": payload, "q": "the"}), ("/search.json", {"sae": synthetic_sae_id, "q": payload})]
    for path, params in searches:
        response = synthetic_client.get(path, params=params)
        assert response.status_code in (200, 404, 422), (path, params, response.status_code)
        if path == "/search.json" and response.status_code == 200:
            assert isinstance(response.json()["explanations"], list)
    for path in ("/probe.json", "/probe"):
        response = synthetic_client.get(path, params={"sae": payload, "text": "hello"})
        assert response.status_code in (200, 404), (path, response.status_code)  # the page says "no SAE"
    for path in ("/api/probe", "/api/share"):
        response = synthetic_client.post(path, json={"sae": payload, "text": "hello"})
        assert response.status_code == 404, (path, response.status_code)
    assert synthetic_client.get("/index.json", params={"q": payload}).json() == before[1]  # unknown parameters ignored
    assert (counts(database_url), synthetic_client.get("/index.json").json()) == before  # nothing was dropped or changed


# ------------------------------------------------------------ hosts, origins, one rule for text


def test_hosts_not_allowed_are_refused(synthetic_client):
    assert synthetic_client.get("/", headers={"Host": "evil.example"}).status_code == 400
    assert synthetic_client.get("/index.json", headers={"Host": "evil.example"}).json()["detail"].startswith(
        "this server does not answer for the host")
    assert synthetic_client.get("/healthz", headers={"Host": "10.0.0.7:8000"}).status_code == 200  # a load balancer
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST."):
        assert synthetic_client.get("/", headers={"Host": host}).status_code == 200, host


def test_absolute_urls_come_from_the_public_origin(database_url, synthetic_sae_id):
    settings = Settings(database_url=database_url, public_origin="https://saescope.example.org/",
                        allowed_hosts=["*.internal"])
    with TestClient(create_app(settings), base_url="https://saescope.example.org") as client:
        page = client.get("/probe", params={"sae": synthetic_sae_id})
        assert '<meta property="og:url" content="https://saescope.example.org/probe?sae=' in page.text
        assert client.get("/", headers={"Host": "node-3.internal:8000"}).status_code == 200
        assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
        # the Host header never reaches an absolute URL
        other = client.get("/probe", params={"sae": synthetic_sae_id}, headers={"Host": "node-3.internal"})
        assert "node-3" not in other.text


@pytest.mark.parametrize("value, hosts", [("a.org, b.org", ["a.org", "b.org"]), ('["a.org"]', ["a.org"]), ("*", ["*"])])
def test_allowed_hosts_from_the_environment(monkeypatch, value, hosts):
    monkeypatch.setenv("SAESCOPE_ALLOWED_HOSTS", value)
    assert Settings().allowed_hosts == hosts


def test_a_public_origin_is_a_scheme_and_a_host():
    assert Settings(public_origin="https://x.org/").public_origin == "https://x.org"
    for bad in ("x.org", "ftp://x.org", "https://x.org/app"):
        with pytest.raises(ValueError):
            Settings(public_origin=bad)


@pytest.mark.parametrize("path", ["/", "/index.json", "/saes/{sae}", "/probe", "/probe.json", "/search", "/p/x.json"])
def test_a_query_that_is_not_utf8_is_a_400_on_every_route(synthetic_client, synthetic_sae_id, path):
    response = synthetic_client.get(path.format(sae=synthetic_sae_id) + "?q=%ff%fe&sae=x")
    assert response.status_code == 400 and "q&#39; is not valid UTF-8" in response.text.replace("'", "&#39;")


def test_content_length_must_be_ascii_digits():
    from app.security import RequestGuard

    guard = RequestGuard(None, Settings())
    for length, status in ((b"12", None), ("²".encode("latin-1"), 413), (b"9" * 5000, 413), (b"1e3", 413)):
        scope = {"type": "http", "path": "/", "raw_path": b"/", "query_string": b"",
                 "headers": [(b"host", b"localhost"), (b"content-length", length)]}
        assert (guard._check_request(scope) or (None,))[0] == status


# ------------------------------------------------------------ share links: limits and ids


def test_share_creation_is_limited_per_client_and_in_total(loaded_url, synthetic_sae_id):
    settings = Settings(database_url=loaded_url, share_limit_per_client=2, share_limit_total=3)
    with TestClient(create_app(settings)) as client:
        made = [client.post("/api/share", json={"sae": synthetic_sae_id, "text": f"text {i}"}) for i in range(3)]
        assert [r.status_code for r in made] == [201, 201, 429]
        assert "at most 2 new share links an hour" in made[2].json()["detail"]
        assert int(made[2].headers["Retry-After"]) > 3000
        again = client.post("/api/share", json={"sae": synthetic_sae_id, "text": "text 0"})
        assert again.status_code == 200  # an existing link is always given
        page = client.post("/probe/share", data={"sae": synthetic_sae_id, "text": "text 9"}, headers={"HX-Request": "true"})
        assert page.status_code == 429 and "at most 2" in page.text
    with TestClient(create_app(settings)) as client:  # another process: its own count, the same total
        assert client.post("/api/share", json={"sae": synthetic_sae_id, "text": "text 3"}).status_code == 201
        full = client.post("/api/share", json={"sae": synthetic_sae_id, "text": "text 4"})
        assert full.status_code == 429 and "limit of 3 share links" in full.json()["detail"]


def test_share_ids_in_any_case_and_one_rule_for_a_missing_latent(loaded_url, synthetic_sae_id):
    with TestClient(create_app(Settings(database_url=loaded_url))) as client:
        share = client.post("/api/share", json={"sae": synthetic_sae_id, "text": "def f():"}).json()
        for share_id in (share["id"], share["id"].upper(), share["id"].title()):
            assert client.get(f"/p/{share_id}.json").json()["id"] == share["id"]
            assert client.get(f"/p/{share_id}").status_code == 200
        # a latent the SAE lacks: 422 on the shared probe's twin, as on /probe.json
        missing = client.get(f"/p/{share['id']}.json", params={"latent": N_LATENTS})
        assert missing.status_code == 422 and "does not exist" in missing.json()["detail"]
        assert client.get(f"/p/{share['id']}.json", params={"latent": N_LATENTS - 1}).status_code == 200
