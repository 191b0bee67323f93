"""Every page query uses an index: the SQL that the feature page and the latent list run (HTML and
JSON twin, every sort order) is EXPLAINed on SQLite and on PostgreSQL, over a database of
realistic size with statistics, and no step reads or sorts a whole table (explain.py says how)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.loader import load_run
from app.main import create_app
from app.settings import Settings
from app.sweep_loader import load_sweep
from tests.app.databases import BACKENDS, empty_database
from tests.app.explain import captured_statements, query_plan, whole_table_reads
from tests.app.sweeprun import K, N_SERIES, ladder_id, make_sweep
from tests.app.webrun import make_synthetic_run

RUNG = f"ladder-model-l6-{N_SERIES[1]}-k{K}"  # a middle size: its family has smaller and larger SAEs
SORTS = [(sort, order) for sort in ("density", "max_activation", "explanation_f1", "index") for order in ("desc", "asc")]
FILTERS = ["hide_dead=1&hide_dense=1", "min_density=0.01&max_density=0.02"]
PAGES = {
    "feature page": ["/saes/{sae}/features/0", "/saes/{sae}/features/4000.json", "/saes/{sae}/features/7?context=full",
                     "/saes/{sae}/random"],
    "latent list": [f"/saes/{{sae}}{fmt}?sort={sort}&order={order}&page={page}&per_page=50"
                    for fmt in ("", ".json") for sort, order in SORTS for page in (1, 40)],
    # Sorted by density, a filtered page is a range of the density index. (In another order the
    # database reads the filter's range and sorts it, or walks the sort's index, as it judges:
    # app.queries.LatentFilter. A far page of a narrow range, too, PostgreSQL rightly reads by a
    # bitmap of the range, a few hundred rows here, and sorts: left out.)
    "filtered latent list": [f"/saes/{{sae}}{fmt}?sort=density&order={order}&page={page}&per_page=50&{filters}"
                             for fmt in ("", ".json") for order in ("desc", "asc")
                             for filters, pages in zip(FILTERS, [(1, 10), (1,)]) for page in pages],
    # " tok7" is a token of the synthetic vocabulary and "tok7" a word of some explanations.
    # A ladder's page, and a rung's feature page: its family (one row by primary key, with its
    # ladder's sizes) and the family's explanations. (The SAE page's look-up of its ladder is in
    # every latent list above.)
    "ladder": ["/ladders/{ladder}", "/ladders/{ladder}.json", "/saes/{rung}/features/5", "/saes/{rung}/features/7.json"],
    "search": ["/search?sae={sae}&q=tok7", "/search.json?sae={sae}&q=+tok7", "/search.json?sae={sae}&q=tok7+tok8",
               "/search.json?sae={sae}&q=%2312", "/search?sae={sae}&q=nothing+here"],
}


@pytest.fixture(scope="module", params=BACKENDS)
def sized_client(request, tmp_path_factory):
    """A lab's database in small: 4,096 latents x 16 top examples (65,536 example rows, and as many
    quantile examples) of the SAE under test beside 24 small SAEs and a ladder of 6, vacuumed and
    analyzed, so plans are the ones a shared server gets."""
    folder = tmp_path_factory.mktemp("explain")
    run = make_synthetic_run(folder / "run", n_latents=4096, n_examples=16, context_length=16)
    with empty_database(request.param, folder) as url:
        sae_id = load_run(run, url)
        for i in range(24):
            other = make_synthetic_run(folder / f"other{i}", n_latents=64, n_examples=4, context_length=16,
                                       model=f"test/other-{i}", seed=i)
            load_run(other, url)
        load_sweep(make_sweep(folder / "sweep"), url)
        app = create_app(Settings(database_url=url))
        # What a shared server's autovacuum does after a load: statistics, and on PostgreSQL the
        # visibility map that lets an index answer alone (VACUUM runs outside a transaction).
        with app.state.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE" if conn.dialect.name == "postgresql" else "ANALYZE")
        with TestClient(app) as client:
            yield client, sae_id
        app.state.engine.dispose()


def is_load_stamp(statement: str) -> bool:
    return any(statement.lstrip().startswith(f"SELECT {table}.id, {table}.content_hash, {table}.created_at")
               for table in ("saes", "ladders"))


@pytest.mark.parametrize("page", list(PAGES))
def test_page_queries_read_no_whole_table(sized_client, page):
    client, sae_id = sized_client
    engine = client.app.state.engine
    for url in PAGES[page]:
        with captured_statements(engine) as statements:
            assert client.get(url.format(sae=sae_id, ladder=ladder_id(), rung=RUNG)).status_code == 200
        assert statements, url
        for statement, parameters in statements:
            if statement.lstrip().startswith("SELECT saes.id") and "saes.id =" not in statement:
                continue  # the first SAE when the URL names none: not one of these pages
            if is_load_stamp(statement):
                continue  # app.caching's stamp of the load: once a second per process, one row per loaded SAE or ladder
            problems = whole_table_reads(engine, statement, parameters)
            if "ts_rank_cd" in statement:
                # Search by meaning on PostgreSQL: ranking by relevance sorts the rows an index
                # found (no index gives ts_rank_cd's order); FTS5 ranks inside its index.
                problems = [step for step in problems if step != "Sort"]
            assert problems == [], f"{url}: {statement}\n{query_plan(engine, statement, parameters)}"


def test_the_check_sees_whole_table_reads(sized_client):
    """The helper itself: a filter no index serves, and an order no index gives, are reported."""
    client, _ = sized_client
    engine = client.app.state.engine
    no_params = {} if engine.dialect.name == "postgresql" else ()
    assert whole_table_reads(engine, "SELECT count(*) FROM examples WHERE max_activation > 0.5", no_params)
    assert whole_table_reads(engine, 'SELECT "index" FROM latents ORDER BY mean_activation LIMIT 5', no_params)
