"""What the routes read from a request's text themselves, by one rule each: a number (plain
ASCII digits of a sane length; Python's `int()` also takes Unicode digits and refuses strings
past 4,300 digits, and neither may become a 500), UTF-8 (a query string or form body that is not
is a 400 that names the field, on every route), and JSON that may hold a non-finite number
(`NaN`, `Infinity`, `1e309`: Python's parser reads them, a JSON answer cannot echo them back).
FastAPI's own parameters (pydantic) follow the same rule: only ASCII digits, 422 otherwise."""

from __future__ import annotations

import math
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException

MAX_DIGITS = 18  # any index, position or byte count the app handles; well inside a 64-bit integer


def ascii_int(value: str) -> int | None:
    """`value` (surrounding spaces allowed) as a non-negative integer when it is 1 to MAX_DIGITS
    ASCII digits, else None."""
    value = value.strip()
    if not (0 < len(value) <= MAX_DIGITS and value.isascii() and value.isdigit()):
        return None
    return int(value)


def form_index(value: str, what: str) -> int | None:
    """A latent's or a token's index from a form field: '' clears it, anything but a number is
    a 422 that says what was expected."""
    if value.strip() == "":
        return None
    index = ascii_int(value)
    if index is None:
        raise HTTPException(422, f"{what} must be a {what} index (0 to {10 ** MAX_DIGITS - 1}), got {value[:40]!r}")
    return index


def utf8_problem(encoded: bytes, what: str) -> str | None:
    """Why an urlencoded string (a query string, a form body) is refused, or None: each name and
    value must decode as UTF-8."""
    if encoded.isascii() and b"%" not in encoded:
        return None  # the common case, at once
    for pair in encoded.split(b"&"):
        try:
            unquote_to_bytes(pair.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            name = unquote_to_bytes(pair.split(b"=", 1)[0]).decode("utf-8", "replace")
            return f"{what} {name[:60]!r} is not valid UTF-8"
    return None


def check_utf8(encoded: bytes, what: str) -> None:
    if (problem := utf8_problem(encoded, what)) is not None:
        raise HTTPException(400, problem)


def finite(value):
    """`value` with every non-finite float spelled as JSON's readers spell it ("NaN",
    "Infinity", "-Infinity"), so that an error can say what it was given."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
