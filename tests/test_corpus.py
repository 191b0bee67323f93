"""Corpora: the stdlib default, local files, determinism and clear errors."""

import json
from pathlib import Path

import pytest
import torch

from trainer import corpus
from trainer.corpus import CorpusError
from trainer.errors import ConfigError


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
        (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", r"must end in .txt, .jsonl or .parquet"),
        (lambda p: (p / "bad.jsonl").write_text('{"nottext": 1}\n') and p / "bad.jsonl", "bad.jsonl:1"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"no .txt, .jsonl or .parquet files"),
    ],
)
def test_bad_corpus_errors(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message):
        list(corpus.iter_documents(str(make(tmp_path))))


def test_too_little_text_says_how_much(tmp_path):
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(CorpusError, match="holds 5 tokens, fewer than the 64"):
        corpus.tokenize_contexts(CharTokenizer(), corpus.iter_documents(str(tmp_path / "small.txt")), 8, 8)


# ---------------------------------------------------------------- Parquet and `datasets` folders


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_file_and_folder(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": ["one", None, "two"], "n": [1, 2, 3]})
    write_parquet(tmp_path / "b.parquet", {"body": ["x"], "text": ["three"]})
    (tmp_path / "c.txt").write_text("four")
    assert list(corpus.iter_documents(str(tmp_path / "a.parquet"))) == ["one", "two"]  # a null is no document
    assert list(corpus.iter_documents(str(tmp_path))) == ["one", "two", "three", "four"]  # sorted by path
    assert list(corpus.iter_documents(str(tmp_path / "b.parquet"), text_column="body")) == ["x"]


def test_parquet_errors_name_the_file_and_the_column(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", {"body": ["x"], "n": [1]})
    with pytest.raises(CorpusError, match=r"data.parquet: no column 'text' \(its columns: body, n\); choose one with --text-column"):
        list(corpus.iter_documents(str(path)))
    with pytest.raises(CorpusError, match=r"data.parquet: column 'n' holds int64, not text"):
        list(corpus.iter_documents(str(path), text_column="n"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=r"broken.parquet: not a readable Parquet file"):
        list(corpus.iter_documents(str(tmp_path / "broken.parquet")))


def test_parquet_is_streamed(tmp_path):
    """Reading the first documents of a 48 MB Parquet file holds one record batch (1,024
    documents, here 4 MB), not the file."""
    import pyarrow as pa

    texts = [f"document {i} " + "x" * 4000 for i in range(12_000)]  # 48 MB of text (1 MB on disk)
    path = write_parquet(tmp_path / "big.parquet", {"text": texts}, row_group_size=256)
    before = pa.total_allocated_bytes()
    documents = corpus.iter_documents(str(path))
    first = [next(documents) for _ in range(3)]
    held = pa.total_allocated_bytes() - before
    assert first[0].startswith("document 0 ")
    assert held < 12_000_000, f"{held:,} bytes held after three documents"
    documents.close()


def test_datasets_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", None, "beta", "gamma"], "label": [0, 1, 0, 1]})
    ds.save_to_disk(str(tmp_path / "ds"), max_shard_size="1KB")  # several shards, read in their order
    assert list(corpus.iter_documents(str(tmp_path / "ds"))) == ["alpha", "beta", "gamma"]
    datasets.DatasetDict({"train": ds.select([0]), "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert list(corpus.iter_documents(str(tmp_path / "dd"))) == ["alpha"]  # a DatasetDict: its train split
    assert list(corpus.iter_documents(str(tmp_path / "dd" / "test"))) == ["beta"]
    with pytest.raises(CorpusError, match=r"data-0000\d-of-0000\d.arrow: no column 'body' \(its columns: text, label\)"):
        list(corpus.iter_documents(str(tmp_path / "ds"), text_column="body"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "only-test"))
    with pytest.raises(CorpusError, match=r"dataset_dict.json: a DatasetDict without a 'train' split \(splits: test\)"):
        list(corpus.iter_documents(str(tmp_path / "only-test")))


def test_text_column_identifies_the_store_only_when_not_the_default():
    from trainer.config import TrainConfig

    assert "text_column" not in TrainConfig().store_config().meta()  # stores made before the option still match
    assert TrainConfig(text_column="body").store_config().meta()["text_column"] == "body"
    with pytest.raises(ConfigError, match="--text-column"):
        TrainConfig(text_column="")
