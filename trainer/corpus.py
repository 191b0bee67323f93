"""Text in, fixed-length contexts of token ids out.

The default corpus is the Python standard library's own source (code, comments, docstrings)
plus the prose of `pydoc_data.topics`: present on every Python, offline, written by many people.
Users bring their own: a `.txt`, `.jsonl` (a "text" field per line) or `.parquet` file, a folder
of them, or a folder written by Hugging Face `datasets`' `save_to_disk`. Parquet and `datasets`
folders are read column-wise and streamed, a record batch at a time (one column, `text_column`,
"text" by default), never whole into memory: `tokenize_contexts` stops reading once it has the
tokens it needs.
"""

from __future__ import annotations

import functools
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

STDLIB = "stdlib"
TEXT_COLUMN = "text"  # the default column of a Parquet file or a `datasets` folder (--text-column)
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DATASETS_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` writes next to its .arrow shards
DATASETS_DICT = "dataset_dict.json"  # ... and `DatasetDict.save_to_disk`, with a folder per split
BATCH_ROWS = 1024  # documents per record batch read from a Parquet file
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


class CorpusError(ValueError):
    """The corpus cannot be read or holds too little text."""


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's .py files sorted by path, without tests and third-party packages.
    Walked with os.walk, which skips those folders instead of listing them (0.01 s against 1.3 s
    for Path.rglob here), and once per process: `train` reads the corpus twice."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    topics = root / "pydoc_data" / "topics.py"  # read as prose below, not as one giant dict literal
    return tuple(sorted(path for path in files if path != topics))


def pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        yield topics[name]


def iter_documents(source: str, text_column: str = TEXT_COLUMN) -> Iterator[str]:
    """Documents in a fixed order: the stdlib, a local .txt/.jsonl/.parquet file, a folder of them
    (sorted by path), or a `datasets` save_to_disk folder. `text_column` names the column of the
    Parquet files and `datasets` folders."""
    if source == STDLIB:
        for path in stdlib_files():
            yield path.read_text(encoding="utf-8", errors="replace")
        yield from pydoc_topics()
        return
    path = Path(source)
    if path.is_dir() and ((path / DATASETS_STATE).is_file() or (path / DATASETS_DICT).is_file()):
        yield from _read_datasets_folder(path, text_column)
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(f"{path}: no .txt, .jsonl or .parquet files in this folder (nor a `datasets` save_to_disk folder)")
    elif path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise CorpusError(f"{path}: a corpus file must end in .txt, .jsonl or .parquet")
        files = [path]
    else:
        raise CorpusError(f"{source}: no such file or folder (or use '{STDLIB}')")
    for file in files:
        yield from _read_file(file, text_column)


def check_has_text(source: str, text_column: str = TEXT_COLUMN) -> None:
    """Fail unless some document holds non-blank text: cheap (it stops at the first one), so that
    an empty corpus fails before the model loads, not at tokenizing."""
    if not any(text.strip() for text in iter_documents(source, text_column)):
        raise CorpusError(f"{source}: the corpus holds no text (every document is blank)")


def _read_file(path: Path, text_column: str = TEXT_COLUMN) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    if path.suffix == ".parquet":
        yield from _read_parquet(path, text_column)
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorpusError(f"{path}:{lineno}: each line must be a JSON object with a 'text' field") from None
            yield str(text)


def _read_parquet(path: Path, text_column: str) -> Iterator[str]:
    """One column of a Parquet file, a record batch of BATCH_ROWS documents at a time (only that
    column's pages are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    with file:
        _check_column(path, file.schema_arrow, text_column)
        try:
            for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[text_column]):
                yield from _texts(batch.column(0))
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: cannot be read ({_first_line(e)})") from None


def _read_datasets_folder(folder: Path, text_column: str) -> Iterator[str]:
    """A folder written by `datasets`' save_to_disk: state.json lists its shards, Arrow IPC
    streams read through a memory map, a record batch at a time. A DatasetDict's folder
    (dataset_dict.json, a folder per split) is read through its "train" split."""
    import pyarrow as pa

    if not (folder / DATASETS_STATE).is_file():
        splits = _json_object(folder / DATASETS_DICT).get("splits") or []
        if "train" not in splits:
            raise CorpusError(f"{folder / DATASETS_DICT}: a DatasetDict without a 'train' split "
                              f"(splits: {', '.join(map(str, splits)) or 'none'}); give one split's folder, e.g. {folder / str(splits[0]) if splits else folder}")
        yield from _read_datasets_folder(folder / "train", text_column)
        return
    state = _json_object(folder / DATASETS_STATE)
    shards = [entry.get("filename") for entry in state.get("_data_files") or [] if isinstance(entry, dict)]
    if not shards or not all(isinstance(name, str) for name in shards):
        raise CorpusError(f"{folder / DATASETS_STATE}: lists no data files (_data_files); not a `datasets` save_to_disk folder")
    for name in shards:
        shard = folder / name
        if not shard.is_file():
            raise CorpusError(f"{shard}: file not found (listed in {folder / DATASETS_STATE})")
        try:
            with pa.memory_map(str(shard)) as source:
                reader = pa.ipc.open_stream(source)
                _check_column(shard, reader.schema, text_column)
                index = reader.schema.get_field_index(text_column)
                for batch in reader:
                    yield from _texts(batch.column(index))
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{shard}: not a readable Arrow stream ({_first_line(e)})") from None


def _check_column(path: Path, schema, text_column: str) -> None:
    import pyarrow as pa

    if text_column not in schema.names:
        shown = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
        raise CorpusError(f"{path}: no column {text_column!r} (its columns: {shown or 'none'}); choose one with --text-column")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise CorpusError(f"{path}: column {text_column!r} holds {kind}, not text; choose a text column with --text-column")


def _texts(column) -> Iterator[str]:
    """A record batch's text column as strings; missing values (null) are skipped."""
    for text in column.to_pylist():
        if text is not None:
            yield text


def _json_object(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(found, dict):
        raise CorpusError(f"{path}: expected a JSON object")
    return found


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def tokenize_contexts(tokenizer, documents: Iterator[str], context_length: int, n_contexts: int) -> torch.Tensor:
    """Concatenate documents (separated by the end-of-text token) and cut the stream into
    `n_contexts` contexts of `context_length` tokens: (n_contexts, context_length) int64.
    Reads only as many documents as needed."""
    separator = tokenizer.eos_token_id
    needed = n_contexts * context_length
    stream: list[int] = []
    for text in documents:
        if not text.strip():
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise CorpusError(
            f"the corpus holds {len(stream):,} tokens, fewer than the {needed:,} asked for "
            f"({n_contexts:,} contexts of {context_length})"
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(n_contexts, context_length)


def split_contexts(contexts: torch.Tensor, n_heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle contexts with `seed` and split off `n_heldout` of them: (train, heldout)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(contexts.shape[0], generator=generator)
    return contexts[order[n_heldout:]], contexts[order[:n_heldout]]
