"""Progress bars. On a terminal, tqdm as usual; when stderr is a file or a pipe (a batch job,
`nohup`, a CI log), one update every 30 s instead of ten a second, so a log of a long run stays
readable and still says how far it got."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress(*args, **kwargs) -> tqdm:
    """tqdm(*args, **kwargs), with a long minimum interval between updates off a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(*args, **kwargs)
