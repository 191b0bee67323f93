"""Scaling ladders: a sweep folder loaded by `saescope load` (every rung an SAE, the ladder's fits,
the feature families), its scaling page and JSON twin, and each latent's family on its feature
page, checked against families.safetensors and against brute-force decoder cosines. On SQLite and
PostgreSQL, with the synthetic sweep of sweeprun.py (the trainer's own fits and families)."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from safetensors import safe_open

from app.db import downgrade, make_engine, upgrade
from app.loader import LoadError, load_run, unload_sae
from app.main import create_app
from app.settings import Settings
from app.sweep_loader import load_sweep
from tests.app.databases import BACKENDS, empty_database
from tests.app.servers import SHOTS, free_port, running_server
from tests.app.sweeprun import K, MODEL, N_SERIES, NEIGHBOURS, ladder_id, make_sweep
from tests.app.webrun import make_run, table_counts
from trainer import runfolder
from trainer.config import model_name, run_slug
from trainer.errors import RunFolderError

LADDER = ladder_id()


def rung_id(n: int, k: int = K) -> str:
    return run_slug(MODEL, 6, n, k)


def ladder_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {table: conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
                    for table in ("saes", "ladders", "ladder_rungs", "latent_families")}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("sweep") / "ladder")


@pytest.fixture(scope="module", params=BACKENDS)
def ladder_url(request, tmp_path_factory, sweep_dir):
    with empty_database(request.param, tmp_path_factory.mktemp("db")) as url:
        assert load_sweep(sweep_dir, url) == LADDER
        yield url


@pytest.fixture(scope="module")
def ladder_client(ladder_url):
    with TestClient(create_app(Settings(database_url=ladder_url))) as client:
        yield client


def test_a_sweep_loads_every_rung_its_fits_and_families_and_a_second_load_is_a_no_op(ladder_url, sweep_dir):
    expected = {"saes": 6, "ladders": 1, "ladder_rungs": 6, "latent_families": sum(N_SERIES)}
    assert ladder_counts(ladder_url) == expected
    before = table_counts(ladder_url)
    assert load_sweep(sweep_dir, ladder_url) == LADDER  # the same files: nothing to do
    assert table_counts(ladder_url) == before and ladder_counts(ladder_url) == expected


def test_the_scaling_page_json_is_scaling_json_with_links(ladder_client, sweep_dir):
    scaling = json.loads((sweep_dir / "scaling.json").read_text())
    page = ladder_client.get(f"/ladders/{LADDER}.json").json()
    assert page["ladder"] | {"fvu_alpha": None} == {
        "id": LADDER, "model": model_name(MODEL), "layer": 6, "k": K, "n_rungs": 6, "n_min": min(N_SERIES), "n_max": max(N_SERIES),
        "fvu_alpha": None, "url": f"/ladders/{LADDER}", "json_url": f"/ladders/{LADDER}.json"}
    assert page["ladder"]["fvu_alpha"] == pytest.approx(scaling["fits"]["fvu_n"]["params"]["alpha"]["value"])
    assert page["fits"] == scaling["fits"] and page["interval"] == scaling["interval"]
    assert set(page["fits"]) == {"fvu_n", "delta_ce_n", "fvu_joint", "delta_ce_joint"}
    assert all("skipped" not in fit and fit["r2"] > 0.99 for fit in page["fits"].values())
    assert [(r["n_latents"], r["k"]) for r in page["rungs"]] == [(r["n_latents"], r["k"]) for r in scaling["rungs"]]
    for rung, written in zip(page["rungs"], scaling["rungs"]):
        assert rung["ablation_sparsity"] == written["ablation_sparsity"] and rung["ablation_sparsity_random"] == 0.3
        assert rung["probe_loss"] == written["probe_loss"] == pytest.approx(0.4 - 0.02 * math.log2(rung["n_latents"]))
        assert (rung["probe_residual_loss"], rung["probe_dense_loss"], rung["probe_base_entropy"]) == (0.35, 0.1, 0.5)
        # explainability: the rung's explanations.json, averaged here over the latents that fire held out
        explanations = [e for e in json.loads((sweep_dir / written["run"] / "harvest" / "explanations.json").read_text())
                        if e["firings"] > 0]
        assert rung["explainability_f1"] == pytest.approx(sum(e["f1"] or 0 for e in explanations) / len(explanations))
        assert rung["explainability_share"] == pytest.approx(sum((e["f1"] or 0) >= 0.5 for e in explanations) / len(explanations))
    for rung in page["rungs"]:
        assert rung["sae_id"] == rung_id(rung["n_latents"], rung["k"]) and rung["url"] == f"/saes/{rung['sae_id']}"
        assert ladder_client.get(f"/saes/{rung['sae_id']}.json").json()["sae"]["ladder_id"] == LADDER
    assert ladder_client.get("/ladders.json").json()["ladders"] == [page["ladder"]]
    assert ladder_client.get("/ladders/nothing.json").status_code == 404
    assert ladder_client.get("/ladders/nothing").status_code == 404


def test_the_scaling_page_draws_the_fits_and_links_every_rung(ladder_client):
    html = ladder_client.get(f"/ladders/{LADDER}").text
    assert ">Ablation sparsity</th>" in html and '<span class="muted small">(0.3000)</span>' in html
    assert html.count('<svg class="chart scaling') == 8  # FVU and ΔCE vs n, the k series, dead, probe, explainability, ablation, training
    assert ">Probe loss</th>" in html and ">Explanation F1</th>" in html
    probe = re.search(r'<svg class="chart scaling probe".*?</svg>', html, re.S).group()
    assert probe.count('<polyline class="series') == 4  # the best latent, a residual dimension, the dense probe, the base rate
    assert f"<title>n = {N_SERIES[0]:,}, k = {K}: best latent {0.4 - 0.02 * math.log2(N_SERIES[0]):.4g} nats</title>" in probe
    explained = re.search(r'<svg class="chart scaling explainability".*?</svg>', html, re.S).group()
    assert explained.count('<polyline class="series') == 2 and "mean F1" in explained
    ablation = re.search(r'<svg class="chart scaling ablation".*?</svg>', html, re.S).group()
    assert ablation.count('<polyline class="series') == 2  # the latents, random directions
    assert f"<title>n = {N_SERIES[0]:,}, k = {K}: random directions 0.3000</title>" in ablation
    training = re.search(r'<svg class="chart scaling training".*?</svg>', html, re.S).group()
    assert re.findall(r'<g class="legend s\d"><line[^>]*/><text[^>]*>([^<]*)</text>', training) == [
        f"n = {n:,}" for n in N_SERIES]  # a line per SAE of the n series, in order
    assert training.count('<polyline class="series s') == len(N_SERIES)
    assert "fit c + a·n^−α" in html and '<polyline class="series fit"' in html
    assert f"<title>n = {N_SERIES[0]:,}, k = {K}: FVU " in html  # every point says what it is
    assert "<script" not in html.split("</head>")[1]  # no inline script (the CSP forbids it)
    assert "4,096 × 3</span>" in html  # training tokens and passes over them
    for n in N_SERIES:
        assert f'href="/saes/{rung_id(n)}"' in html
    assert f'href="/ladders/{LADDER}"' in ladder_client.get("/").text
    assert f'href="/ladders/{LADDER}"' in ladder_client.get("/ladders").text
    assert f'href="/ladders/{LADDER}"' in ladder_client.get(f"/saes/{rung_id(N_SERIES[1])}").text


def brute_force_nearest(sweep_dir, n_from: int, n_to: int, latent: int) -> tuple[list[int], list[float]]:
    """Every decoder cosine from one latent to all latents of another size, sorted."""
    W_from = runfolder.load_sae_weights(sweep_dir / "runs" / f"n{n_from}-k{K}")["W_dec"]
    W_to = runfolder.load_sae_weights(sweep_dir / "runs" / f"n{n_to}-k{K}")["W_dec"]
    cosines = F.normalize(W_to, dim=-1) @ F.normalize(W_from[latent], dim=0)  # (n_to,)
    values, indices = cosines.sort(descending=True)
    return indices.tolist(), values.tolist()


@pytest.mark.parametrize("n", N_SERIES)
def test_each_latents_family_matches_the_families_file_and_brute_force(ladder_client, sweep_dir, n):
    position = N_SERIES.index(n)
    with safe_open(sweep_dir / "families.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for latent in (0, n // 2, n - 1):
        family = ladder_client.get(f"/saes/{rung_id(n)}/features/{latent}.json").json()["across_sizes"]
        assert family["ladder"] == LADDER and family["ladder_url"] == f"/ladders/{LADDER}.json"
        assert [s["n_latents"] for s in family["smaller"]] == list(N_SERIES[:position])
        assert [s["n_latents"] for s in family["larger"]] == list(N_SERIES[position + 1:])
        for size in family["smaller"] + family["larger"]:
            other = N_SERIES.index(size["n_latents"])
            shown = len(size["latents"])
            assert shown == (1 if other < position else NEIGHBOURS)
            indices = [r["index"] for r in size["latents"]]
            assert indices == tensors[f"{position}->{other}.index"][latent, :shown].tolist()
            expected_indices, expected_cosines = brute_force_nearest(sweep_dir, n, size["n_latents"], latent)
            assert indices == expected_indices[:shown]
            assert [r["cosine"] for r in size["latents"]] == pytest.approx(expected_cosines[:shown], abs=1e-5)
            assert size["sae_id"] == rung_id(size["n_latents"])
            for relative in size["latents"]:
                assert relative["url"] == f"/saes/{size['sae_id']}/features/{relative['index']}.json"
                assert relative["density"] is not None  # read from the other SAE's latents
        html = ladder_client.get(f"/saes/{rung_id(n)}/features/{latent}").text
        assert ("In smaller SAEs this is" in html) == (position > 0)
        assert ("In larger ones it splits into" in html) == (position < len(N_SERIES) - 1)
        for size in family["smaller"] + family["larger"]:
            for relative in size["latents"]:
                assert f'href="/saes/{size["sae_id"]}/features/{relative["index"]}"' in html


def test_sizes_outside_the_n_series_have_no_family(ladder_client):
    k_series_rung = rung_id(32, 2)
    assert ladder_client.get(f"/saes/{k_series_rung}/features/0.json").json()["across_sizes"] is None
    assert "Across sizes" not in ladder_client.get(f"/saes/{k_series_rung}/features/0").text


def test_a_damaged_or_stale_sweep_fails_before_the_database_is_touched(sweep_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cases = {
        "not harvested": lambda d: (d / "runs" / "n32-k2" / "harvest" / "harvest.json").unlink(),
        "does not describe runs/n64-k4": lambda d: runfolder.save_metrics(
            d / "runs" / "n64-k4", {**runfolder.load_metrics(d / "runs" / "n64-k4"), "fvu": 0.5}),
        "does not match the decoders": lambda d: runfolder.save_sae_weights(d / "runs" / "n16-k4", {
            **runfolder.load_sae_weights(d / "runs" / "n16-k4"), "W_dec": torch.randn(16, 8)}),
        "rungs": lambda d: runfolder.write_json(d / "sweep.json", {"rungs": []}),
    }
    for message, damage in cases.items():
        folder = tmp_path / message.replace(" ", "-").replace("/", "-")
        shutil.copytree(sweep_dir, folder)
        damage(folder)
        with pytest.raises(RunFolderError, match=message):
            load_sweep(folder, url)
    assert not (tmp_path / "db.sqlite").exists()  # never opened: the checks come first


@pytest.mark.slow  # 3 s per backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_replacing_a_ladder_and_deleting_a_rung(backend, sweep_dir, tmp_path):
    changed = make_sweep(tmp_path / "changed", seed=1)  # the same sizes, other weights
    with empty_database(backend, tmp_path) as url:
        load_sweep(sweep_dir, url)
        with pytest.raises(LoadError, match="--replace"):
            load_sweep(changed, url)
        assert load_sweep(changed, url, replace=True) == LADDER
        assert ladder_counts(url) == {"saes": 6, "ladders": 1, "ladder_rungs": 6, "latent_families": sum(N_SERIES)}
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT sweep_dir FROM ladders").scalar_one() == str(changed.resolve())
            unload_sae(engine, rung_id(32))  # a rung deleted: its ladder's record goes, the other SAEs stay
        finally:
            engine.dispose()
        assert ladder_counts(url) == {"saes": 5, "ladders": 0, "ladder_rungs": 0, "latent_families": 0}
        load_run(make_run(tmp_path / "lone"), url)  # an SAE outside any ladder beside them
        with TestClient(create_app(Settings(database_url=url))) as client:
            assert client.get(f"/ladders/{LADDER}.json").status_code == 404
            assert client.get(f"/saes/{rung_id(64)}/features/0.json").json()["across_sizes"] is None
            assert client.get("/ladders.json").json() == {"ladders": []}


@pytest.mark.multiprocess
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_sweep_load_leaves_nothing_or_everything(backend, sweep_dir, tmp_path):
    """SIGKILL while the loader writes the last rung's examples: no SAE, ladder or family row."""
    from tests.app.test_web_load_kill import integrity_problems, start_loader, wait_for

    with empty_database(backend, tmp_path) as url:
        proc = start_loader(sweep_dir, url)
        wait_for(proc, "writing", "examples rows")  # the first rung's
        wait_for(proc, "writing", "examples rows")  # the second rung's: the first is written
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert ladder_counts(url) == {"saes": 0, "ladders": 0, "ladder_rungs": 0, "latent_families": 0}
        assert integrity_problems(url) == []
        assert load_sweep(sweep_dir, url) == LADDER  # and the next load completes
        assert ladder_counts(url)["latent_families"] == sum(N_SERIES) and integrity_problems(url) == []


def test_the_migration_round_trip_keeps_the_saes(sweep_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    load_sweep(sweep_dir, url)
    downgrade(url, "0004")
    assert table_counts(url)["saes"] == 6  # the rungs stay as SAEs; the ladder tables go
    upgrade(url)
    assert ladder_counts(url) == {"saes": 6, "ladders": 0, "ladder_rungs": 0, "latent_families": 0}
    load_sweep(sweep_dir, url)  # the rungs are loaded already: only the ladder is written
    assert ladder_counts(url)["latent_families"] == sum(N_SERIES)


@pytest.mark.multiprocess
def test_saescope_load_takes_a_sweep_folder(sweep_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    command = [sys.executable, "-m", "saescope.cli", "load", str(sweep_dir), "--db", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"loaded ladder {LADDER} into {url}"


# ---------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def ladder_server(sweep_dir, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('browse') / 'ladder.db'}"
    load_sweep(sweep_dir, url)
    port = free_port()
    with running_server(["-c", f"from app.server import serve; serve({url!r}, '127.0.0.1', {port})"], port) as (base, _):
        yield base


def test_the_scaling_page_and_families_in_a_browser(ladder_server, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
    page.goto(f"{ladder_server}/")
    page.get_by_role("link", name=LADDER).first.click()
    assert page.url == f"{ladder_server}/ladders/{LADDER}"

    charts = page.locator("svg.chart")
    assert charts.count() == 8  # FVU and ΔCE vs n, the k series, dead latents, probe loss, explainability, ablation, training
    for i in range(8):
        box = charts.nth(i).bounding_box()
        assert box["width"] > 300 and box["height"] > 100  # drawn, at a readable size
    fvu = page.locator("svg.chart.scaling.fvu")
    assert fvu.locator("g.point").count() == len(N_SERIES)
    assert fvu.locator("polyline.series.fit").count() == 1
    assert "FVU (log scale)" in fvu.locator(".axis-label.y").text_content()
    dashed = fvu.locator("polyline.series.fit").evaluate("el => getComputedStyle(el).strokeDasharray")
    assert dashed not in ("", "none")
    first_point = fvu.locator("g.point").first
    assert first_point.locator("title").text_content().startswith(f"n = {N_SERIES[0]:,}, k = {K}: FVU ")
    first_point.hover()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "ladder.png"), full_page=True)

    page.locator("table.rungs").get_by_role("link", name=rung_id(N_SERIES[1])).click()  # a rung's SAE page
    assert page.url == f"{ladder_server}/saes/{rung_id(N_SERIES[1])}"
    page.get_by_role("link", name=f"Scaling ladder {LADDER}").click()  # and back to its ladder
    assert page.url == f"{ladder_server}/ladders/{LADDER}"

    page.goto(f"{ladder_server}/saes/{rung_id(N_SERIES[1])}/features/3")
    family = page.locator("#across-sizes")
    assert family.locator("h3").all_text_contents() == ["In smaller SAEs this is", "In larger ones it splits into"]
    page.screenshot(path=str(SHOTS / "feature-families.png"), full_page=True)
    family.screenshot(path=str(SHOTS / "feature-families-section.png"))
    link = family.locator("table.family").last.locator("a.neighbour").first
    target = link.get_attribute("href")
    link.click()
    assert page.url == f"{ladder_server}{target}" and f"/saes/{rung_id(N_SERIES[2])}/features/" in target
    assert page.locator("#across-sizes").count() == 1  # the larger latent has a family too
    assert problems == []
    page.close()
