"""The feature page's ablation section on the tiny real model: computed on its first view, kept in
the database (and in the feature's JSON twin from then on), rendered as a diverging shading with
the values on hover, corpus text escaped."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from tests.conftest import PAYLOAD


def test_computed_on_first_view_then_kept(tiny_client, tiny_sae_id, tiny_db):
    feature = tiny_client.get(f"/saes/{tiny_sae_id}/features/7.json").json()
    assert feature["ablation"] is None and feature["ablation_url"].endswith("/features/7/ablation")
    page = tiny_client.get(f"/saes/{tiny_sae_id}/features/7")
    assert f'hx-get="{feature["ablation_url"]}" hx-trigger="revealed"' in page.text

    first = tiny_client.get(feature["ablation_url"] + ".json")
    assert first.status_code == 200
    ablation = first.json()
    assert len(ablation["contexts"]) == 5 and ablation["raised"] and ablation["lowered"]
    for context in ablation["contexts"]:
        fired = [t for t, z in enumerate(context["activations"]) if z > 0]
        assert fired and fired[0] >= 1  # the first position is left out, as in the harvest
        # a token is predicted from the ones before it: nothing changes up to the first removal
        assert all(d == 0 for d in context["delta_logprob"][: fired[0] + 1])
        assert any(d != 0 for d in context["delta_logprob"][fired[0] + 1 :])
        assert len(context["tokens"]) == len(context["delta_logprob"]) == len(context["activations"])
    engine = create_engine(tiny_db)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM latent_ablations WHERE sae_id = :s AND latent = 7"), {"s": tiny_sae_id}).scalar()
    assert rows == 1
    assert tiny_client.get(feature["ablation_url"] + ".json").json() == ablation  # read back
    assert tiny_client.get(f"/saes/{tiny_sae_id}/features/7.json").json()["ablation"] == ablation
    kept = tiny_client.get(f"/saes/{tiny_sae_id}/features/7")
    assert 'class="ablation" id="ablation"' in kept.text and "Δ log p" in kept.text and 'hx-trigger="revealed"' not in kept.text
    assert ablation["ranked_by"] == "probability" and "Δ probability" in kept.text

    # A section kept by an older version (its tokens ranked by the mean change of log-probability,
    # no `ranked_by`) is computed again on its next view, and replaced.
    old = dict(ablation, raised=[{"token_id": 1, "token": "x", "change": 9.0}])
    del old["ranked_by"]
    with engine.begin() as conn:
        conn.execute(text("UPDATE latent_ablations SET effects = :e WHERE sae_id = :s AND latent = 7"),
                     {"e": __import__("json").dumps(old), "s": tiny_sae_id})
    assert tiny_client.get(feature["ablation_url"] + ".json").json() == ablation
    with engine.connect() as conn:
        kept_row = conn.execute(text("SELECT effects FROM latent_ablations WHERE sae_id = :s AND latent = 7"),
                                {"s": tiny_sae_id}).scalar()
    assert '"ranked_by":"probability"' in kept_row.replace(" ", "")


def test_fragment_escapes_corpus_text_and_says_why_it_cannot_run(tiny_client, tiny_sae_id):
    escaped = 0
    for index in range(0, 64, 8):
        fragment = tiny_client.get(f"/saes/{tiny_sae_id}/features/{index}/ablation")
        assert fragment.status_code == 200 and "<html" not in fragment.text
        assert PAYLOAD not in fragment.text
        escaped += "&lt;" in fragment.text
    assert escaped  # the hostile corpus's markup is among the contexts, shown as text
    missing = tiny_client.get(f"/saes/{tiny_sae_id}/features/999/ablation")
    assert missing.status_code == 404 and '<p class="note">' in missing.text
    assert tiny_client.get("/saes/no-such-sae/features/1/ablation.json").status_code == 404


def test_sae_page_shows_ablation_sparsity_beside_its_baseline(tiny_client, tiny_sae_id):
    page = tiny_client.get(f"/saes/{tiny_sae_id}")
    assert '<span class="label">Ablation sparsity</span>' in page.text
    assert '<span class="label">… random directions</span>' in page.text
    metrics = tiny_client.get(f"/saes/{tiny_sae_id}.json").json()["sae"]["metrics"]
    assert metrics["ablation_sparsity"] > 0 and metrics["ablation_sparsity_random"] > 0


def test_an_sae_whose_model_is_not_here_is_409_and_its_kept_section_stays(tmp_path, tiny_run, tiny_sae_id):
    import shutil

    from fastapi.testclient import TestClient

    from app.loader import load_run
    from app.main import create_app
    from app.settings import Settings

    moved = tmp_path / "moved-run"
    shutil.copytree(tiny_run, moved)
    url = f"sqlite:///{tmp_path / 'ablation.db'}"
    load_run(moved, url)
    with TestClient(create_app(Settings(database_url=url))) as client:
        kept = client.get(f"/saes/{tiny_sae_id}/features/2/ablation.json").json()
        (moved / "sae.safetensors").unlink()  # the database outlived the run folder
        assert client.get(f"/saes/{tiny_sae_id}/features/2/ablation.json").json() == kept
        missing = client.get(f"/saes/{tiny_sae_id}/features/3/ablation.json")
        assert missing.status_code == 409 and "not available on this server" in missing.json()["detail"]
        page = client.get(f"/saes/{tiny_sae_id}/features/3")
        assert page.status_code == 200 and "Not computed: this SAE cannot run on this server" in page.text
