"""The files the app ships, found through the `app` package (importlib.resources), so that an
installed saescope finds them wherever it runs: app/templates (Jinja2), app/static (CSS, the
project's own JS), app/migrations (Alembic), and htmx.

htmx comes from npm (package.json), never from the repository: building the package copies
node_modules/htmx.org/dist/htmx.min.js to app/static/vendor/htmx.org/ (setup.py); a source
checkout (an editable install, the tests) serves it from node_modules, where `npm install` put it.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

HTMX_VERSION_FILE = "htmx.min.js"
HTMX_PREFIX = "vendor/htmx.org/"  # its path under /static


def _package_dir() -> Path:
    folder = files("app")
    if not isinstance(folder, Path):  # e.g. a zip import: Jinja2, Starlette and Alembic need files
        raise RuntimeError(f"saescope's app package must be installed as files, not in {folder}")
    return folder


PACKAGE_DIR = _package_dir()
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
SHIPPED_HTMX_DIR = STATIC_DIR / "vendor" / "htmx.org"  # in a built package
CHECKOUT_HTMX_DIR = PACKAGE_DIR.parent / "node_modules" / "htmx.org" / "dist"  # in a source checkout


def htmx_dir() -> Path:
    """The folder served at /static/vendor/htmx.org/: the built package's copy of htmx, or else the
    source checkout's node_modules."""
    return SHIPPED_HTMX_DIR if (SHIPPED_HTMX_DIR / HTMX_VERSION_FILE).is_file() else CHECKOUT_HTMX_DIR


# ---- static files under names that carry their content's hash, so a browser may keep them for good

HASHED_NAME = re.compile(r"^(?P<stem>.+)\.(?P<digest>[0-9a-f]{10})(?P<suffix>\.[A-Za-z0-9]+)$")


def static_file(path: str) -> Path:
    """The file at `path` under /static (htmx from its own folder)."""
    if path.startswith(HTMX_PREFIX):
        return htmx_dir() / path[len(HTMX_PREFIX):]
    return STATIC_DIR / path


def hashed_name(path: str) -> str:
    """`path` under /static with its content's hash: 'app.js' -> 'app.1a2b3c4d5e.js' (as it is,
    should the file be missing)."""
    file = static_file(path)
    try:
        stat = file.stat()
    except OSError:
        return path
    digest = _digest(file, stat.st_mtime_ns, stat.st_size)
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}.{digest}.{suffix}" if dot else f"{path}.{digest}"


@lru_cache(maxsize=256)
def _digest(file: Path, mtime_ns: int, size: int) -> str:
    """The hash of a file's content, read again only when it changes (a debug server's edits)."""
    return hashlib.sha256(file.read_bytes()).hexdigest()[:10]


def unhashed_name(name: str) -> tuple[str, bool]:
    """A requested file name without its hash, and whether the hash was the file's current one
    (only then may the answer be kept for good: an old page may still ask for an old hash)."""
    match = HASHED_NAME.match(name)
    if match is None:
        return name, False
    plain = match["stem"] + match["suffix"]
    return plain, hashed_name(plain) == name
