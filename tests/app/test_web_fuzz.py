"""Fuzzing the JSON API from its own OpenAPI schema with schemathesis: every operation, valid and
invalid inputs (positive and negative generation), once with random ids and once with the real
SAE id so the other parameters reach real rows. No input may make the server answer a 5xx, on
SQLite and on PostgreSQL.

Bounded: FUZZ_EXAMPLES per operation, mode and id choice (SAESCOPE_FUZZ_EXAMPLES overrides it),
derandomized so CI sees the same inputs every run (SAESCOPE_FUZZ_RANDOM=1 explores new ones).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
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
