"""The one build step pyproject.toml cannot state: htmx, which comes from npm (package.json) and is
never committed, is copied into the built package, app/static/vendor/htmx.org/, where the
installed app serves it (app/resources.py). Everything else is in pyproject.toml.

A wheel or sdist built without node_modules fails here, saying to run `npm install` (or
`make setup`) first. An editable install (`pip install -e .`, `make setup`) copies nothing: the
source checkout serves htmx from node_modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import SetupError

HERE = Path(__file__).resolve().parent
NPM_PACKAGE = Path("node_modules", "htmx.org")
FILES = {Path("dist", "htmx.min.js"): "htmx.min.js", Path("LICENSE"): "LICENSE"}  # npm's path: the package's name
VENDOR = Path("app", "static", "vendor", "htmx.org")  # served at /static/vendor/htmx.org/ (app/urls.py)


def htmx_sources() -> dict[Path, str]:
    """The files to copy: from node_modules in a checkout, or from an sdist's own copy."""
    for folder, layout in ((HERE / NPM_PACKAGE, "npm"), (HERE / VENDOR, "vendor")):
        sources = {folder / (npm if layout == "npm" else name): name for npm, name in FILES.items()}
        if all(path.is_file() for path in sources):
            return sources
    raise SetupError(f"htmx is missing: no {NPM_PACKAGE / 'dist' / 'htmx.min.js'} in {HERE}. The web app needs it; "
                     "run `npm install` (or `make setup`) in the source folder, then build again.")


def copy_htmx(destination: Path) -> list[str]:
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for source, name in htmx_sources().items():
        shutil.copyfile(source, destination / name)
        copied.append(str(destination / name))
    return copied


class BuildPyWithHtmx(build_py):
    def run(self):
        if not self.editable_mode:
            htmx_sources()  # fail before building anything
        super().run()
        if not self.editable_mode:
            self._htmx = copy_htmx(Path(self.build_lib) / VENDOR)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *getattr(self, "_htmx", [])]


class SdistWithHtmx(sdist):
    """An sdist carries its copy of htmx, so that a wheel built from it needs no npm."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        copy_htmx(Path(base_dir) / VENDOR)


setup(cmdclass={"build_py": BuildPyWithHtmx, "sdist": SdistWithHtmx})
