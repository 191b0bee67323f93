"""Templates (autoescape on everywhere: corpus text is untrusted) and the HTML/JSON helpers."""

from __future__ import annotations

import math
import re
from functools import lru_cache

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from pydantic import BaseModel

from app import charts
from app.resources import TEMPLATES_DIR
from app.urls import URLs
from trainer.thresholds import WEAK_F1  # an explanation scoring below it on held-out text is shown dimmed

VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def token_text(token: str) -> str:
    """A token as shown: newlines and tabs as visible marks (spaces kept by CSS pre-wrap)."""
    for char, mark in VISIBLE.items():
        token = token.replace(char, mark)
    return token or "∅"


def lone_token(token: str) -> str:
    """A token shown on its own (a table cell, a search result): spaces as · too, since a leading
    space is what tells ` def` from `def`."""
    return token_text(token).replace(" ", "·")


def shade(activation: float, max_activation: float) -> str:
    """Background strength in [0, 1] relative to the latent's max (a number, safe in style="")."""
    if not max_activation or max_activation <= 0 or not math.isfinite(activation):
        return "0"
    return f"{min(1.0, max(0.0, activation / max_activation)):.3f}"


def token_chips(tokens: list[str], activations: list[float], scale: float, start: int = 0, end: int | None = None,
                mark: int | None = None, breaks: bool = False) -> Markup:
    """A context's token chips from `start` to `end`: each token escaped, shaded by activation /
    scale, its value on hover; the token at `mark` (the firing an example shows) outlined. With
    `breaks` a newline starts a new line after its mark, so whole code reads as code. Built
    here rather than in a template loop: a feature page has thousands of tokens, and this is a
    few times faster than the same markup from Jinja (it was most of the page's time)."""
    chips = []
    end = len(tokens) if end is None else end
    inverse = 1 / scale if scale and scale > 0 and math.isfinite(scale) else 0.0  # shade() per chip, inlined
    for position in range(start, end):
        token, activation = tokens[position], activations[position]
        value = f"{activation:.3f}"
        level = min(1.0, max(0.0, activation * inverse)) if math.isfinite(activation) else 0.0
        classes = "tok on" if activation > 0 else "tok"
        if position == mark:
            classes += " mark"
        chips.append(f'<span class="{classes}" style="--a: {level:.3f}" '
                     f'title="{value}" data-tip="{value}">{_shown(token, breaks)}</span>')
    return Markup("".join(chips))


CARRIED = Markup('<span class="ws mark" title="part of a character that the next token completes">…</span>')


@lru_cache(maxsize=65_536)
def _shown(token: str, breaks: bool = False) -> str:
    """A token escaped for a chip; a page shows the same vocabulary tokens many times. In a
    context an empty token holds the first bytes of a character split over byte tokens (the
    loader gives the character to the token that completes it): marked "…" as in the probe."""
    if token == "":
        return CARRIED
    shown = escape(token_text(token))
    return shown.replace(VISIBLE["\n"], VISIBLE["\n"] + "\n") if breaks else shown


def token_lines(token: str) -> Markup:
    """A token in running text: escaped, a newline shown as its mark and kept as a line break."""
    return Markup(_shown(token, breaks=True))


FIRING = re.compile(r"⟦(.*?)⟧", re.S)


def explanation_html(text: str) -> Markup:
    """An explanation with its firing tokens (between ⟦ ⟧) marked; every piece escaped, spaces
    and newlines visible as in token chips."""
    pieces, last = [], 0
    for match in FIRING.finditer(text):
        pieces.append(escape(token_text(text[last:match.start()])) if match.start() > last else "")
        pieces.append(Markup('<mark class="fires" title="the token it fires on">{}</mark>').format(
            lone_token(match.group(1))))
        last = match.end()
    pieces.append(escape(token_text(text[last:])) if last < len(text) else "")
    return Markup("").join(pieces)


def number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def percent(value) -> str:
    """A share as a percentage with three significant digits (densities span 1e-6..1)."""
    if value is None:
        return "–"
    return f"{value * 100:#.3g}".rstrip(".") + "%"  # '#' keeps 9.10% aligned with 9.06%


def density_bar(density: float) -> str:
    """Bar width on a log scale from 1e-6 to 1: densities span orders of magnitude."""
    if not density or density <= 0:
        return "0"
    return f"{min(1.0, max(0.0, (math.log10(density) + 6) / 6)):.3f}"


def make_templates(reload: bool = False) -> Jinja2Templates:
    """The app's templates; `reload` (debug mode) re-reads a template file that changed, at the
    cost of a stat() of it on every render."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        auto_reload=reload,
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(token=token_text, lone_token=lone_token, number=number, percent=percent, token_lines=token_lines)
    env.globals.update(zip=zip, weak_f1=WEAK_F1, shade=shade, density_bar=density_bar, token_chips=token_chips, urls=URLs(),
                       explanation_html=explanation_html, chart_svg=charts.svg, activation_chart=charts.activation_chart,
                       logit_chart=charts.logit_chart, density_chart=charts.density_chart,
                       scaling_chart=charts.scaling_chart, k_series_chart=charts.k_series_chart,
                       dead_chart=charts.dead_chart, size_label=charts.size_label, training_charts=charts.training_charts,
                       ladder_training_chart=charts.ladder_training_chart, progressive_chart=charts.progressive_chart,
                       probe_chart=charts.probe_chart, explainability_chart=charts.explainability_chart,
                       ablation_chart=charts.ablation_chart)
    return Jinja2Templates(env=env)


def is_htmx(request: Request) -> bool:
    """An htmx request for a fragment (a history restore wants the whole page)."""
    return request.headers.get("HX-Request") == "true" and "HX-History-Restore-Request" not in request.headers


def hx_target(request: Request, parts) -> str | None:
    """The id of the page part an htmx request asks for, when it is one of `parts` (else None:
    render the whole page). One URL serves the page and its parts, so the address bar that
    hx-push-url sets always opens the same view."""
    target = request.headers.get("HX-Target") if is_htmx(request) else None
    return target if target in parts else None


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    urls = URLs(request.scope.get("root_path", ""))
    response = request.app.state.templates.TemplateResponse(
        request, template, {"urls": urls, **context}, status_code=status_code
    )
    response.headers["Vary"] = "HX-Request"
    return response


def wants_json(request: Request) -> bool:
    """An API path: its errors are JSON, as its answers are (the one definition, also for
    app.security's own errors)."""
    path = request.url.path
    return path.endswith(".json") or path.startswith("/api/")


def json_response(data, status_code: int = 200) -> JSONResponse:
    """`data` as JSON; a record (a pydantic model) as its fields (app.pages). A record that says
    why something could not run here (an `error` field, set) is this server's moment, not the
    load's: sent no-store, so app.caching gives it no ETag, as the page does."""
    headers = {"Cache-Control": "no-store"} if getattr(data, "error", None) else None
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return JSONResponse(data, status_code=status_code, headers=headers)
