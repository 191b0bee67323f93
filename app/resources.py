"""The files the app ships, found through the `app` package (importlib.resources), so that an
installed saescope finds them wherever it runs: app/templates (Jinja2), app/static (CSS, the
project's own JS), app/migrations (Alembic), and htmx.

htmx comes from npm (package.json), never from the repository: building the package copies
node_modules/htmx.org/dist/htmx.min.js to app/static/vendor/htmx.org/ (setup.py); a source
checkout (an editable install, the tests) serves it from node_modules, where `npm install` put it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from app.urls import HTMX_VERSION_FILE


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
