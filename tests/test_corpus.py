"""Corpora: the stdlib default, local files, determinism and clear errors."""

import json

import pytest
import torch

from trainer import corpus
from trainer.corpus import CorpusError


class CharTokenizer:
    """One token per character: enough to test the chunking without a model."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def test_stdlib_files_sorted_without_tests():
    files = corpus.stdlib_files()
    assert list(files) == sorted(files) and len(files) > 300
    for path in files:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(path.parts)
    assert any(path.name == "argparse.py" for path in files)
    assert not any(path.parts[-2:] == ("pydoc_data", "topics.py") for path in files)  # read as prose


def test_stdlib_documents_include_pydoc_topics():
    docs = list(corpus.pydoc_topics())
    assert docs and any("assignment" in doc.lower() for doc in docs)


def test_contexts_are_deterministic_and_split_by_seed():
    contexts = corpus.tokenize_contexts(CharTokenizer(), corpus.iter_documents("stdlib"), 16, 50)
    again = corpus.tokenize_contexts(CharTokenizer(), corpus.iter_documents("stdlib"), 16, 50)
    assert contexts.shape == (50, 16) and torch.equal(contexts, again)
    train, heldout = corpus.split_contexts(contexts, 10, seed=3)
    train2, heldout2 = corpus.split_contexts(contexts, 10, seed=3)
    assert torch.equal(train, train2) and torch.equal(heldout, heldout2)
    assert train.shape == (40, 16) and heldout.shape == (10, 16)
    _, other = corpus.split_contexts(contexts, 10, seed=4)
    assert not torch.equal(heldout, other)
    rows = {tuple(row) for row in torch.cat([train, heldout]).tolist()}
    assert rows == {tuple(row) for row in contexts.tolist()}


def test_local_txt_and_jsonl_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x")
    assert list(corpus.iter_documents(str(tmp_path))) == ["hello world", "second", "third"]
    contexts = corpus.tokenize_contexts(CharTokenizer(), corpus.iter_documents(str(tmp_path / "a.txt")), 4, 2)
    assert contexts.shape == (2, 4)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p / "missing.txt", "no such file"),
        (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", "must end in .txt or .jsonl"),
        (lambda p: (p / "bad.jsonl").write_text('{"nottext": 1}\n') and p / "bad.jsonl", "bad.jsonl:1"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no .txt or .jsonl"),
    ],
)
def test_bad_corpus_errors(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message):
        list(corpus.iter_documents(str(make(tmp_path))))


def test_too_little_text_says_how_much(tmp_path):
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(CorpusError, match="holds 5 tokens, fewer than the 64"):
        corpus.tokenize_contexts(CharTokenizer(), corpus.iter_documents(str(tmp_path / "small.txt")), 8, 8)
