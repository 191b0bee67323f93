"""Fuzzing the JSON API from its own OpenAPI schema with schemathesis: every operation, valid and
invalid inputs (positive and negative generation), once with random ids and once with the real
SAE id so the other parameters reach real rows. No input may make the server answer a 5xx, on
SQLite and on PostgreSQL.

Bounded: FUZZ_EXAMPLES per operation, mode and id choice (SAESCOPE_FUZZ_EXAMPLES overrides it),
derandomized so CI sees the same inputs every run (SAESCOPE_FUZZ_RANDOM=1 explores new ones).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from app.loader import load_run
from app.main import create_app
from app.settings import Settings
from tests.app.webrun import table_counts

TOKEN = "fuzzing-admin-token-0123456789"
FUZZ_EXAMPLES = int(os.environ.get("SAESCOPE_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("SAESCOPE_FUZZ_RANDOM") == "1"


@pytest.fixture(scope="module")
def fuzz_target(empty_url_module, run_dir):
    load_run(run_dir, empty_url_module)
    app = create_app(Settings(database_url=empty_url_module, admin_token=TOKEN))
    return empty_url_module, schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.slow  # 8 s per backend
def test_no_input_makes_a_server_error(fuzz_target, synthetic_sae_id):
    url, schema = fuzz_target
    before = table_counts(url)
    operations = sorted((result.ok() for result in schema.get_all_operations()),
                        key=lambda op: op.method == "delete")  # deletes last
    assert {op.path for op in operations} >= {"/index.json", "/saes/{sae_id}.json",
                                               "/saes/{sae_id}/features/{index}.json", "/api/saes/{sae_id}"}
    failures, calls, answers = [], 0, Counter()

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fixed = [None]
            if "{sae_id}" in operation.path and operation.method != "delete":
                fixed.append({"sae_id": synthetic_sae_id})  # reach real rows with the other parameters
            if "{index}" in operation.path:
                fixed.append({"sae_id": synthetic_sae_id, "index": 0})  # a real latent, whatever indices hypothesis draws

            for path_parameters in fixed:
                @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
                @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                          suppress_health_check=list(HealthCheck))
                def call(case):
                    nonlocal calls
                    calls += 1
                    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
                    answers[operation.path, response.status_code] += 1
                    try:
                        case.validate_response(response, checks=[not_a_server_error])
                    except Exception:  # collect them all rather than shrink the first
                        failures.append(f"{case.method} {case.formatted_path} query={case.query} "
                                        f"body={case.body!r:.200} -> {response.status_code} {response.text[:200]}")

                try:
                    call()
                except Unsatisfiable:  # nothing to make invalid (e.g. /index.json takes no parameters)
                    assert mode == GenerationMode.NEGATIVE, operation.path

    assert failures == [], "\n".join(failures[:20])
    assert calls >= len(operations) * FUZZ_EXAMPLES  # the fuzzing really ran...
    for path in ("/saes/{sae_id}.json", "/saes/{sae_id}/features/{index}.json"):
        assert answers[path, 200] > 0, answers  # ...and reached real rows, not only 404s and 422s
    after = table_counts(url)
    assert after == before or after["saes"] == before["saes"] - 1  # only a DELETE with the right id changes it


# ------------------------------------------------ the classes of input that once reached a 500
#
# Every route the app has (pages and their twins, htmx parts, CSV downloads, forms, the JSON API),
# not only those in the schema: each parameter it takes, in turn, gets a number that is not one
# (Unicode digits, which Python's int() takes and the database does not; digit strings past
# int()'s 4,300-digit limit; non-finite spellings), and each field of a JSON body a non-finite
# number (NaN, ±Infinity, 1e309), as a JSON reader parses them.

UNICODE_DIGITS = st.text(st.characters(categories=["Nd", "No"]).filter(lambda c: not c.isascii()), min_size=1, max_size=6)
HUGE_DIGITS = st.builds(lambda n, digit: digit * n, st.integers(4_290, 5_000), st.sampled_from("19"))
MIXED_DIGITS = st.builds(lambda a, b, c: a + b + c, st.text("0123456789", max_size=3), UNICODE_DIGITS,
                         st.text("0123456789", max_size=3))
NON_FINITE_TEXT = st.sampled_from(["NaN", "nan", "Infinity", "-Infinity", "inf", "1e309", "-1e309", "1e-400"])
NOT_A_NUMBER = st.one_of(UNICODE_DIGITS, HUGE_DIGITS, MIXED_DIGITS, NON_FINITE_TEXT)
NON_FINITE_JSON = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "[NaN]", '{"x": Infinity}'])


def not_an_error_of_ours(response) -> bool:
    """Below 500, or the 503 that says this server has no model for the synthetic run's probe."""
    return response.status_code < 500 or response.status_code == 503 and "cannot be loaded" in response.text


def _params(dependant, kind: str) -> list[str]:
    names = [p.alias for p in getattr(dependant, kind)]
    for sub in dependant.dependencies:
        names += _params(sub, kind)
    return names


def every_route() -> list[tuple[str, str, list[str], list[str], list[str]]]:
    """(method, path, path parameters, query parameters, form fields) of every route."""
    from fastapi.routing import APIRoute

    from app.main import ROUTERS

    routes = []
    for router in ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute):
                for method in sorted(route.methods):
                    body = [] if method == "GET" else _params(route.dependant, "body_params")
                    routes.append((method, route.path, _params(route.dependant, "path_params"),
                                   _params(route.dependant, "query_params"), body))
    return routes


ROUTES = every_route()
JSON_BODIES = {"/api/probe": {"sae": "{sae}", "text": "def f():", "top_k": 3, "top_n": 5, "sort": "max",
                              "hide_frequent_and_first": True},
               "/api/share": {"sae": "{sae}", "text": "def f():"},
               "/api/search/example": {"sae": "{sae}", "text": "def f():", "limit": 5}}
STEERING = {"sae": "{sae}", "prompt": "def f():", "latents": [[1, 2.0]], "mode": "add", "tokens": 4, "temperature": 0.0,
            "top_p": 1.0, "seed": 0}
JSON_BODIES |= {"/api/steer": STEERING, "/api/steer/share": STEERING}
FORMS = {"sae": "{sae}", "text": "def f():", "latent": "1", "sort": "max", "all": "1", "bos": "1", "share": "", "token": "0",
         "prompt": "def f():", "latents": "1:2", "mode": "add", "tokens": "4", "temperature": "0", "top_p": "1", "seed": "0"}


def _valid(name: str, sae: str) -> str:
    return {"sae_id": sae, "sae": sae, "index": "0", "position": "0", "share_id": "abcdefghij",
            "ladder_id": "nope"}.get(name, "")


@pytest.fixture(scope="module")
def number_client(run_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    url = f"sqlite:///{tmp_path_factory.mktemp('numbers') / 'fuzz.db'}"
    load_run(run_dir, url)
    with TestClient(create_app(Settings(database_url=url, admin_token=TOKEN)), raise_server_exceptions=False) as client:
        yield client


def test_the_fuzz_reaches_every_route_and_parameter():
    paths = {path for _, path, *_ in ROUTES}
    assert {"/saes/{sae_id}/features/{index}", "/probe", "/p/{share_id}", "/probe/tokens/{position}",
            "/api/probe", "/api/share", "/search.csv", "/steer", "/s/{share_id}", "/api/steer"} <= paths
    assert set(JSON_BODIES) == {path for method, path, *_ in ROUTES if method == "POST" and path.startswith("/api/")}
    params = {name for _, _, path_params, query, form in ROUTES for name in path_params + query + form}
    assert {"index", "page", "per_page", "min_density", "latent", "top_k", "limit", "position", "token"} <= params


# the routes with a parameter (the JSON API's bodies have their own test below)
WITH_PARAMETERS = [route for route in ROUTES if route[1] not in JSON_BODIES and any(route[2:])]


@pytest.mark.parametrize("method, path, path_params, query, form", WITH_PARAMETERS,
                         ids=[f"{m} {p}" for m, p, *_ in WITH_PARAMETERS])
def test_no_number_that_is_not_one_makes_a_server_error(number_client, synthetic_sae_id, method, path, path_params,
                                                        query, form):
    """Each parameter of the route in turn (path, query, form field) is NOT_A_NUMBER; the rest valid."""
    names = [("path", n) for n in path_params] + [("query", n) for n in query] + [("form", n) for n in form]

    @given(place=st.sampled_from(names), value=NOT_A_NUMBER)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
              suppress_health_check=list(HealthCheck))
    def call(place, value):
        where, name = place
        url = path
        for parameter in path_params:
            url = url.replace("{" + parameter + "}", quote(value if (where, name) == ("path", parameter)
                                                           else _valid(parameter, synthetic_sae_id), safe=""))
        params = {name: value} if where == "query" else {}
        data = {f: FORMS[f].format(sae=synthetic_sae_id) for f in form} | ({name: value} if where == "form" else {})
        response = number_client.request(method, url, params=params, data=data or None,
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        assert not_an_error_of_ours(response), f"{method} {url} {params} {data} -> {response.status_code} {response.text[:300]}"

    call()


@pytest.mark.parametrize("path", sorted(JSON_BODIES))
def test_no_non_finite_number_in_a_json_body_makes_a_server_error(number_client, synthetic_sae_id, path):
    """Every field of the body (and one the model does not have) holding NaN, ±Infinity or 1e309:
    a 422 that names the field and says what it was given, as valid JSON."""
    fields = list(JSON_BODIES[path]) + ["unknown"]

    @given(field=st.sampled_from(fields), literal=NON_FINITE_JSON)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
              suppress_health_check=list(HealthCheck))
    def call(field, literal):
        body = {k: (v.format(sae=synthetic_sae_id) if isinstance(v, str) else v) for k, v in JSON_BODIES[path].items()}
        body[field] = "@@"
        raw = json.dumps(body).replace('"@@"', literal)
        response = number_client.post(path, content=raw, headers={"content-type": "application/json"})
        assert not_an_error_of_ours(response), f"{path} {raw} -> {response.status_code} {response.text[:300]}"
        response.json()  # valid JSON: no bare NaN echoed back
        if field != "unknown":
            assert response.status_code == 422 and field in response.text

    call()
