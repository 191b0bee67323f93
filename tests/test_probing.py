"""Probe loss: Python's own tokenize as labels, the 1-D logistic probes, labelled texts, and eval."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.probe_tasks import (
    TASKS, ProbeTaskError, python_char_labels, read_probe_tasks, split_of, token_chars, token_labels,
)
from trainer.probing import Columns, base_entropy, fit_dense_probe, fit_logistic_1d, latent_columns

SNIPPET = '''"""Module doc."""
import os

@decorator(1)
class Thing(Base):
    def method(self, x=2):
        # a comment
        if x >= 3:
            return len(x) + 0x1F
        return self.len
'''


def spans(source: str, labels: np.ndarray) -> list[str]:
    """The runs of labelled characters, as text."""
    found, i = [], 0
    while i < len(labels):
        if labels[i]:
            j = i
            while j < len(labels) and labels[j]:
                j += 1
            found.append(source[i:j])
            i = j
        else:
            i += 1
    return found


def test_python_labels_mark_each_task_on_known_tokens():
    labels = python_char_labels(SNIPPET)
    assert set(labels) == set(TASKS) and len(TASKS) >= 12
    got = {task: spans(SNIPPET, found) for task, found in labels.items()}
    assert got["string"] == ['"""Module doc."""']
    assert got["docstring"] == ['"""Module doc."""']
    assert got["comment"] == ["# a comment"]
    assert got["keyword"] == ["import", "class", "def", "if", "return", "return"]
    assert got["builtin"] == ["len"]  # not self.len, an attribute
    assert got["defined_name"] == ["Thing", "method"]
    assert got["number"] == ["1", "2", "3", "0x1F"]
    assert got["operator"] == [">=", "+"]  # not the decorator's @, not the default's =
    assert got["in_brackets"] == ["1", "Base", "self, x=2", "x"]
    assert got["line_start"] == ['"', "i", "@", "c", "d", "#", "i", "r", "r"]
    assert got["deep_indent"] == ["        if x >= 3:\n            return len(x) + 0x1F\n        return self.len\n"]
    assert got["decorator"] == ["@decorator(1)\n"]


def test_a_docstring_of_a_function_is_one_and_a_later_string_is_not():
    source = 'def f():\n    "doc é"\n    x = "not doc"\n'
    labels = python_char_labels(source)
    assert spans(source, labels["docstring"]) == ['"doc é"']  # ast's byte columns read as characters
    assert spans(source, labels["string"]) == ['"doc é"', '"not doc"']


@pytest.mark.parametrize("source", ["Some prose, not (Python", "def f(:\n", "x = 1 <script>alert(1)</script>\n", "\x00"])
def test_text_that_is_not_python_gets_no_labels(source):
    assert python_char_labels(source) is None


def test_a_token_is_labelled_by_its_first_non_blank_character():
    pieces = ["    ", " return", " len", "(", "x", ")", "", "\n"]  # "" holds part of a character
    chars = token_chars(pieces)
    assert chars.tolist() == [0, 5, 12, 15, 16, 17, -1, 18]
    text = "".join(pieces)
    labels, valid = token_labels({"kw": np.array([c in "return" and i in range(5, 11) for i, c in enumerate(text)])},
                                 chars, ["kw"])
    assert labels[:, 0].tolist() == [False, True, False, False, False, False, False, False]
    assert valid.tolist() == [True] * 6 + [False, True]


# ---------------------------------------------------------------- the fits


def test_a_latent_equal_to_the_label_probes_near_zero_and_a_constant_at_the_base_entropy():
    torch.manual_seed(0)
    y = (torch.rand(4000) < 0.3).float()
    indices = torch.tensor([[0, 1]]).repeat(4000, 1)
    values = torch.stack([2.0 * y, torch.rand(4000)], 1)  # latent 0 fires exactly on the positives
    w, b, loss = fit_logistic_1d(latent_columns(indices, values, 3), y)
    share = float(y.mean())
    entropy = -(share * math.log(share) + (1 - share) * math.log(1 - share))
    assert loss[0] < 0.01
    assert loss[1] == pytest.approx(entropy, abs=2e-3)  # noise: hardly better than the base rate
    assert loss[2] == pytest.approx(entropy, abs=1e-6)  # never fires: exactly the base rate
    dense = torch.stack([values[:, 0], values[:, 1], torch.zeros(4000)], 1)
    assert torch.allclose(fit_logistic_1d(Columns(dense), y)[2], loss, atol=1e-5)  # sparse = dense


def test_the_newton_fit_matches_a_reference_optimiser():
    torch.manual_seed(1)
    y = (torch.rand(3000) < 0.4).double()
    x = (y + 0.7 * torch.randn(3000, dtype=torch.float64)) * 5 + 2
    w, b, loss = fit_logistic_1d(Columns(x[:, None].float()), y.float(), l2=1e-4)
    scale = float(x.pow(2).mean().sqrt())
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(params[0] * x / scale + params[1], y) + 1e-4 / 2 * params[0] ** 2
        value.backward()
        return value

    optimizer.step(closure)
    ref_w, ref_b = float(params[0].detach()) / scale, float(params[1].detach())
    assert float(w[0]) == pytest.approx(ref_w, rel=1e-4) and float(b[0]) == pytest.approx(ref_b, rel=1e-4)
    assert float(loss[0]) == pytest.approx(float(F.binary_cross_entropy_with_logits(ref_w * x + ref_b, y)), rel=1e-6)


@pytest.mark.parametrize("sparse", [True, False])
def test_tasks_fitted_together_get_each_task_own_fit(sparse):
    torch.manual_seed(3)
    n, n_latents = 3000, 6
    y = (torch.rand(n, 3) < torch.tensor([0.2, 0.5, 0.05])).float()
    indices = torch.stack([torch.randperm(n_latents)[:3] for _ in range(n)])
    values = torch.rand(n, 3) + y[:, :1] * (indices == 0) + 2 * y[:, 1:2] * (indices == 1)  # latent 0 ~ task 0, 1 ~ task 1
    columns = latent_columns(indices, values, n_latents)
    if not sparse:
        dense = torch.zeros(n, n_latents).scatter_add_(1, indices, values)
        columns = Columns(dense)
    w, b, loss = fit_logistic_1d(columns, y)
    assert w.shape == b.shape == loss.shape == (n_latents, 3)
    for task in range(3):
        w_1, b_1, loss_1 = fit_logistic_1d(columns, y[:, task])
        assert torch.allclose(loss[:, task], loss_1, atol=1e-6)
        assert torch.allclose(w[:, task], w_1, atol=1e-3) and torch.allclose(b[:, task], b_1, atol=1e-3)
    assert int(loss[:, 0].argmin()) == 0 and int(loss[:, 1].argmin()) == 1


def test_latents_that_never_fire_probe_at_the_base_rate_even_when_none_fires():
    y = (torch.arange(60) % 3 == 0).float()
    share = float(y.mean())
    entropy = -(share * math.log(share) + (1 - share) * math.log(1 - share))
    silent = latent_columns(torch.zeros(60, 2, dtype=torch.long), torch.zeros(60, 2), 4)  # no entry at all
    assert torch.allclose(fit_logistic_1d(silent, y)[2], torch.full((4,), entropy), atol=1e-6)
    assert fit_logistic_1d(silent, torch.stack([y, 1 - y], 1))[2].shape == (4, 2)


def test_the_dense_probe_reads_a_direction_no_single_dimension_holds():
    torch.manual_seed(2)
    x = torch.randn(3000, 8)
    y = ((x[:, 0] + x[:, 1] - x[:, 2]) > 0).float()
    single = fit_logistic_1d(Columns(x), y)[2].min()
    dense = fit_dense_probe(x, y)
    assert float(F.binary_cross_entropy_with_logits(dense(x), y.double())) < 0.5 * float(single)
    assert base_entropy(y, y) == pytest.approx(-(y.mean() * y.mean().log() + (1 - y.mean()) * (1 - y.mean()).log()).item(), rel=1e-5)


# ---------------------------------------------------------------- --probe-tasks


def write_lines(tmp_path, lines) -> str:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_labelled_texts_are_read_and_split_by_text(tmp_path):
    lines = [{"task": "neg", "text": f"it is not {i}", "spans": [[6, 9]]} for i in range(4)]
    lines += ["", {"task": "other", "text": "a b", "spans": []}, {"task": "other", "text": "c d", "spans": [[0, 1]]}]
    texts = read_probe_tasks(write_lines(tmp_path, lines))
    assert [t.task for t in texts] == ["neg"] * 4 + ["other"] * 2
    assert texts[0].char_labels().tolist() == [False] * 6 + [True] * 3 + [False] * 2
    assert texts[4].line == 6  # the blank line still counts
    assert split_of(texts) == [False, False, True, False, False, True]


@pytest.mark.parametrize("line, message", [
    ("{not json", "tasks.jsonl:1: not JSON"),
    ('["task"]', "expected an object"),
    ({"task": "t", "text": "abc"}, "missing 'spans'"),
    ({"task": "", "text": "abc", "spans": []}, "'task' must be a non-empty string"),
    ({"task": "t", "text": 3, "spans": []}, "'text' must be a non-empty string"),
    ({"task": "t", "text": "abc", "spans": [[0, 9]]}, "span [0, 9] is not within the text's 3 characters"),
    ({"task": "t", "text": "abc", "spans": [[2, 1]]}, "span [2, 1]"),
    ({"task": "t", "text": "abc", "spans": [[0, 1.5]]}, "each span must be [start, end]"),
    ({"task": "t", "text": "abc", "spans": "0-1"}, "'spans' must be a list"),
])
def test_a_malformed_line_is_named_with_its_fault(tmp_path, line, message):
    good = {"task": "t", "text": "abc", "spans": [[0, 1]]}
    with pytest.raises(ProbeTaskError, match=None) as error:
        read_probe_tasks(write_lines(tmp_path, [line, good, good]))
    assert message in str(error.value)


def test_a_task_with_one_text_or_an_empty_file_is_refused(tmp_path):
    with pytest.raises(ProbeTaskError, match="task 'solo' has one text"):
        read_probe_tasks(write_lines(tmp_path, [{"task": "solo", "text": "abc", "spans": []}]))
    with pytest.raises(ProbeTaskError, match="no labelled texts"):
        read_probe_tasks(write_lines(tmp_path, [""]))
    with pytest.raises(ProbeTaskError, match="cannot be read"):
        read_probe_tasks(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def python_store(tiny_model_dir, tmp_path_factory):
    """A store of the tiny model over unaltered stdlib source (the hostile corpus is not Python)."""
    from trainer.corpus import stdlib_files
    from trainer.store import StoreConfig, prepare_store

    folder = tmp_path_factory.mktemp("python-corpus")
    for path in stdlib_files()[:30]:
        (folder / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8"))
    store = tmp_path_factory.mktemp("python-store")
    prepare_store(StoreConfig(model=str(tiny_model_dir), layer=1, corpus=str(folder), context_length=32,
                              tokens=4096, heldout_tokens=2048), store)
    return store


@pytest.mark.slow
def test_eval_writes_the_probe_loss_and_the_progressive_fvu(tiny_run, python_store, tmp_path):
    from saescope.cli import main
    from trainer import runfolder
    from trainer.probing import heldout_python_labels
    from trainer.store import ActivationStore
    from trainer.model import load_tokenizer
    from trainer.runconfig import RunConfig

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["eval", str(run), "--store", str(python_store), "--downstream-contexts", "0", "--ablation-samples", "0"]) == 0
    metrics = runfolder.load_metrics(run)
    table = metrics["probe_tasks"]
    assert [row["task"] for row in table] == list(TASKS)
    scored = [row for row in table if "skipped" not in row]
    assert len(scored) >= 8, table
    for row in scored:
        assert 0 <= row["dense_loss"] and 0 <= row["latent_loss"] and row["base_entropy"] > 0  # the train share on the test split: may exceed log 2
        assert 0 <= row["best_latent"] < 64 and 0 <= row["positives"] <= 1
    assert metrics["probe_loss"] == pytest.approx(sum(row["latent_loss"] for row in scored) / len(scored))
    assert set(metrics["progressive_fvu"]) == {"1", "2", "4", "8", "16"}  # k = 4 of 64 latents
    assert metrics["progressive_fvu"]["4"] == metrics["fvu"]
    assert metrics["progressive_fvu"]["16"] < metrics["progressive_fvu"]["1"]

    # The labels are the corpus's: every labelled held-out token is the one the store holds, and
    # a position is labelled where its whole document tokenizes as Python.
    store = ActivationStore.open(python_store)
    labels, valid, dropped = heldout_python_labels(store, load_tokenizer(RunConfig.load(run).model))
    assert valid.mean() > 0.9 and dropped["documents"] == 0
    assert labels[..., list(TASKS).index("keyword")].any()


@pytest.mark.slow
def test_the_labels_are_kept_beside_the_store_and_redone_when_it_changes(tiny_run, python_store, tmp_path):
    from trainer import runfolder
    from trainer.evaluate import evaluate_run
    from trainer.model import load_tokenizer
    from trainer.probing import LABELS_CACHE, heldout_labels, heldout_python_labels
    from trainer.runconfig import RunConfig
    from trainer.store import ActivationStore

    store_dir = tmp_path / "store"
    shutil.copytree(python_store, store_dir)
    (store_dir / LABELS_CACHE).unlink(missing_ok=True)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    evaluate_run(run, store_dir=store_dir, downstream_contexts=0, ablation_samples=0)
    first = runfolder.load_metrics(run)["probe_tasks"]
    store = ActivationStore.open(store_dir)
    tokenizer = load_tokenizer(RunConfig.load(run).model)
    labels, valid, _ = heldout_python_labels(store, tokenizer)
    kept = np.load(store_dir / LABELS_CACHE)
    assert np.array_equal(kept["labels"], labels) and np.array_equal(kept["valid"], valid)

    # A later eval reads them, not the corpus: with the corpus gone it gives the same table.
    corpus = tmp_path / "corpus-elsewhere"
    shutil.move(store.meta["corpus"], corpus)
    try:
        evaluate_run(run, store_dir=store_dir, downstream_contexts=0, ablation_samples=0)
        assert runfolder.load_metrics(run)["probe_tasks"] == first
        # Held-out tokens that differ (a store rebuilt in place) do not match the kept labels.
        tokens = np.load(store_dir / "tokens.npy")
        tokens[-1, -1] = (tokens[-1, -1] + 1) % 50
        np.save(store_dir / "tokens.npy", tokens)
        with pytest.raises(Exception, match="corpus|No such file|not found"):
            heldout_labels(ActivationStore.open(store_dir), tokenizer)
    finally:
        shutil.move(corpus, store.meta["corpus"])


@pytest.mark.slow
def test_eval_on_labelled_texts_and_on_a_corpus_that_is_not_python(tiny_run, tmp_path):
    from saescope.cli import main
    from trainer import runfolder

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # The tiny run's corpus carries HTML on every third line: no document parses, nothing to probe.
    assert main(["eval", str(run), "--downstream-contexts", "0", "--ablation-samples", "0"]) == 0
    metrics = runfolder.load_metrics(run)
    assert metrics["probe_loss"] is None and "tokenizes as Python" in metrics["probe_note"]

    words = ["alpha", "beta", "gamma", "delta", "if", "for", "while", "return"]
    lines = []
    for i in range(12):
        text = " ".join(words[(i + j) % len(words)] for j in range(40))
        lines.append({"task": "loop", "text": text, "spans": [[m.start(), m.end()] for m in __import__("re").finditer(r"for|while", text)]})
    tasks = write_lines(tmp_path, lines)
    assert main(["eval", str(run), "--downstream-contexts", "0", "--ablation-samples", "0", "--probe-tasks", str(tasks)]) == 0
    metrics = runfolder.load_metrics(run)
    (row,) = metrics["probe_tasks"]
    assert row["task"] == "loop" and "skipped" not in row and metrics["probe_source"] == str(tasks)
    assert row["latent_loss"] < row["base_entropy"]  # some latent tells these words apart
    assert metrics["probe_loss"] == row["latent_loss"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "x"}\n')
    before = (run / "metrics.json").read_text()
    assert main(["eval", str(run), "--probe-tasks", str(bad)]) == 2
    assert (run / "metrics.json").read_text() == before  # refused before any work
