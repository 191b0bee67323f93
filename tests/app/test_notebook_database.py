"""The notebook API's database side (saescope.connect) on a real SQLite file and the real
PostgreSQL: DataFrames holding exactly what the pages' JSON twins hold, read-only."""

from __future__ import annotations

import math

import pandas as pd
import pytest

import saescope
from tests.app.webrun import CAT, DEAD, N_LATENTS, VOCAB


@pytest.fixture(scope="module")
def db(database_url):
    with saescope.connect(database_url) as database:
        yield database


def same(a, b) -> bool:
    """Equal, NaN and None alike meaning 'none'."""
    missing = lambda value: value is None or (isinstance(value, float) and math.isnan(value))  # noqa: E731
    return (missing(a) and missing(b)) or a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))


def test_saes_is_the_index(db, synthetic_client, synthetic_sae_id):
    frame = db.saes()
    index = synthetic_client.get("/index.json").json()["saes"]
    assert list(frame.index) == [sae["id"] for sae in index] == [synthetic_sae_id]
    assert list(frame.columns) == ["model", "layer", "n_latents", "k", "fvu", "l0", "dead_fraction"]
    row = frame.loc[synthetic_sae_id]
    assert (row["n_latents"], row["k"], row["fvu"]) == (index[0]["n_latents"], index[0]["k"], index[0]["fvu"])
    assert db.sae(synthetic_sae_id).n_latents == N_LATENTS


@pytest.mark.parametrize("params", [
    {},
    {"sort": "density", "order": "desc"},
    {"sort": "max_activation", "order": "asc", "hide_dead": True},
    {"sort": "explanation_f1", "order": "desc"},
    {"sort": "index", "order": "desc", "min_density": 0.2, "max_density": 0.6},
])
def test_latents_are_the_sae_page_every_page_at_once(db, synthetic_client, synthetic_sae_id, params):
    frame = db.latents(synthetic_sae_id, **params)
    query = {"sort": "index", "order": "asc", **{k: (1 if v is True else v) for k, v in params.items()}, "per_page": 500}
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params=query).json()
    assert frame.index.name == "index"
    assert list(frame.columns) == ["density", "max_activation", "mean_activation", "explanation", "explanation_f1"]
    assert list(frame.index) == [latent["index"] for latent in page["latents"]] and len(frame) == page["total"]
    for latent in page["latents"]:
        row = frame.loc[latent["index"]]
        assert all(same(row[column], latent[column]) for column in frame.columns), latent["index"]
    if not params:
        assert len(frame) == N_LATENTS and frame.loc[list(DEAD), "density"].eq(0).all()
        assert frame.loc[list(DEAD), "mean_activation"].eq(0).all() and frame["explanation_f1"].dtype == "float64"


def test_examples_are_the_feature_page_long_form(db, synthetic_client, synthetic_sae_id):
    feature = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}.json").json()
    frame = db.examples(synthetic_sae_id, CAT)
    shown = [("top", 0, example) for example in feature["top_examples"]]
    shown += [("quantile", quantile["bin"], example) for quantile in feature["quantiles"] for example in quantile["examples"]]
    assert frame["example"].nunique() == len(shown)
    for number, (group, bin_, example) in enumerate(shown):
        rows = frame[frame["example"] == number]
        assert (rows["group"].unique().tolist(), rows["bin"].unique().tolist()) == ([group], [bin_])
        assert rows["token"].tolist() == example["tokens"] and rows["token_id"].tolist() == example["token_ids"]
        assert rows["position"].tolist() == list(range(len(example["tokens"])))
        assert rows["activation"].tolist() == pytest.approx(example["activations"])
        assert rows.loc[rows["shown"], "position"].tolist() == [example["position"]]
    snippet = db.examples(synthetic_sae_id, CAT, context="snippet")
    first = shown[0][2]
    start, end = first["snippet"]
    assert snippet[snippet["example"] == 0]["position"].tolist() == list(range(start, end))
    assert db.examples(synthetic_sae_id, DEAD[0]).empty


def test_search_is_the_search_page(db, synthetic_client, synthetic_sae_id):
    frame = db.search(synthetic_sae_id, "cat")
    result = synthetic_client.get("/search.json", params={"sae": synthetic_sae_id, "q": "cat"}).json()
    by_token = [(token["token"], hit["index"]) for token in result["tokens"] for hit in token["latents"]]
    assert list(zip(frame.loc[frame["match"] == "token", "token"], frame.loc[frame["match"] == "token", "index"])) == by_token
    assert frame.loc[frame["match"] == "explanation", "index"].tolist() == [hit["index"] for hit in result["explanations"]]
    assert CAT in frame.loc[frame["match"] == "explanation", "index"].tolist()
    assert db.search(synthetic_sae_id, "#5").iloc[0][["match", "index"]].tolist() == ["latent", 5]


def test_unknown_sae_or_latent(db, synthetic_sae_id):
    with pytest.raises(saescope.NotFound, match=rf"no SAE 'nope' \(the database has {synthetic_sae_id}\)"):
        db.latents("nope")
    with pytest.raises(saescope.NotFound, match=f"has no latent {N_LATENTS}"):
        db.examples(synthetic_sae_id, N_LATENTS)


def test_the_database_is_read_only(db, synthetic_sae_id):
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError, match="(?i)read.only|readonly|query_only|attempt to write"):
        with db._engine.begin() as connection:
            connection.execute(text("DELETE FROM latents"))
    assert len(db.latents(synthetic_sae_id)) == N_LATENTS


def test_connect_refuses_what_is_not_a_saescope_database(tmp_path, empty_url):
    with pytest.raises(FileNotFoundError, match="no such database file"):
        saescope.connect(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
    if empty_url.startswith("sqlite"):
        import sqlite3

        sqlite3.connect(empty_url.removeprefix("sqlite:///")).close()
    with pytest.raises(ValueError, match="is not a saescope database"):
        saescope.connect(empty_url)


def test_frames_are_pandas(db, synthetic_sae_id):
    assert all(isinstance(frame, pd.DataFrame) for frame in (db.saes(), db.latents(synthetic_sae_id)))
    assert VOCAB[2] in db.examples(synthetic_sae_id, CAT)["token"].tolist()
