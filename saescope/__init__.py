"""saescope as a library, for notebooks: read-only DataFrames of a saescope database, and run
folders opened as Python objects.

    import saescope
    db = saescope.connect("sqlite:///demo/saescope.db")   # or a PostgreSQL URL
    db.saes()                        # one row per SAE
    db.latents(sae_id)               # one row per latent
    db.examples(sae_id, index)       # a latent's examples, one row per token
    run = saescope.open_run("demo/runs/smollm2-135m-instruct-l6-4096-k32")
    run.encode(["def f(x):"])        # one row per (text, token, latent) firing

docs/notebook.md has a worked example. The names load on first use: `import saescope` costs
nothing, and the `saescope` command does not import pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Database", "NotFound", "Run", "connect", "open_run"]

if TYPE_CHECKING:
    from saescope.database import Database, NotFound, connect
    from saescope.runs import Run, open_run

_WHERE = {"Database": "saescope.database", "NotFound": "saescope.database", "connect": "saescope.database",
          "Run": "saescope.runs", "open_run": "saescope.runs"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'saescope' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
