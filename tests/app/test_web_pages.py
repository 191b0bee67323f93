"""Every page and its JSON twin, through the real app over the loaded SQLite file."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from markupsafe import escape
from pydantic import BaseModel

from tests.app.webrun import DEAD, N_LATENTS, SCRIPT_CONTEXT, VOCAB, WEAK

from app import pages
from app.main import ROUTERS
from app.urls import URLs


class Page(HTMLParser):
    """Collects links, alternate links, token spans and any <script> element."""

    def __init__(self, html: str):
        super().__init__()
        self.links, self.alternates, self.scripts, self.tokens = [], [], [], []
        self._in_tok = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "link" and attrs.get("rel") == "alternate":
            self.alternates.append((attrs.get("type"), attrs["href"]))
        if tag == "script":
            self.scripts.append(attrs)
        if tag in ("span", "a") and "tok" in (attrs.get("class") or "").split():
            self.tokens.append({"title": attrs.get("title"), "style": attrs.get("style"), "text": ""})
            self._in_tok = True

    def handle_endtag(self, tag):
        self._in_tok = False

    def handle_data(self, data):
        if self._in_tok:
            self.tokens[-1]["text"] += data


def test_index_lists_the_sae(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    parsed = Page(page.text)
    assert f"/saes/{synthetic_sae_id}" in parsed.links
    assert ("application/json", "/index.json") in parsed.alternates
    data = synthetic_client.get("/index.json").json()
    (sae,) = data["saes"]
    assert {k: sae[k] for k in ("id", "n_latents", "k", "layer")} == {"id": synthetic_sae_id, "n_latents": N_LATENTS, "k": 5, "layer": 3}
    assert sae["fvu"] == pytest.approx(0.2345) and sae["l0"] == 5.0
    assert set(sae) >= {"id", "model", "layer", "n_latents", "k", "fvu", "l0", "dead_fraction"}


def test_sae_page_lists_latents_with_links_and_bars(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}")
    assert page.status_code == 200
    parsed = Page(page.text)
    feature_links = [link for link in parsed.links if re.fullmatch(rf"/saes/{synthetic_sae_id}/features/\d+", link)]
    assert len(feature_links) == 50  # default per_page
    assert ("application/json", f"/saes/{synthetic_sae_id}.json?sort=density&order=desc&page=1&per_page=50") in parsed.alternates
    assert 'class="bar"' in page.text and "--w:" in page.text
    assert "0.2345" in page.text or "0.234" in page.text  # fvu shown


def test_sae_json_sorting_and_pagination(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}.json").json()
    assert data["sae"]["id"] == synthetic_sae_id and data["sae"]["cfg"]["n_latents"] == N_LATENTS
    assert (data["sort"], data["order"], data["page"], data["per_page"], data["total"]) == ("density", "desc", 1, 50, N_LATENTS)
    densities = [latent["density"] for latent in data["latents"]]
    assert densities == sorted(densities, reverse=True) and len(densities) == 50

    asc = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={"sort": "max_activation", "order": "asc", "per_page": 10}).json()
    maxes = [latent["max_activation"] for latent in asc["latents"]]
    assert maxes == sorted(maxes) and len(maxes) == 10

    seen = []
    url = f"/saes/{synthetic_sae_id}.json?sort=index&order=asc&per_page=20"
    while url:
        chunk = synthetic_client.get(url).json()
        seen += [latent["index"] for latent in chunk["latents"]]
        url = chunk["next"]
    assert seen == list(range(N_LATENTS))  # pages cover every latent once, in order
    assert chunk["pages"] == 4 and chunk["prev"] is not None

    last = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={"sort": "index", "order": "desc", "page": 2, "per_page": 60}).json()
    assert [latent["index"] for latent in last["latents"]] == [3, 2, 1, 0]


def test_sae_page_state_lives_in_the_query_string(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}", params={"sort": "index", "order": "asc", "page": 2, "per_page": 10})
    parsed = Page(page.text)
    features = [link for link in parsed.links if "/features/" in link]
    assert features[:2] == [f"/saes/{synthetic_sae_id}/features/10", f"/saes/{synthetic_sae_id}/features/11"]
    assert f"/saes/{synthetic_sae_id}?sort=index&order=asc&page=3&per_page=10" in parsed.links  # next page keeps the state
    assert f"/saes/{synthetic_sae_id}?sort=index&order=desc&per_page=10" in parsed.links  # clicking the active column flips it


@pytest.mark.parametrize("params", [{"per_page": 501}, {"per_page": 0}, {"page": 0}, {"page": 2**31},
                                    {"page": 10**20}, {"sort": "bogus"}, {"order": "up"}])
def test_sae_bad_query_is_rejected(synthetic_client, synthetic_sae_id, params):
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params=params).status_code == 422
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}", params=params)
    assert html.status_code == 422 and "text/html" in html.headers["content-type"]


def test_feature_json(synthetic_client, synthetic_sae_id):
    data = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0.json").json()
    assert {"sae_id", "index", "density", "max_activation", "mean_activation", "top_examples", "prev", "next"} <= set(data)
    assert (data["sae_id"], data["index"], data["prev"]) == (synthetic_sae_id, 0, None)
    assert data["next"] == f"/saes/{synthetic_sae_id}/features/1.json"
    assert data["max_activation"] == pytest.approx(5.0)
    assert 1 <= len(data["top_examples"]) <= 20
    for example in data["top_examples"]:
        assert len(example["tokens"]) == len(example["activations"]) == len(example["token_ids"]) == 16
        assert example["tokens"] == [VOCAB[i] for i in example["token_ids"]]
        assert max(example["activations"]) == pytest.approx(example["max_activation"], rel=1e-3)
    top = data["top_examples"][0]
    assert top["context_id"] == SCRIPT_CONTEXT and top["tokens"][2:5] == ["<script>", "alert(1)", "</script>"]
    assert top["activations"][3] == pytest.approx(5.0)

    last = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{N_LATENTS - 1}.json").json()
    assert last["next"] is None and last["prev"] == f"/saes/{synthetic_sae_id}/features/{N_LATENTS - 2}.json"
    assert last["top_examples"] == [] and last["mean_activation"] == 0.0  # dead latent, NaN mean stored as 0


def test_feature_page_shades_tokens_and_escapes_corpus_text(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0")
    assert page.status_code == 200
    html = page.text
    assert "<script>alert(1)" not in html and html.count("<script") == 2  # htmx and static/app.js only
    assert "&lt;script&gt;" in html and "&lt;/script&gt;" in html
    parsed = Page(html)
    assert all(script.get("src") for script in parsed.scripts)  # only the htmx file: no inline scripts
    assert ("application/json", f"/saes/{synthetic_sae_id}/features/0.json") in parsed.alternates
    assert f"/saes/{synthetic_sae_id}/features/1" in parsed.links and f"/saes/{synthetic_sae_id}" in parsed.links
    texts = [token["text"] for token in parsed.tokens]
    assert "<script>" in texts and "alert(1)" in texts  # the parser unescaped them: they are text
    assert "↵" in texts  # newline tokens are visible
    peak = next(token for token in parsed.tokens if token["text"] == "alert(1)")
    assert peak["title"] == "5.000" and "--a: 1.000" in peak["style"]
    assert all(re.fullmatch(r"--a: [01]\.\d{3}|--a: 0", token["style"]) for token in parsed.tokens)


def test_whole_contexts_break_their_lines_and_snippets_stay_on_one(synthetic_client, synthetic_sae_id):
    """A newline shows as ↵ everywhere; in whole contexts (code, mostly) it also ends the line."""
    snippet = [token["text"] for token in Page(synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0").text).tokens]
    full = [token["text"] for token in Page(synthetic_client.get(f"/saes/{synthetic_sae_id}/features/0?context=full").text).tokens]
    assert "↵" in snippet and "↵\n" not in snippet
    assert "↵\n" in full and "↵" not in full


def test_weak_explanations_are_dimmed_with_their_f1(synthetic_client, synthetic_sae_id):
    params = {"sort": "explanation_f1", "order": "asc", "per_page": 50}
    latents = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params=params).json()["latents"]
    weak = [latent for latent in latents if latent["explanation"] and latent["explanation_f1"] < 0.1]
    assert WEAK in [latent["index"] for latent in weak] and len(weak) < len(latents)
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}", params=params).text
    assert html.count('class="explanation weak"') == len(weak)
    assert all(f"F1 {latent['explanation_f1']:.2f}" in html for latent in latents)


def test_a_weak_neighbour_is_dimmed_too(synthetic_client, synthetic_sae_id):
    latent = next(i for i in range(N_LATENTS)
                  if WEAK in [n["index"] for n in synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{i}.json").json()["neighbours"]])
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{latent}").text
    nearest = html.split('<ol class="neighbour-list">', 1)[1].split("</ol>", 1)[0]
    assert re.search(rf'features/{WEAK}">#{WEAK}</a>\s*<span class="cosine"[^>]*>[^<]*</span>\s*<span class="explanation weak"', nearest)


def test_dead_latent_page(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{DEAD[0]}")
    assert page.status_code == 200 and "never fired" in page.text


@pytest.mark.parametrize("path", ["/saes/nope", "/saes/{sae}/features/9999", "/no/such/page"])
def test_unknown_things_are_404_pages(synthetic_client, synthetic_sae_id, path):
    page = synthetic_client.get(path.format(sae=synthetic_sae_id))
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "Traceback" not in page.text


def test_a_latent_past_the_last_says_which_exist(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{N_LATENTS}.json")
    assert page.status_code == 404
    assert page.json()["detail"] == f"SAE {synthetic_sae_id!r} has no latent {N_LATENTS} (its latents are 0 to {N_LATENTS - 1})"


@pytest.mark.parametrize("index", ["-1", str(2**31), "99999999999999999999", "1e3", "0x10"])
def test_impossible_latent_index_is_422(synthetic_client, synthetic_sae_id, index):
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{index}")
    assert page.status_code == 422 and "text/html" in page.headers["content-type"]
    assert synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{index}.json").status_code == 422


@pytest.mark.parametrize("path", ["/saes/nope.json", "/saes/{sae}/features/9999.json"])
def test_unknown_things_are_404_json(synthetic_client, synthetic_sae_id, path):
    response = synthetic_client.get(path.format(sae=synthetic_sae_id))
    assert response.status_code == 404
    assert set(response.json()) == {"detail"} and response.json()["detail"]


def test_probe_page_form_works_without_js(synthetic_client, synthetic_sae_id):
    page = synthetic_client.get("/probe")
    assert page.status_code == 200
    assert 'method="get"' in page.text and 'hx-push-url="true"' in page.text
    assert f'<option value="{synthetic_sae_id}" selected' in page.text  # disabled: no server has its model folder
    empty = synthetic_client.get("/probe", params={"sae": synthetic_sae_id, "text": "   "})
    assert empty.status_code == 422 and "text must not be empty" in empty.text
    fragment = synthetic_client.get("/probe", params={"sae": synthetic_sae_id, "text": ""}, headers={"HX-Request": "true"})
    assert fragment.text.lstrip().startswith('<section id="probe-result"') and "<html" not in fragment.text
    assert "HX-Request" in fragment.headers["Vary"].split(", ")


def test_htmx_comes_from_node_modules_and_pages_send_a_csp(synthetic_client):
    page = synthetic_client.get("/")
    htmx_url, app_js = URLs().htmx(), URLs().static("app.js")  # names with their content's hash
    assert re.fullmatch(r"/static/vendor/htmx\.org/htmx\.min\.[0-9a-f]{10}\.js", htmx_url)
    assert f'<script src="{htmx_url}" defer></script>' in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for url in (htmx_url, "/static/vendor/htmx.org/htmx.min.js"):  # hashed or plain
        htmx = synthetic_client.get(url)
        assert htmx.status_code == 200 and "htmx" in htmx.text[:2000]
    assert synthetic_client.get("/static/style.css").status_code == 200
    assert f'<script src="{app_js}" defer></script>' in page.text  # our own, no inline script
    assert "clipboard" in synthetic_client.get(app_js).text


def test_openapi_documents_the_json_api(synthetic_client):
    paths = synthetic_client.get("/openapi.json").json()["paths"]
    assert {"/index.json", "/saes/{sae_id}.json", "/saes/{sae_id}/features/{index}.json", "/api/probe"} <= set(paths)


def api_routes() -> list[APIRoute]:
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


def json_routes() -> list[APIRoute]:
    return [route for route in api_routes() if route.path.endswith(".json")]


def test_openapi_documents_every_json_route_with_its_record(synthetic_client, synthetic_sae_id):
    """Every .json route is in /openapi.json with the schema of what it answers (a redirect: its
    303); and what a twin answers has that schema's fields, the required ones all there."""
    spec = synthetic_client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    routes = json_routes()
    assert len(routes) >= 9
    for route in routes:
        responses = spec["paths"][route.path]["get"]["responses"]
        if route.status_code == 303:  # /saes/{sae_id}/random.json
            assert "303" in responses and "200" not in responses, route.path
            continue
        ref = responses["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.removeprefix("#/components/schemas/") in schemas, route.path
    for path, twin in (("/index.json", "/index.json"), ("/saes/{sae_id}.json", f"/saes/{synthetic_sae_id}.json"),
                       ("/saes/{sae_id}/features/{index}.json", f"/saes/{synthetic_sae_id}/features/3.json"),
                       ("/ladders.json", "/ladders.json"), ("/search.json", "/search.json?q=the")):
        ref = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        schema = schemas[ref.removeprefix("#/components/schemas/")]
        body = synthetic_client.get(twin).json()
        assert set(schema["required"]) <= set(body) <= set(schema["properties"]), path


def flat_parameters(dependant) -> dict[str, tuple]:
    """A route's path and query parameters, its dependencies' included: name -> (type, default)."""
    found = {p.alias: (p.field_info.annotation, p.field_info.default) for p in dependant.path_params + dependant.query_params}
    for dependency in dependant.dependencies:
        found |= flat_parameters(dependency)
    return found


def test_each_page_and_its_twin_come_from_one_view():
    """A page and its .json twin are one registration (app.pages.route): both routes run the same
    view, and the twin's parameters are the page's, declared once."""
    routes = {route.path: route for route in api_routes()}
    pairs = {("/" if twin.path == "/index.json" else twin.path.removesuffix(".json")): twin
             for twin in json_routes() if twin.status_code != 303}
    assert set(pairs) == {"/", "/saes/{sae_id}", "/saes/{sae_id}/features/{index}", "/ladders", "/ladders/{ladder_id}",
                          "/search", "/search/example", "/probe", "/p/{share_id}", "/steer", "/s/{share_id}",
                          "/saes/{sae_id}/features/{index}/ablation"}
    for path, twin in pairs.items():
        page = routes[path]
        assert page.endpoint.view is twin.endpoint.view, path
        assert flat_parameters(twin.dependant).items() <= flat_parameters(page.dependant).items(), path  # the page may add its own


class Greeting(BaseModel):
    text: str


def shout_page(page: pages.PageCall, shout: bool = False):
    greeting = page.data()
    return PlainTextResponse(greeting.text.upper() if shout else greeting.text)


def test_one_view_registers_a_page_and_its_twin():
    router = APIRouter()

    @pages.route(router, "/hello/{name}", template="unused.html", name="greeting", summary="A greeting", html=shout_page)
    def read_hello(name: str, punctuation: str = "!") -> Greeting:
        return Greeting(text=f"hello {name}{punctuation}")

    app = FastAPI()
    app.include_router(router)
    with TestClient(app) as hello:
        assert hello.get("/hello/ada.json", params={"punctuation": "?"}).json() == {"text": "hello ada?"}
        assert hello.get("/hello/ada", params={"punctuation": "?", "shout": 1}).text == "HELLO ADA?"
    operation = app.openapi()["paths"]["/hello/{name}.json"]["get"]
    assert "/hello/{name}" not in app.openapi()["paths"]  # the HTML page is not the API
    assert [p["name"] for p in operation["parameters"]] == ["name", "punctuation"]  # not the page's own `shout`
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Greeting"}
    assert operation["operationId"].startswith("read_hello_json") and operation["summary"] == "A greeting"


def test_the_api_page_documents_every_route_of_the_schema_offline(synthetic_client):
    """/api, the reference a reader opens from the header: every operation of /openapi.json, every
    schema it names linked to its own section, under the strict policy (no CDN, no inline script)."""
    spec = synthetic_client.get("/openapi.json").json()
    response = synthetic_client.get("/api")
    assert response.status_code == 200
    assert "script-src 'self';" in response.headers["Content-Security-Policy"]
    html = response.text
    page = Page(html)
    assert page.scripts == [{"src": URLs().htmx(), "defer": None}, {"src": URLs().static("app.js"), "defer": None}]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert f'<span class="method {method}">{method.upper()}</span> <code>{path}</code>' in html
            assert str(escape(operation["summary"])) in html
    anchors = set(re.findall(r'id="schema-(\w+)"', html))
    assert anchors == set(spec["components"]["schemas"])
    assert {link.removeprefix("#schema-") for link in page.links if link.startswith("#schema-")} <= anchors
    assert 'href="/api"' in synthetic_client.get("/").text  # the header's API link


def test_the_favicon_is_served_where_browsers_ask(synthetic_client):
    icon = synthetic_client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml") and "<svg" in icon.text


def test_a_latent_number_with_a_hash_from_the_search_box_opens_its_page(synthetic_client, synthetic_sae_id):
    """"#3" from the header's box (go=1) is a latent; a bare "3" may be a token too, so it shows
    the results (with the latent first); the search page's own address and its live search never
    redirect."""
    response = synthetic_client.get("/search", params={"q": "#3", "go": 1}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/saes/{synthetic_sae_id}/features/3"
    assert 'name="go" value="1"' in synthetic_client.get("/").text
    assert synthetic_client.get("/search", params={"q": "3", "go": 1}, follow_redirects=False).status_code == 200
    assert synthetic_client.get("/search", params={"q": "#3"}, follow_redirects=False).status_code == 200
    live = synthetic_client.get("/search", params={"q": "#3", "go": 1}, headers={"HX-Request": "true", "HX-Target": "search-results"},
                      follow_redirects=False)
    assert live.status_code == 200 and f'href="/saes/{synthetic_sae_id}/features/3"' in live.text
    assert synthetic_client.get("/search", params={"q": f"#{N_LATENTS}", "go": 1}, follow_redirects=False).status_code == 200


def test_server_errors_hide_the_traceback(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    unmigrated = f"sqlite:///{tmp_path / 'empty.db'}"  # no tables: every query fails
    with TestClient(create_app(Settings(database_url=unmigrated)), raise_server_exceptions=False) as client:
        page = client.get("/")
        assert page.status_code == 500 and "Traceback" not in page.text and "OperationalError" not in page.text
        assert client.get("/index.json").json() == {"detail": "internal server error"}
