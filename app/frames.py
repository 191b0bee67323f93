"""pandas DataFrames of the query layer's records: what the notebook API (saescope.connect)
returns and what the CSV downloads write.

Each frame is built from the record or the statement a page shows (one query, three views: the
page, its .json twin, and this), so a download or a notebook holds exactly the page's data, in
its order and with its filters. Columns are named as the records' fields.

    latents_frame(session, sae_id, sort, order, filters)   the SAE page's list, every page of it
    examples_frame(feature, window)                         a latent's examples, a row per token
    search_frame(result)                                    a search's matches, a row per latent
    saes_frame(index)                                       the SAEs
    csv_response(frame, filename)                           a download of a frame
"""

from __future__ import annotations

from urllib.parse import quote

import numpy as np
import pandas as pd
from fastapi.responses import Response
from sqlalchemy.orm import Session

from app.features import FeatureOut, Window
from app.queries import IndexOut, LatentFilterOut, LatentOut, Order, SaeSummary, SortKey, latents_query
from app.search import SearchOut

LATENT_COLUMNS = ["density", "max_activation", "mean_activation", "explanation", "explanation_f1"]
EXAMPLE_COLUMNS = ["example", "group", "bin", "rank", "context_id", "max_activation", "low", "high", "share",
                   "position", "token_id", "token", "activation", "shown"]
SEARCH_COLUMNS = ["match", "token_id", "token", "occurrences", "index", "density", "max_activation", "explanation",
                  "explanation_f1", "mean_activation", "fire_rate", "score", "fires_on"]
# What a spreadsheet would run as a formula when a cell starts with it (OWASP's list): corpus text
# and explanations are untrusted, so such a text cell is written with a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def saes_frame(index: IndexOut) -> pd.DataFrame:
    """One row per SAE, indexed by its id: model, layer, n_latents, k, fvu, l0, dead_fraction."""
    columns = list(SaeSummary.model_fields)
    rows = [[getattr(sae, column) for column in columns] for sae in index.saes]
    return pd.DataFrame(rows, columns=columns).set_index("id")


def latents_frame(session: Session, sae_id: str, sort: SortKey = "index", order: Order = "asc",
                  filters: LatentFilterOut = LatentFilterOut()) -> pd.DataFrame:
    """One row per latent that passes `filters`, in the SAE page's order for `sort` and `order`,
    indexed by the latent's index: density, max_activation, mean_activation (over the tokens it
    fires on; 0 for a dead latent), explanation (None when none was found), explanation_f1 (NaN:
    not scored). The SAE page's own statement (queries.latents_query), read whole."""
    rows = session.execute(latents_query(sae_id, sort, order, filters)).all()
    columns = [column.key for column in LatentOut.columns]
    frame = pd.DataFrame.from_records(rows, columns=columns, coerce_float=True)
    frame = frame.set_index("index")[LATENT_COLUMNS]
    frame["explanation_f1"] = frame["explanation_f1"].astype("float64")  # all None (nothing scored) -> NaN
    return frame


def examples_frame(feature: FeatureOut, window: Window = "full") -> pd.DataFrame:
    """A latent's examples in the order its page shows them (the top contexts, then each quantile
    bin from the highest, strongest first), one row per token (long form): example (its number
    in that order), group ("top" or "quantile"), bin (0 for top, 1..Q), rank, context_id,
    max_activation (the latent's largest in the context), low, high and share (the quantile
    bin's activation range and share of the firings; NaN for top examples), position (in the
    context), token_id, token, activation (the latent's, on that token) and shown (the firing the
    page outlines). `window` "snippet" keeps only the tokens the page shows around each firing."""
    groups = [("top", None, example) for example in feature.top_examples]
    groups += [("quantile", quantile, example) for quantile in feature.quantiles for example in quantile.examples]
    parts = []
    for number, (group, quantile, example) in enumerate(groups):
        start, end = example.snippet if window == "snippet" else (0, len(example.tokens))
        positions = np.arange(start, end)
        parts.append(pd.DataFrame({
            "example": number, "group": group, "bin": 0 if quantile is None else quantile.bin, "rank": example.rank,
            "context_id": example.context_id, "max_activation": example.max_activation,
            "low": np.nan if quantile is None else quantile.low, "high": np.nan if quantile is None else quantile.high,
            "share": np.nan if quantile is None else quantile.share, "position": positions,
            "token_id": example.token_ids[start:end], "token": example.tokens[start:end],
            "activation": example.activations[start:end], "shown": positions == example.position,
        }, columns=EXAMPLE_COLUMNS))
    if not parts:
        return pd.DataFrame({column: [] for column in EXAMPLE_COLUMNS})
    return pd.concat(parts, ignore_index=True)


def search_frame(result: SearchOut) -> pd.DataFrame:
    """What a search found, one row per latent in the page's order (long form): match ("latent"
    for a number in the query, "meaning" for a latent whose search document matches the query's
    words, with its relevance `score` and the tokens it `fires_on` most joined by " | ", most
    relevant first, "token" for a latent that fires on a token the query may mean,
    "explanation" for a latent whose explanation has every word), token_id, token and occurrences
    (token matches; the token's latents strongest first), then the latent's index, density,
    max_activation, explanation, explanation_f1, and for token matches its mean_activation over
    the token's occurrences and its fire_rate on them."""
    rows = []

    def row(match: str, hit, token=None, **extra) -> None:
        rows.append({"match": match, "token_id": getattr(token, "token_id", None), "token": getattr(token, "token", None),
                     "occurrences": getattr(token, "occurrences", None), "index": hit.index, "density": hit.density,
                     "max_activation": hit.max_activation, "explanation": hit.explanation,
                     "explanation_f1": hit.explanation_f1, **extra})

    if result.latent is not None:
        row("latent", result.latent)
    for hit in result.ranked:
        row("meaning", hit, score=hit.score, fires_on=" | ".join(hit.fires_on))
    for token in result.tokens:
        for hit in token.latents:
            row("token", hit, token, mean_activation=hit.mean_activation, fire_rate=hit.fire_rate)
    for hit in result.explanations:
        row("explanation", hit)
    frame = pd.DataFrame(rows, columns=SEARCH_COLUMNS)
    for column in ("token_id", "occurrences"):
        frame[column] = frame[column].astype("Int64")  # integers, with <NA> where the row has none
    return frame


# ---------------------------------------------------------------- CSV


def safe_for_spreadsheets(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with each text cell that a spreadsheet would run as a formula prefixed by an
    apostrophe (only in the CSV: a notebook's DataFrame keeps the text as it is)."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column].dtype):
            out[column] = out[column].map(lambda value: "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value)
    return out


def csv_response(frame: pd.DataFrame, filename: str, index: bool = True) -> Response:
    """The frame as a CSV download named `filename` (UTF-8, the index as the first column)."""
    body = safe_for_spreadsheets(frame).to_csv(index=index, lineterminator="\n")
    return Response(body.encode("utf-8"), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": content_disposition(filename)})


def content_disposition(filename: str) -> str:
    """An attachment named `filename`: an ASCII fallback for old clients, and RFC 6266's UTF-8 form."""
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in filename) or "download.csv"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
