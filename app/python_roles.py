"""What a token is in Python source, in words, for search documents: Python's own tokenizer
says whether it is in a comment, a string, a docstring, a number, a keyword or an operator, and
Python's own help (`pydoc`'s index of keywords, symbols and topics, with the reference's section
titles from `pydoc_data`) names what a keyword or operator is for:

    roles("for x in y:  # each\\n")   # [(0, 3, 'the for statement looping'), ..., (13, 19, 'comment')]

`def` is "function definitions functions methods", `for` "the for statement looping", `except`
"the try statement exceptions", `%` "operators formatting": the words a researcher types for what a
latent fires on ("loops", "function definition", "exception handling"), derived from Python's
documentation, not from a list of queries. A harvest context starts anywhere in a file, often
inside a docstring: it is read both as it is and as the continuation of a triple-quoted string,
and the reading with fewer tokenizer errors wins; a line the tokenizer cannot read is skipped.
"""

from __future__ import annotations

import io
import keyword
import pydoc
import re
import tokenize
from functools import cache

Span = tuple[int, int, str]  # (start, end) character offsets in the text, and the words


def first_sentence(label: str) -> str:
    """A reference section's title and the first sentence of its prose (grammar lines, `::=`,
    skipped): 'The "try" statement specifies exception handlers and/or cleanup code ...'."""
    from pydoc_data.topics import topics

    lines = topics.get(label, "").strip().splitlines()
    prose = " ".join(line.strip() for line in lines[2:] if "::=" not in line and not line.startswith(" " * 16))
    return " ".join([lines[0] if lines else "", re.split(r"(?<=[.:])\s", prose.strip(), maxsplit=1)[0]])


def _label(entry, hops: int = 0) -> str | None:
    """The reference section of a pydoc keyword or topic entry (following aliases)."""
    while isinstance(entry, str) and entry and hops < 5:  # an alias: another keyword or a topic
        entry, hops = pydoc.Helper.keywords.get(entry) or pydoc.Helper.topics.get(entry), hops + 1
    return entry[0] if isinstance(entry, tuple) else None


@cache
def keyword_words() -> dict[str, str]:
    """Each keyword's words: its section of the language reference (title and first sentence),
    and pydoc's topics that list it as related (LOOPING lists for, while, break and continue),
    their names and first sentences (EXCEPTIONS: "... in order to handle errors ...")."""
    words = {}
    for name in keyword.kwlist:
        related = [(topic, value[0]) for topic, value in pydoc.Helper.topics.items()
                   if isinstance(value, tuple) and name in value[1].split()]
        text = " ".join([first_sentence(_label(pydoc.Helper.keywords.get(name)) or ""),
                         *(f"{topic} {first_sentence(label)}" for topic, label in related)])
        # Each word once: a section's title and its topics repeat the same words ("the try
        # statement ... exceptions exceptions"), and a longer document only ranks lower.
        words[name] = " ".join(dict.fromkeys(re.findall(r"[^\W_]+", text.lower())))
    return words


@cache
def symbol_words() -> dict[str, str]:
    """Each operator's pydoc topics, as words (`%` -> operators formatting)."""
    return {symbol: " ".join(topic.lower() for topic in topics.split() if topic.isupper())
            for symbol, topics in pydoc.Helper.symbols.items()}


def _role(token: tokenize.TokenInfo, statement_start: bool) -> str:
    if token.type == tokenize.COMMENT:
        return "comment"
    if token.type == tokenize.NUMBER:
        return "number literal"
    if token.type == tokenize.STRING:
        prefix = token.string[:token.string.find(token.string.lstrip("rRbBuUfF")[0])].lower()
        words = "string literal" + (" formatted" if "f" in prefix else "") + (" bytes" if "b" in prefix else "")
        triple = token.string.lstrip("rRbBuUfF")[:3] in ('"""', "'''")
        return words + (" docstring" if triple and statement_start else "")
    if token.type == tokenize.NAME and keyword.iskeyword(token.string):
        return keyword_words().get(token.string, "")
    if token.type == tokenize.OP:
        return symbol_words().get(token.string, "")
    return ""


def _read(text: str) -> tuple[list[Span], int]:
    """The spans of `text` with a role, and how many lines the tokenizer could not read."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    spans, errors, first = [], 0, 0
    while first < len(lines):
        statement_start, last = True, first
        try:
            for token in tokenize.generate_tokens(io.StringIO("".join(lines[first:])).readline):
                (row, col), (end_row, end_col) = token.start, token.end
                if token.type == tokenize.ENDMARKER:
                    break
                last = first + end_row - 1
                role = _role(token, statement_start)
                if role:
                    spans.append((offsets[first + row - 1] + col, offsets[min(first + end_row - 1, len(lines))] + end_col, role))
                if token.type not in (tokenize.COMMENT, tokenize.NL):
                    statement_start = token.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
            break
        except (tokenize.TokenError, IndentationError, SyntaxError):
            errors += 1
            first = max(last, first) + 1  # go on after the line it stopped at
    return spans, errors


def roles(text: str) -> list[Span]:
    """The spans of `text` that have a role in Python, as words (see the module's docstring)."""
    plain, plain_errors = _read(text)
    for quote in ('"""', "'''"):
        if plain_errors and quote in text:  # perhaps it starts inside a triple-quoted string
            inside, inside_errors = _read(quote + text)
            if inside_errors < plain_errors:
                return [(max(0, start - 3), end - 3, role) for start, end, role in inside]
    return plain
