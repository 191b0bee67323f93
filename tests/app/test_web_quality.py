"""The SAE page's quality section: probe loss with its tasks (each best latent linked), the
explainability of the stored explanations, and the progressive-code FVU chart; an SAE evaluated
before them says "not measured"."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from fastapi.testclient import TestClient

from app.loader import load_run
from app.main import create_app
from app.settings import Settings
from trainer import runfolder

TASKS = [
    {"task": "keyword", "description": "a keyword", "positives": 0.12, "train_positions": 900, "test_positions": 400,
     "best_latent": 3, "latent_loss": 0.21, "best_dim": 7, "residual_loss": 0.3, "dense_loss": 0.05, "base_entropy": 0.37},
    {"task": "comment", "positives": 0.04, "train_positions": 900, "test_positions": 400, "best_latent": 11,
     "latent_loss": 0.09, "best_dim": 2, "residual_loss": 0.12, "dense_loss": 0.02, "base_entropy": 0.17},
    {"task": "decorator", "positives": 0.001, "skipped": "fewer than 8 positives or negatives in a split"},
]
PROGRESSIVE = {"1": 0.61, "2": 0.45, "5": 0.3, "10": 0.24, "20": 0.2}  # k = 5 (webrun.TOP_K)


@pytest.fixture
def measured(run_dir, tmp_path, empty_url):
    """The synthetic run with the probe loss and progressive codes in its metrics.json, loaded."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    runfolder.save_metrics(run, {"probe_loss": 0.15, "probe_residual_loss": 0.21, "probe_dense_loss": 0.035,
                                 "probe_base_entropy": 0.27, "probe_tasks": TASKS, "probe_source": "Python's tokenize",
                                 "progressive_fvu": PROGRESSIVE})
    sae_id = load_run(run, empty_url)
    with TestClient(create_app(Settings(database_url=empty_url))) as client:
        yield client, sae_id, run


def test_the_sae_page_shows_the_probe_loss_explainability_and_progressive_codes(measured):
    client, sae_id, run = measured
    quality = client.get(f"/saes/{sae_id}.json").json()["sae"]["quality"]
    assert quality["probe"]["loss"] == 0.15 and quality["probe"]["dense_loss"] == 0.035
    assert [t["task"] for t in quality["probe"]["tasks"]] == ["keyword", "comment", "decorator"]
    assert quality["probe"]["tasks"][0]["latent_url"] == f"/saes/{sae_id}/features/3"
    assert quality["probe"]["tasks"][2]["skipped"] and quality["probe"]["tasks"][2]["latent_url"] is None
    assert [(p["k"], p["fvu"]) for p in quality["progressive_fvu"]] == [(int(k), v) for k, v in PROGRESSIVE.items()]

    explanations = [e for e in json.loads((run / "harvest" / "explanations.json").read_text()) if e["firings"] > 0]
    found = quality["explainability"]
    assert found["latents"] == len(explanations)
    assert found["f1"] == pytest.approx(sum(e["f1"] or 0 for e in explanations) / len(explanations))
    assert found["recall"] == pytest.approx(sum(e["recall"] or 0 for e in explanations) / len(explanations))
    scored = [e["precision"] for e in explanations if e["precision"] is not None]
    assert found["precision"] == pytest.approx(sum(scored) / len(scored))
    assert found["share_good"] == pytest.approx(sum((e["f1"] or 0) >= 0.5 for e in explanations) / len(explanations))

    html = client.get(f"/saes/{sae_id}").text
    assert '<span class="label">Probe loss</span><span class="value">0.1500</span>' in html
    assert '<span class="label">… dense probe</span><span class="value">0.0350</span>' in html
    assert f'<a href="/saes/{sae_id}/features/3">#3</a>' in html and f'<a href="/saes/{sae_id}/features/11">#11</a>' in html
    assert "not scored: fewer than 8 positives" in html
    assert f'<span class="label">Explanation F1</span><span class="value">{found["f1"]:.3f}</span>' in html
    chart = re.search(r'<svg class="chart progressive".*?</svg>', html, re.S).group()
    assert chart.count('<g class="point') == len(PROGRESSIVE)
    assert "<title>k&#39; = 5 (the SAE’s k): FVU 0.3</title>" in chart
    assert "not measured" not in html


def test_an_sae_evaluated_before_them_says_not_measured(synthetic_client, synthetic_sae_id):
    quality = synthetic_client.get(f"/saes/{synthetic_sae_id}.json").json()["sae"]["quality"]
    assert quality["probe"] is None and quality["progressive_fvu"] == [] and quality["probe_note"] is None
    assert quality["explainability"]["latents"] > 0  # from the stored explanations: any loaded harvest has it
    html = synthetic_client.get(f"/saes/{synthetic_sae_id}").text
    assert '<span class="label">Probe loss</span><span class="value small muted">not measured</span>' in html
    assert "Not measured: evaluated before progressive codes were" in html
    assert '<svg class="chart progressive' not in html


def test_the_tiny_run_says_why_its_corpus_has_no_probe_loss(tiny_client, tiny_sae_id):
    """The tiny run's corpus carries HTML on every third line: no document is Python."""
    quality = tiny_client.get(f"/saes/{tiny_sae_id}.json").json()["sae"]["quality"]
    assert quality["probe"] is None and "tokenizes as Python" in quality["probe_note"]
    assert [p["k"] for p in quality["progressive_fvu"]] == [1, 2, 4, 8, 16]  # k = 4 of 64 latents
    html = tiny_client.get(f"/saes/{tiny_sae_id}").text
    assert "Probe loss not measured: no held-out position could be labelled" in html
    assert '<svg class="chart progressive' in html


def test_the_quality_section_in_a_browser_on_a_desktop_and_a_phone(measured, browser):
    from tests.app.servers import SHOTS, free_port, running_server

    client, sae_id, _ = measured
    url = client.app.state.settings.database_url
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"], port) as (base, _):
        SHOTS.mkdir(parents=True, exist_ok=True)
        for width in (1280, 390):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(f"{base}/saes/{sae_id}#quality")
            chart = page.locator("svg.chart.progressive")
            box = chart.bounding_box()
            assert box["width"] > 250 and box["height"] > 90  # drawn, at a readable size
            assert page.locator("table.probe-tasks a", has_text="#3").count() == 1
            assert page.evaluate("document.documentElement.scrollWidth") <= width  # the table scrolls in its figure
            page.locator("#quality").screenshot(path=str(SHOTS / f"sae-quality-{width}.png"))
            page.locator("table.probe-tasks a", has_text="#11").click()
            assert page.url == f"{base}/saes/{sae_id}/features/11"
            page.close()
