"""CSV downloads next to the pages: the SAE page's latents, a latent's examples, search results.
Written with pandas from the pages' own data, with the pages' sort and filters, named by
Content-Disposition, and safe to open in a spreadsheet."""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest

from app.frames import content_disposition, safe_for_spreadsheets
from tests.app.webrun import CAT, DEAD, HOSTILE_EXPLANATION, N_LATENTS


def read_csv(response) -> pd.DataFrame:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    return pd.read_csv(io.StringIO(response.text), keep_default_na=False, na_values=[""])


def test_latents_csv_has_the_pages_sort_and_filters_and_every_page(synthetic_client, synthetic_sae_id):
    query = {"sort": "max_activation", "order": "asc", "hide_dead": 1, "max_density": 0.9}
    response = synthetic_client.get(f"/saes/{synthetic_sae_id}/latents.csv", params=query)
    frame = read_csv(response)
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{synthetic_sae_id}-latents.csv"; filename*=UTF-8\'\'{synthetic_sae_id}-latents.csv')
    page = synthetic_client.get(f"/saes/{synthetic_sae_id}.json", params={**query, "per_page": 10}).json()
    assert len(frame) == page["total"] > 10  # all of them, not one page
    assert frame["index"].tolist()[:10] == [latent["index"] for latent in page["latents"]]
    assert list(frame.columns) == ["index", "density", "max_activation", "mean_activation", "explanation", "explanation_f1"]
    assert not set(DEAD) & set(frame["index"])
    assert frame.loc[frame["index"] == CAT, "explanation"].item() == "the⟦ cat⟧"
    # corpus text stays text: a CSV is not HTML, and the hostile explanation is written as it is
    everything = synthetic_client.get(f"/saes/{synthetic_sae_id}/latents.csv").text
    assert HOSTILE_EXPLANATION in everything and "&lt;" not in everything
    assert len(read_csv(synthetic_client.get(f"/saes/{synthetic_sae_id}/latents.csv"))) == N_LATENTS


def test_the_sae_page_links_to_its_csv_with_its_state(synthetic_client, synthetic_sae_id):
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}", params={"sort": "index", "hide_dense": 1, "page": 2, "per_page": 10}).text
    link = re.search(r'<a class="download small" href="([^"]+)" download>', html).group(1)
    assert link == f"/saes/{synthetic_sae_id}/latents.csv?sort=index&amp;order=desc&amp;hide_dense=1"
    assert synthetic_client.get(link.replace("&amp;", "&")).status_code == 200


def test_feature_examples_csv_is_the_pages_examples(synthetic_client, synthetic_sae_id):
    feature = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}.json").json()
    snippet = read_csv(synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}/examples.csv"))
    full = read_csv(synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}/examples.csv", params={"context": "full"}))
    top = feature["top_examples"][0]
    start, end = top["snippet"]
    assert snippet[snippet["example"] == 0]["position"].tolist() == list(range(start, end))
    assert full[full["example"] == 0]["token_id"].tolist() == top["token_ids"]
    assert full[full["example"] == 0]["activation"].tolist() == pytest.approx(top["activations"])
    assert full.loc[full["shown"], "example"].tolist() == sorted(full["example"].unique())  # one outlined firing each
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}/features/{CAT}", params={"context": "full"}).text
    assert f'href="/saes/{synthetic_sae_id}/features/{CAT}/examples.csv?context=full" download' in html


def test_search_csv_is_the_search_pages_results(synthetic_client, synthetic_sae_id):
    params = {"sae": synthetic_sae_id, "q": "cat"}
    frame = read_csv(synthetic_client.get("/search.csv", params=params))
    result = synthetic_client.get("/search.json", params=params).json()
    assert frame.loc[frame["match"] == "explanation", "index"].tolist() == [hit["index"] for hit in result["explanations"]]
    html = synthetic_client.get("/search", params=params).text
    assert f'href="/search.csv?sae={synthetic_sae_id}&amp;q=cat" download' in html


@pytest.mark.parametrize("path", ["/saes/nope/latents.csv", "/saes/{sae}/features/{n}/examples.csv", "/search.csv?sae=nope&q=x"])
def test_unknown_things_are_404(synthetic_client, synthetic_sae_id, path):
    response = synthetic_client.get(path.format(sae=synthetic_sae_id, n=N_LATENTS))
    assert response.status_code == 404


def test_formulas_are_defused_for_spreadsheets_and_names_are_encoded():
    frame = pd.DataFrame({"token": ["=cmd|' /C calc'!A0", "+1", "-", " plain", "@SUM(1)"], "value": [-1.0, 2.0, 3.0, 4.0, 5.0]})
    safe = safe_for_spreadsheets(frame)
    assert safe["token"].tolist() == ["'=cmd|' /C calc'!A0", "'+1", "'-", " plain", "'@SUM(1)"]
    assert safe["value"].tolist() == [-1.0, 2.0, 3.0, 4.0, 5.0] and frame["token"][0].startswith("=")  # numbers and the frame untouched
    assert content_disposition('a"b/ü.csv') == "attachment; filename=\"a_b__.csv\"; filename*=UTF-8''a%22b%2F%C3%BC.csv"
