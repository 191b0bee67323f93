"""A saescope database, read-only, as pandas DataFrames: the queries the pages use (app.queries,
app.features, app.search), turned into frames by app.frames, as the CSV downloads are.

    db = saescope.connect("sqlite:///demo/saescope.db")
    db.saes()                         # DataFrame, one row per SAE
    db.latents(sae_id)                # DataFrame, one row per latent
    db.examples(sae_id, index)        # DataFrame, one row per token of each example
    db.search(sae_id, "def")          # DataFrame, one row per latent found
    db.sae(sae_id), db.feature(sae_id, index)   # the pages' records (pydantic), every field
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import pandas as pd
from sqlalchemy import inspect, make_url, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app import features, frames, queries, search
from app.db import make_engine, session_factory, sqlite_file
from app.features import FeatureOut
from app.models import Sae
from app.queries import LatentFilterOut, Order, SaeDetailOut, SortKey
from app.urls import URLs


class NotFound(LookupError):
    """No such SAE or latent in the database."""


class Database:
    """A saescope database opened read-only: every connection refuses writes. Use as a context
    manager, or call close(), to release its connections."""

    def __init__(self, url: str):
        self.url = url
        shown = make_url(url).render_as_string(hide_password=True)
        file = sqlite_file(make_url(url))
        if url.startswith("sqlite") and (file is None or not file.is_file()):
            raise FileNotFoundError(f"{shown}: no such database file (make one with `saescope load RUN --db {url}`)")
        self._engine = make_engine(url, read_only=True)
        try:
            with self._engine.connect() as connection:
                tables = set(inspect(connection).get_table_names())
        except DBAPIError as e:
            self._engine.dispose()
            raise ConnectionError(f"cannot open {shown}: {(str(e.orig).strip().splitlines() or ['?'])[0]}") from None
        if "saes" not in tables:
            self._engine.dispose()
            raise ValueError(f"{shown} is not a saescope database (it has no saes table): put runs in it with "
                             f"`saescope load RUN --db {url}`")
        self._sessions = session_factory(self._engine)
        self._urls = URLs()

    def __repr__(self) -> str:
        return f"Database({make_url(self.url).render_as_string(hide_password=True)!r})"

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    def _require_sae(self, session: Session, sae_id: str) -> None:
        if queries.get_sae_summary(session, sae_id) is None:
            known = session.execute(select(Sae.id).order_by(Sae.id).limit(10)).scalars().all()
            raise NotFound(f"no SAE {sae_id!r} (the database has {', '.join(known) or 'none'})")

    # ------------------------------------------------------------ SAEs

    def saes(self) -> pd.DataFrame:
        """One row per SAE, indexed by id (as the pages and URLs name it), in the index page's
        order: model, layer, n_latents, k, fvu (held-out fraction of variance unexplained), l0
        (mean active latents per token), dead_fraction (share of latents that never fired)."""
        with self._session() as session:
            return frames.saes_frame(queries.list_saes(session, self._urls))

    def sae(self, sae_id: str) -> SaeDetailOut:
        """Everything the SAE page shows of it (d_in, context_length, cfg, metrics, harvest, the
        density histogram, ...), as its record."""
        with self._session() as session:
            found = queries.get_sae(session, sae_id)
            if found is None:
                self._require_sae(session, sae_id)
            return found

    # ------------------------------------------------------------ latents

    def latents(self, sae_id: str, *, sort: SortKey = "index", order: Order = "asc",
                min_density: float | None = None, max_density: float | None = None,
                hide_dead: bool = False, hide_dense: bool = False) -> pd.DataFrame:
        """One row per latent, indexed by the latent's index (`index`): density (share of harvest
        tokens it fires on), max_activation, mean_activation (over the tokens it fires on; 0 if
        it never fired), explanation (a token pattern, ⟦ ⟧ marking the token it fires on; None
        when none was found), explanation_f1 (held-out F1 of that pattern; NaN when not scored).

        The SAE page's list with its sort (`density`, `max_activation`, `explanation_f1` (only
        the scored latents) or `index`), `order` and filters (densities are shares, 0..1; dense
        means above 10 %), every page at once: the page's own statement."""
        filters = LatentFilterOut(min_density=min_density, max_density=max_density, hide_dead=hide_dead,
                                  hide_dense=hide_dense)
        with self._session() as session:
            self._require_sae(session, sae_id)
            return frames.latents_frame(session, sae_id, sort, order, filters)

    def feature(self, sae_id: str, index: int) -> FeatureOut:
        """Everything a latent's page shows (statistics, histograms, examples, logit effects,
        neighbours, explanation), as its record."""
        with self._session() as session:
            found = features.get_feature(session, sae_id, int(index), self._urls)
            if found is None:
                self._require_sae(session, sae_id)
                raise NotFound(f"SAE {sae_id!r} has no latent {index}")
            return found

    def examples(self, sae_id: str, index: int, context: Literal["full", "snippet"] = "full") -> pd.DataFrame:
        """The latent's examples, one row per token (long form), in its page's order: the top
        contexts, then each activation quantile's samples from the highest bin, strongest first.
        Columns: example (its number in that order), group ("top" or "quantile"), bin (0 for top,
        1..Q), rank, context_id, max_activation (the latent's largest in the context), low, high,
        share (the quantile bin's range and share of the firings; NaN for top), position,
        token_id, token, activation (the latent's on that token), shown (the firing the page
        outlines). context="snippet" keeps only the tokens the page shows around each firing."""
        return frames.examples_frame(self.feature(sae_id, index), context)

    def search(self, sae_id: str, q: str, limit: int = 20) -> pd.DataFrame:
        """The search page's results for `q` (a token, words of explanations, or a latent number),
        one row per latent (long form): match ("latent", "token" or "explanation"), token_id,
        token, occurrences, index, density, max_activation, explanation, explanation_f1, and for
        token matches mean_activation (over the token's occurrences) and fire_rate."""
        with self._session() as session:
            self._require_sae(session, sae_id)
            summary = queries.get_sae_summary(session, sae_id)
            return frames.search_frame(search.search(session, summary, q, limit, self._urls))


def connect(url: str) -> Database:
    """Open a saescope database read-only: `sqlite:///path/saescope.db` or a PostgreSQL URL
    (`postgresql+psycopg://user@host/db`)."""
    return Database(url)
