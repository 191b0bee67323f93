"""The notebook API's run side (saescope.open_run) on the tiny real model, and the worked example
of docs/notebook.md: the latents of a snippet, then their densities and examples from the
database the run was loaded into (a real SQLite file)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

import saescope
from trainer import runfolder
from trainer.inference import LatentEncoder

SNIPPET = "def f(x):\n    return x + 1"
TEXTS = [SNIPPET, "import os\nprint(os.getcwd())", "", "x"]


@pytest.fixture(scope="module")
def run(tiny_run):
    return saescope.open_run(tiny_run)


def test_import_saescope_is_cheap_and_names_its_api():
    import subprocess  # noqa: F401  (the check runs in this process: no new interpreter)
    import sys

    loaded = set(sys.modules)
    import saescope as package

    assert {"connect", "open_run", "Database", "Run", "NotFound"} <= set(dir(package))
    if "pandas" not in loaded:  # only telling in a process that has not imported it yet
        assert "pandas" not in sys.modules


def test_run_exposes_its_config_sae_and_metrics(run, tiny_run):
    cfg, sae = runfolder.load_sae(tiny_run)
    assert run.cfg == cfg and run.metrics == runfolder.load_metrics(tiny_run) and "fvu" in run.metrics
    assert torch.equal(run.sae.W_dec, sae.W_dec) and not run.sae.W_dec.requires_grad
    assert repr(run).startswith("Run(") and f"k={cfg.k}" in repr(run)


def test_encode_is_the_probes_encoding_long_form(run, tiny_run):
    # one text per forward, as encode_text runs it (the same arithmetic), every position as the probe's JSON
    frame = run.encode(TEXTS, batch_size=1, all_positions=True)
    assert list(frame.columns) == ["text", "position", "token_id", "token", "latent", "activation"]
    assert (frame["activation"] > 0).all() and set(frame["text"]) <= {0, 1, 3}  # the empty text has no tokens
    encoder = LatentEncoder.from_run(tiny_run)
    for number, text in enumerate(TEXTS):
        if not text:
            continue
        expected = encoder.encode_text(text)
        rows = frame[frame["text"] == number]
        dense = torch.zeros_like(expected.latents)
        where = (torch.tensor(rows["position"].tolist()), torch.tensor(rows["latent"].tolist()))
        dense[where] = torch.tensor(rows["activation"].tolist())
        assert_close(dense, expected.latents, atol=1e-5, rtol=1e-5)
        tokens = rows.groupby("position")["token"].first()
        assert all(tokens[position] == expected.tokens[position] for position in tokens.index)
        assert "".join(expected.tokens) == text
    sparse = run.encode(TEXTS, sparse=True, batch_size=1, all_positions=True)
    assert [tuple(t.shape) for t in sparse] == [(len(encoder.tokenize(text)), run.cfg.n_latents) for text in TEXTS]
    assert_close(sparse[0].to_dense(), encoder.encode_text(SNIPPET).latents, atol=1e-5, rtol=1e-5)
    assert run.encode(["abc"] * 3, batch_size=2)["text"].unique().tolist() == [0, 1, 2]
    # Batched, the padded forward's sums may differ in the last bits: the same firings all but rarely.
    key = ["text", "position", "latent"]
    batched = run.encode(TEXTS, all_positions=True).merge(frame, on=key, how="outer", indicator=True)
    assert (batched["_merge"] == "both").mean() > 0.95
    # By default, the positions the harvest and the probe's page leave out are left out here too.
    counted = run.encode(TEXTS, batch_size=1)
    assert 0 not in counted["position"].tolist() and counted.merge(frame, on=key).shape[0] == len(counted)
    assert set(frame["position"]) - set(counted["position"]) == {0}
    assert run.encode(["x"]).empty and run.encode(["x"], sparse=True)[0].to_dense().eq(0).all()


def test_encode_activations_and_reconstruct_apply_the_runs_normalisation(run):
    x = torch.randn(17, run.cfg.d_in) * 5
    latents = run.encode_activations(x)
    x_n, stats = run.cfg.norm.normalize(x)
    want = run.sae.encode(x_n)
    assert torch.equal(latents.indices, want.indices)
    assert_close(run.reconstruct(x), run.cfg.norm.restore(run.sae.decode(want), stats))


def test_worked_example_latents_of_a_snippet_then_densities_and_examples(run, tiny_db, tiny_sae_id):
    """docs/notebook.md's example, on the real SQLite file the tiny run was loaded into."""
    db = saescope.connect(tiny_db)
    fired = run.encode(SNIPPET)
    strongest = (fired.groupby("latent")["activation"].max().sort_values(ascending=False).head(5).rename("max_in_snippet"))
    latents = db.latents(tiny_sae_id)
    table = latents.join(strongest, how="inner").sort_values("max_in_snippet", ascending=False)
    assert len(table) == len(strongest) > 0
    assert (table["density"] > 0).all()  # it fired on the snippet, so the harvest saw it fire too
    examples = db.examples(tiny_sae_id, int(table.index[0]))
    assert isinstance(examples, pd.DataFrame) and not examples.empty
    assert examples.loc[examples["shown"], "activation"].gt(0).all()
    db.close()


def test_a_model_that_is_not_here_fails_only_when_text_is_encoded(tmp_path):
    from tests.test_openai_import import openai_state_dict, released, write_openai
    from trainer import interop

    run_dir = interop.import_sae(write_openai(released(tmp_path), openai_state_dict(1)), tmp_path / "run")
    weights_only = saescope.open_run(run_dir)
    x = torch.randn(4, weights_only.cfg.d_in)
    assert weights_only.encode_activations(x).indices.shape == (4, weights_only.cfg.k)
    with pytest.raises(Exception, match="gpt2"):
        weights_only.encode(["hello"])
