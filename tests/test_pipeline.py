"""The whole pipeline on a tiny real model: CLI -> run folder -> SQLite file -> HTTP."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tests.conftest import PAYLOAD
from trainer import runfolder
from trainer.inference import LatentEncoder
from trainer.runconfig import RunConfig


def counts(url: str) -> dict[str, int]:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return {table: db.execute(f"select count(*) from {table}").fetchone()[0] for table in ("saes", "latents", "contexts", "examples")}


def test_run_folder_is_complete(tiny_run):
    cfg = RunConfig.load(tiny_run)
    assert cfg.n_latents == 64 and cfg.k == 4 and cfg.layer == 1 and cfg.input_scale > 0
    metrics = runfolder.load_metrics(tiny_run)
    assert 0 < metrics["fvu"] < 1  # better than predicting the mean
    assert 0 < metrics["l0"] <= 4
    assert 0 <= metrics["dead_fraction"] <= 1
    harvest = runfolder.load_harvest(tiny_run)
    assert harvest.top_context.shape == (64, 20)
    fires = harvest.density > 0
    assert fires.any()
    # Each latent's recorded top activations reach its max, and examples are sorted.
    assert_close(harvest.top_max[:, 0], harvest.max_activation)
    assert (harvest.top_max[:, :-1] >= harvest.top_max[:, 1:]).all()
    for latent in torch.nonzero(fires).flatten()[:10].tolist():
        assert_close(harvest.top_activations[latent, 0].max(), harvest.max_activation[latent], rtol=2e-3, atol=2e-3)


def test_harvest_matches_direct_encoding(tiny_run):
    """The stored top example equals encoding that context afresh through model + SAE."""
    harvest = runfolder.load_harvest(tiny_run)
    encoder = LatentEncoder.from_run(tiny_run)
    latent = int(harvest.max_activation.argmax())
    context = harvest.token_ids[harvest.top_context[latent, 0]].tolist()
    z = encoder.encode_ids(context)[:, latent]
    z[0] = 0  # the harvest leaves out the first position and the special tokens
    z[torch.isin(torch.tensor(context), torch.tensor(harvest.info["excluded_token_ids"]))] = 0
    assert harvest.info["excluded_tokens"] == ["<|endoftext|>"]
    assert_close(z, harvest.top_activations[latent, 0], rtol=1e-2, atol=1e-2)


def test_quantile_examples_hold_their_sampled_firing(tiny_run):
    harvest = runfolder.load_harvest(tiny_run)
    filled = harvest.quantile_context >= 0
    assert filled.any()
    position = harvest.quantile_position.clamp_min(0)
    at = harvest.quantile_activations.gather(-1, position[..., None]).squeeze(-1)
    assert_close(at[filled], harvest.quantile_value[filled], rtol=1e-3, atol=1e-3)  # fp16 storage
    latent, bin_ = filled.nonzero(as_tuple=True)[:2]
    low, high = harvest.quantile_edges[latent, bin_], harvest.quantile_edges[latent, bin_ + 1]
    assert ((harvest.quantile_value[filled] >= low) & (harvest.quantile_value[filled] <= high)).all()
    explained = [e for e in harvest.explanations if e["patterns"]]
    assert len(explained) > 32 and all(0 <= e["precision"] <= 1 for e in explained if e["precision"] is not None)


def test_loading_twice_does_not_duplicate(tiny_run, tiny_db):
    from saescope.cli import main

    before = counts(tiny_db)
    assert before["saes"] == 1 and before["latents"] == 64 and before["examples"] > 0
    assert main(["load", str(tiny_run), "--db", tiny_db]) == 0
    assert counts(tiny_db) == before


def test_pages_and_json_twins(tiny_client, tiny_sae_id):
    index = tiny_client.get("/index.json").json()
    assert [sae["id"] for sae in index["saes"]] == [tiny_sae_id]
    assert tiny_sae_id in tiny_client.get("/").text

    sae = tiny_client.get(f"/saes/{tiny_sae_id}.json", params={"sort": "density", "order": "desc", "per_page": 10}).json()
    densities = [latent["density"] for latent in sae["latents"]]
    assert len(densities) == 10 and densities == sorted(densities, reverse=True)
    page = tiny_client.get(f"/saes/{tiny_sae_id}")
    assert page.status_code == 200 and "ΔCE" in page.text and "CE ablated" in page.text  # eval metrics shown

    top = sae["latents"][0]["index"]
    feature = tiny_client.get(f"/saes/{tiny_sae_id}/features/{top}.json").json()
    assert feature["index"] == top and feature["density"] > 0
    assert feature["top_examples"]
    for example in feature["top_examples"]:
        assert len(example["tokens"]) == len(example["activations"]) == 32
    page = tiny_client.get(f"/saes/{tiny_sae_id}/features/{top}")
    assert page.status_code == 200 and "activation" in page.text


def test_corpus_markup_renders_as_text(tiny_client, tiny_sae_id):
    """The corpus carries <script> payloads; some top context shows them escaped, never raw."""
    shown = 0
    for index in range(64):
        feature = tiny_client.get(f"/saes/{tiny_sae_id}/features/{index}.json").json()
        text = "".join(token for example in feature["top_examples"] for token in example["tokens"])
        if PAYLOAD not in text:
            continue
        html = tiny_client.get(f"/saes/{tiny_sae_id}/features/{index}").text
        # Tokens split the payload into spans ("<", "script", ">", "alert", ...): every piece is
        # escaped, and no <script> tag without a src attribute (ours all have one) appears.
        assert "<script>" not in html, html[html.index("<script>") - 300 : html.index("<script>") + 80]
        assert "&lt;" in html and "&gt;" in html
        shown += 1
        if shown == 3:
            break
    assert shown > 0


def test_probe_api_equals_direct_encoding(tiny_client, tiny_sae_id, tiny_run):
    text = "def probe(x):\n    return x + 1  # <b>bold</b>"
    response = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": text, "top_k": 3})
    assert response.status_code == 200
    result = response.json()
    expected = LatentEncoder.from_run(tiny_run).encode_text(text)
    assert [t["token"] for t in result["tokens"]] == expected.tokens
    assert [t["token_id"] for t in result["tokens"]] == expected.token_ids
    values, indices = expected.latents.topk(3, dim=-1)
    for token, vals, idxs in zip(result["tokens"], values.tolist(), indices.tolist()):
        got = [(latent["index"], latent["activation"]) for latent in token["top_latents"]]
        want = [(i, v) for v, i in zip(vals, idxs) if v > 0]
        assert [i for i, _ in got] == [i for i, _ in want]
        assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]), atol=1e-3, rtol=1e-3)

    page = tiny_client.get("/probe", params={"sae": tiny_sae_id, "text": text})
    assert page.status_code == 200 and "&lt;b&gt;" in page.text and "<b>bold" not in page.text


def test_probe_rejects_empty_text(tiny_client, tiny_sae_id):
    response = tiny_client.post("/api/probe", json={"sae": tiny_sae_id, "text": "   "})
    assert response.status_code == 422 and "empty" in json.dumps(response.json())


def test_unknown_ids_are_404(tiny_client, tiny_sae_id):
    for path in ("/saes/nope", "/saes/nope.json", f"/saes/{tiny_sae_id}/features/999", f"/saes/{tiny_sae_id}/features/999.json"):
        assert tiny_client.get(path).status_code == 404, path
    assert tiny_client.get(f"/saes/{tiny_sae_id}/features/999.json").json()["detail"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saescope.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.multiprocess
def test_damaged_run_folder_is_one_line_and_writes_nothing(tiny_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("activations"))
    (broken / "harvest" / "examples.safetensors").unlink()
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run_cli("load", str(broken), "--db", url)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]  # progress lines may come before it
    assert error.startswith("saescope load: error:") and "examples.safetensors" in error
    if (tmp_path / "fresh.db").exists():
        assert counts(url)["saes"] == 0


def test_eval_reads_a_damaged_metrics_json_before_any_work(tiny_run, tmp_path, monkeypatch):
    """metrics.json is merged into at the end: broken, it must fail before the evaluation runs."""
    from trainer import evaluate

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken, ignore=shutil.ignore_patterns("activations"))
    (broken / "metrics.json").write_text("{broken")
    monkeypatch.setattr(evaluate, "evaluate_sae", lambda *a: pytest.fail("evaluated before reading metrics.json"))
    with pytest.raises(runfolder.RunFolderError, match="metrics.json: not valid JSON"):
        evaluate.evaluate_run(broken)


@pytest.mark.multiprocess
def test_a_file_or_a_killed_run_where_a_run_folder_goes_says_so(tiny_run, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("notes")
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "checkpoint.pt").write_bytes(b"")
    for args, says in ((["eval", str(afile)], f"{afile}: a file, not a run folder"),
                       (["import", str(tiny_run), "--out", str(afile)], f"--out {afile}: a file, not a folder"),
                       (["sweep", "--out", str(afile)], f"--out {afile}: a file, not a folder"),
                       (["harvest", str(killed)], f"finish it with `saescope train --resume {killed}`")):
        result = run_cli(*args)
        assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert afile.read_text() == "notes" and [p.name for p in killed.iterdir()] == ["checkpoint.pt"]


def test_load_can_name_the_sae(tiny_run, tmp_path):
    """Two SAEs alike in model, layer, size and k (a SAELens and a sparsify import, say) share the
    default id: --id gives each its own, and a bad one changes nothing."""
    from saescope.cli import main

    url = f"sqlite:///{tmp_path / 'two.db'}"
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("activations"))
    runfolder.save_metrics(other, {"fvu": 0.5})
    assert main(["load", str(tiny_run), "--db", url]) == 0
    assert main(["load", str(other), "--db", url]) == 2  # the same default id, other files
    assert main(["load", str(other), "--db", url, "--id", "tiny.b"]) == 0
    assert main(["load", str(tiny_run), "--db", url, "--id", "tiny-a"]) == 2  # already loaded, under its default id
    assert main(["load", str(other), "--db", url, "--id", "Tiny B/../x"]) == 2
    with sqlite3.connect(tmp_path / "two.db") as db:
        assert sorted(row[0] for row in db.execute("SELECT id FROM saes")) == [RunConfig.load(tiny_run).slug, "tiny.b"]
    assert counts(url)["latents"] == 2 * RunConfig.load(tiny_run).n_latents


@pytest.mark.multiprocess
def test_eval_rejects_a_negative_downstream_count(tiny_run):
    before = (tiny_run / "metrics.json").read_text()
    result = run_cli("eval", str(tiny_run), "--downstream-contexts", "-1")
    assert result.returncode == 2 and "--downstream-contexts must be 0" in result.stderr
    assert (tiny_run / "metrics.json").read_text() == before


@pytest.mark.postgresql
@pytest.mark.multiprocess
@pytest.mark.parametrize("command", ["load", "serve"])
def test_a_database_that_opens_but_cannot_be_migrated_is_one_line(tiny_run, tiny_db, tmp_path, command):
    """A schema from a newer saescope, a PostgreSQL schema that does not exist: one line, and the
    database is left as it was."""
    import sqlite3

    newer = tmp_path / "newer.db"
    shutil.copy(tiny_db.removeprefix("sqlite:///"), newer)
    with sqlite3.connect(newer) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_future'")
    postgres = os.environ.get("SAESCOPE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")  # as tests/app
    missing_schema = f"{postgres}?options=-csearch_path%3Dno_such_schema_here"
    for url, message in ((f"sqlite:///{newer}", "Can't locate revision identified by '9999_future' (was it made by a newer saescope?)"),
                         (missing_schema, "no schema has been selected to create in")):
        args = [str(tiny_run)] if command == "load" else ["--port", "1"]
        result = run_cli(command, *args, "--db", url)
        error = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and error.startswith(f"saescope {command}: error: cannot migrate ") and message in error, result.stderr
        assert "Traceback" not in result.stderr
    with sqlite3.connect(newer) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("9999_future",)]
    assert counts(f"sqlite:///{newer}") == counts(tiny_db)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "url,message",
    [
        ("bogus://x", "bogus://x: Can't load plugin"),
        ("not a url", "'not a url' is not a database URL"),
        ("sqlite:////no/such/folder/x.db", "cannot open sqlite:////no/such/folder/x.db: there is no folder /no/such/folder"),
        ("sqlite:///{tmp}/notes.txt", "cannot open sqlite:///{tmp}/notes.txt: file is not a database"),
        ("postgresql+psycopg://me:secret@127.0.0.1:1/x", "cannot open postgresql+psycopg://me:***@127.0.0.1:1/x: connection failed"),
        ("sqlite://", "sqlite:// is an in-memory SQLite database"),
    ],
)
@pytest.mark.parametrize("command", ["load", "serve"])
def test_a_database_that_cannot_be_opened_is_one_line(tiny_run, tmp_path, command, url, message):
    """Before anything is loaded or served; the password is not printed."""
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    url, message = url.format(tmp=tmp_path), message.format(tmp=tmp_path)
    args = [str(tiny_run)] if command == "load" else ["--port", "1"]
    result = run_cli(command, *args, "--db", url)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip()
    assert error.startswith(f"saescope {command}: error: {message}") and "\n" not in error
    assert "secret" not in result.stderr + result.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "args,message",
    [
        (["--latents", "64", "--k", "64"], "--k must be between"),
        (["--corpus", "/no/such/corpus"], "no such file or folder"),
        (["--corpus", "{tmp}/blank"], "the corpus holds no text"),  # blank documents: before the model loads
        (["--layer", "9"], "layer 9 is out of range"),
        (["--exclude-first", "32"], "--exclude-first must be from 0 to --context-length - 1 (31): 32 leaves out every position"),
        (["--exclude-special-tokens", "5"], "--exclude-special-tokens is on or off"),
        (["--auxk-rescale", "2"], "--auxk-rescale is on or off: give --auxk-rescale or --no-auxk-rescale (or 1 / 0), got '2'"),
        (["--lr", "nan"], "--lr must be a number >= 0"),
        (["--warmup-fraction", "-0.1"], "--warmup-fraction is a share of the steps"),
        (["--warmup-fraction", "0.8", "--decay-fraction", "0.5"], "add up to more than the whole run"),
        (["--auxk-alpha", "-1"], "--auxk-alpha must be a number >= 0"),
        (["--dead-tokens", "-5"], "--dead-tokens must be >= 0"),
        (["--store", "{tmp}/blank/a.txt"], "a file, not a folder"),
        (["--out", "{tmp}/blank/a.txt/run"], "is a file, not a folder"),
        (["--device", "gpu"], "--device gpu: not a torch device"),
        (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device"),  # one past the last, on any machine
        (["--batch-size", "512"], "--batch-size 512 is larger than the 256 training tokens"),
        (["--context-length", "512", "--tokens", "1024", "--heldout-tokens", "512"],  # the tiny model takes 256
         "--context-length 512 is longer than"),
        # d_model 32, 32 tokens a context: 1 MiB holds 128 contexts (4,096 tokens) and their copy
        (["--tokens", "16384", "--batch-size", "8192", "--memory-budget-mb", "1"],
         "--memory-budget-mb 1 holds 4,096 tokens at d_model 32, fewer than one batch of 8,192: give --memory-budget-mb 2"),
    ],
)
def test_train_rejects_bad_config_in_one_line(tiny_model_dir, tmp_path, args, message):
    """Before any compute: nothing is written, neither the run folder nor an activation store."""
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n\t\n")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": " "}\n\n{"text": ""}\n')
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_cli("train", "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--layer", "1",
                     "--tokens", "256", "--heldout-tokens", "64", "--context-length", "32", "--batch-size", "64", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("args,message", [
    (["--histogram-bins", "100000000"], "--histogram-bins must be at most 1000"),
    (["--context-length", "1"], "--context-length must be at least 2"),
])
def test_harvest_rejects_bad_options_in_one_line(tiny_run, args, message):
    before = (tiny_run / "harvest" / "harvest.json").read_bytes()
    result = run_cli("harvest", str(tiny_run), *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert (tiny_run / "harvest" / "harvest.json").read_bytes() == before


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_goes_before_or_after_the_command_and_shows_the_traceback(where):
    args = ["serve", "--port", "99999"]
    result = run_cli(*(["-v", *args] if where == "before" else [*args, "-v"]))
    assert "Traceback" in result.stderr and "--port must be from 0" in result.stderr
    assert "Traceback" not in run_cli(*args).stderr


def test_the_sae_page_says_which_positions_its_figures_count(tiny_client, tiny_sae_id, tiny_run):
    """The held-out FVU counts the positions that count (not the attention sink); the page says
    so, gives the FVU over every position beside it, and says what the training counted."""
    metrics = runfolder.load_metrics(tiny_run)
    assert metrics["eval_positions"] == "all but the first position and special tokens"
    assert metrics["fvu"] != metrics["fvu_all_positions"]
    page = tiny_client.get(f"/saes/{tiny_sae_id}").text
    assert "Held-out metrics count all but the first position and special tokens of each context; " \
           "the SAE was trained on all but the first position and special tokens." in page
    assert f"all positions {metrics['fvu_all_positions']:.3f}" in page
    data = tiny_client.get(f"/saes/{tiny_sae_id}.json").json()
    assert data["sae"]["trained_positions"] == "all but the first position and special tokens"


@pytest.mark.slow  # 18 s on a busy 2-core VM: a tiny run trained, evaluated and harvested
def test_a_run_normalised_per_token_is_read_so_by_every_stage(tiny_model_dir, hostile_corpus, tmp_path):
    """--normalization token is recorded in cfg.json and applied by eval, the harvest and the
    probe's encoder: their latents are the SAE's on each token normalised on its own."""
    from saescope.cli import main
    from tests.conftest import TINY_TRAIN_ARGS
    from trainer.sae import InputNorm, fast_matmul_dtype

    run = tmp_path / "token"
    args = ["--model", str(tiny_model_dir), "--corpus", str(hostile_corpus), *TINY_TRAIN_ARGS, "--normalization", "token"]
    assert main(["train", "--out", str(run), *args]) == 0
    cfg = RunConfig.load(run)
    assert cfg.norm == InputNorm("token") and cfg.input_scale == 1.0
    assert main(["eval", str(run), "--downstream-contexts", "4"]) == 0
    metrics = runfolder.load_metrics(run)
    assert 0 < metrics["fvu"] < 1 and 0 < metrics["fvu_all_positions"] < 1
    encoder = LatentEncoder.from_run(run)
    ids = encoder.tokenize("def f(x):\n    return x + 1")
    got = encoder.encode_topk(ids)
    x, _ = InputNorm("token").normalize(encoder.lm.residual(torch.tensor([ids]))[0])
    expected = encoder.sae.encode_selected(x, fast_matmul_dtype(torch.device("cpu")))
    order = expected.values.sort(dim=-1, descending=True).indices
    assert torch.equal(got.indices, expected.indices.gather(-1, order))
    assert main(["harvest", str(run)]) == 0
