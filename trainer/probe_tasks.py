"""Binary token tasks for the probe loss (trainer/probing.py): where each label comes from.

Two sources:

- **Python source, labelled by Python itself.** `python_char_labels` runs the standard library's
  `tokenize` (and `ast`, for docstrings) over a whole document and marks, character by character,
  the twelve tasks of TASKS. A document that does not tokenize or parse as Python (prose, a
  fragment, Python 2) gets no labels at all: it is dropped and counted, never guessed at.
- **A JSONL file** (`--probe-tasks FILE`), for any corpus, one labelled text per line:

      {"task": "negation", "text": "It is not raining.", "spans": [[6, 9]]}

  `task` names the task (a name may repeat over many lines: they are its texts), `text` is the
  text, `spans` the positive characters as [start, end) offsets into `text` (Python string
  indices, end exclusive; [] for a text with no positives). Blank lines are skipped. Every task
  needs at least two texts: texts, not tokens, are split into train and test (`split_of`).

A model token is labelled by its first non-whitespace character (its first character when it is
all whitespace): " return" is a keyword token, "    " at the start of a deeply indented line is
indented. A token that holds no whole character (part of a character split over byte tokens)
has no label and is left out.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import keyword
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import ConfigError

TASKS = {
    "string": "inside a string literal (docstrings and f-strings included)",
    "comment": "inside a comment",
    "keyword": "a keyword (if, def, return, and, None, ...)",
    "builtin": "a builtin name (len, print, ValueError, ...), not an attribute or a name being defined",
    "defined_name": "the name being defined after def or class",
    "number": "a numeric literal",
    "operator": "an operator (+ - * / // % ** @ << >> & | ^ ~ := < > <= >= == !=, augmented assignments)",
    "in_brackets": "inside (), [] or {} (the brackets themselves not)",
    "line_start": "the first token of a line",
    "deep_indent": "on a line indented two levels or more",
    "decorator": "in a decorator line",
    "docstring": "in a docstring (of a module, class or function)",
}
OPERATORS = {"+", "-", "*", "**", "/", "//", "%", "@", "<<", ">>", "&", "|", "^", "~", ":=", "<", ">", "<=",
             ">=", "==", "!=", "+=", "-=", "*=", "/=", "//=", "%=", "@=", "&=", "|=", "^=", ">>=", "<<=", "**="}
OPENING, CLOSING = set("([{"), set(")]}")
BUILTINS = {name for name in dir(builtins) if not name.startswith("_")} - set(keyword.kwlist)
# Python 3.12 splits f-strings into FSTRING_START .. FSTRING_END; 3.11 gives one STRING token.
FSTRING_START, FSTRING_END = getattr(tokenize, "FSTRING_START", -1), getattr(tokenize, "FSTRING_END", -2)
LAYOUT = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.ENCODING}


class ProbeTaskError(ConfigError):
    """A --probe-tasks file that cannot be read (printed as one line naming the file and line)."""


# ---------------------------------------------------------------- Python source


def python_char_labels(source: str) -> dict[str, np.ndarray] | None:
    """Each task of TASKS as a (len(source),) bool array over the characters, or None when the
    source is not Python that this interpreter tokenizes and parses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes etc. warn; they still parse
        try:
            tree = ast.parse(source)
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, ValueError, tokenize.TokenError, IndentationError, RecursionError, MemoryError):
            return None
    lines = source.splitlines(keepends=True)
    starts = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(np.int64)

    def offset(row_col: tuple[int, int]) -> int:
        row, col = row_col
        return int(starts[row - 1]) + col if row - 1 < len(starts) else len(source)

    labels = {task: np.zeros(len(source), dtype=bool) for task in TASKS}

    def mark(task: str, start: int, end: int) -> None:
        labels[task][start:end] = True

    brackets: list[int] = []  # offsets just after each open bracket
    fstrings: list[int] = []  # (3.12+) offsets of open f-strings
    depth, line_begin, line_depth, line_first, line_first_offset = 0, None, 0, None, -1
    previous = None  # the previous significant token
    rows_started: set[int] = set()
    for tok in tokens:
        start, end = offset(tok.start), offset(tok.end)
        if tok.type == tokenize.INDENT:
            depth += 1
            continue
        if tok.type == tokenize.DEDENT:
            depth -= 1
            continue
        if tok.type in LAYOUT and tok.type != tokenize.NEWLINE:
            continue
        if tok.type == tokenize.NEWLINE:  # the end of a logical line
            if line_begin is not None:
                if line_depth >= 2:
                    mark("deep_indent", line_begin, end)
                if line_first == "@":
                    mark("decorator", line_first_offset, end)
            line_begin, line_first, previous = None, None, None
            continue
        if tok.start[0] not in rows_started:  # the first token on its physical line
            rows_started.add(tok.start[0])
            mark("line_start", start, start + 1)
        if tok.type == tokenize.COMMENT:
            mark("comment", start, end)
            continue
        if line_begin is None:  # the first token of a logical line
            line_begin, line_depth, line_first, line_first_offset = int(starts[tok.start[0] - 1]), depth, tok.string, start
        if tok.type == FSTRING_START:
            fstrings.append(start)
        elif tok.type == FSTRING_END and fstrings:
            mark("string", fstrings.pop(), end)
        elif tok.type == tokenize.STRING:
            mark("string", start, end)
        elif tok.type == tokenize.NUMBER:
            mark("number", start, end)
        elif tok.type == tokenize.NAME and not fstrings:
            after_def = previous is not None and previous.type == tokenize.NAME and previous.string in ("def", "class")
            if keyword.iskeyword(tok.string):
                mark("keyword", start, end)
            elif after_def:
                mark("defined_name", start, end)
            elif tok.string in BUILTINS and not (previous is not None and previous.string == "."):
                mark("builtin", start, end)
        elif tok.type == tokenize.OP and not fstrings:
            if tok.string in OPENING:
                brackets.append(end)
            elif tok.string in CLOSING and brackets:
                mark("in_brackets", brackets.pop(), start)
            elif tok.string in OPERATORS and not (tok.string == "@" and start == line_first_offset):
                mark("operator", start, end)
        previous = tok
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                mark("docstring", char_offset(lines, starts, first.lineno, first.col_offset),
                     char_offset(lines, starts, first.end_lineno, first.end_col_offset))
    return labels


def char_offset(lines: list[str], starts: np.ndarray, lineno: int, byte_col: int) -> int:
    """ast's (line, UTF-8 byte column) as an offset into the source's characters."""
    line = lines[lineno - 1] if lineno - 1 < len(lines) else ""
    return int(starts[lineno - 1]) + len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


# ---------------------------------------------------------------- tokens


def token_chars(pieces: list[str]) -> np.ndarray:
    """Each model token's labelling character (see the module docstring) as an offset into the
    text its pieces join into, -1 for a token that holds no character."""
    chars = np.full(len(pieces), -1, dtype=np.int64)
    position = 0
    for i, piece in enumerate(pieces):
        if piece and "\ufffd" not in piece:
            stripped = len(piece) - len(piece.lstrip())
            chars[i] = position + (stripped if stripped < len(piece) else 0)
        position += len(piece)
    return chars


def token_labels(char_labels: dict[str, np.ndarray], chars: np.ndarray, tasks) -> tuple[np.ndarray, np.ndarray]:
    """(n_tokens, len(tasks)) labels of the tokens whose labelling characters are `chars`, and
    (n_tokens,) which tokens have one."""
    valid = chars >= 0
    where = np.where(valid, chars, 0)
    labels = np.stack([char_labels[task][where] if len(char_labels[task]) else np.zeros(len(chars), bool)
                       for task in tasks], 1)
    return labels & valid[:, None], valid


# ---------------------------------------------------------------- JSONL tasks


@dataclass(frozen=True)
class LabelledText:
    task: str
    text: str
    spans: tuple[tuple[int, int], ...]
    line: int  # in the file, for messages

    def char_labels(self) -> np.ndarray:
        labels = np.zeros(len(self.text), dtype=bool)
        for start, end in self.spans:
            labels[start:end] = True
        return labels


def read_probe_tasks(path: Path) -> list[LabelledText]:
    """The texts of a --probe-tasks JSONL file (format: the module docstring), checked whole
    before anything runs: the first bad line is a ProbeTaskError naming it."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeTaskError(f"--probe-tasks {path}: cannot be read ({e})") from None
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            texts.append(_parse_line(path, number, line))
    if not texts:
        raise ProbeTaskError(f"--probe-tasks {path}: no labelled texts (one JSON object per line)")
    counts: dict[str, int] = {}
    for text in texts:
        counts[text.task] = counts.get(text.task, 0) + 1
    if few := sorted(task for task, n in counts.items() if n < 2):
        raise ProbeTaskError(f"--probe-tasks {path}: task {few[0]!r} has one text; each task needs two or more "
                             "(texts are split into train and test)")
    return texts


def _parse_line(path: Path, number: int, line: str) -> LabelledText:
    where = f"--probe-tasks {path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProbeTaskError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ProbeTaskError(f'{where}: expected an object {{"task": ..., "text": ..., "spans": [[start, end], ...]}}')
    missing = [key for key in ("task", "text", "spans") if key not in record]
    if missing:
        raise ProbeTaskError(f"{where}: missing {', '.join(repr(key) for key in missing)}")
    task, text, spans = record["task"], record["text"], record["spans"]
    if not isinstance(task, str) or not task.strip():
        raise ProbeTaskError(f"{where}: 'task' must be a non-empty string")
    if not isinstance(text, str) or not text:
        raise ProbeTaskError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(spans, list):
        raise ProbeTaskError(f"{where}: 'spans' must be a list of [start, end] pairs")
    checked = []
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
            raise ProbeTaskError(f"{where}: each span must be [start, end] (two integers), got {json.dumps(span)[:40]}")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ProbeTaskError(f"{where}: span [{start}, {end}] is not within the text's {len(text)} characters "
                                 "(0 <= start < end <= length)")
        checked.append((start, end))
    return LabelledText(task.strip(), text, tuple(checked), number)


def split_of(texts: list[LabelledText]) -> list[bool]:
    """Which texts are test texts: every third of each task's (its 3rd, 6th, ...), and its last
    where it has fewer than three."""
    seen: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        seen.setdefault(text.task, []).append(i)
    test = [False] * len(texts)
    for indices in seen.values():
        chosen = indices[2::3] or indices[-1:]
        for i in chosen:
            test[i] = True
    return test
