"""Templates (autoescape on everywhere: corpus text is untrusted) and the HTML/JSON helpers."""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from app.db import ROOT
from app.urls import URLs

VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def token_text(token: str) -> str:
    """A token as shown: newlines and tabs as visible marks (spaces kept by CSS pre-wrap)."""
    for char, mark in VISIBLE.items():
        token = token.replace(char, mark)
    return token or "∅"


def shade(activation: float, max_activation: float) -> str:
    """Background strength in [0, 1] relative to the latent's max (a number, safe in style="")."""
    if not max_activation or max_activation <= 0 or not math.isfinite(activation):
        return "0"
    return f"{min(1.0, max(0.0, activation / max_activation)):.3f}"


def token_chips(tokens: list[str], activations: list[float], scale: float) -> Markup:
    """A context's token chips: each token escaped, shaded by activation / scale, its value on
    hover. Built here rather than in a template loop: a feature page has thousands of tokens, and
    this is a few times faster than the same markup from Jinja (it was most of the page's time)."""
    chips = []
    for token, activation in zip(tokens, activations):
        value = f"{activation:.3f}"
        chips.append(f'<span class="tok{" on" if activation > 0 else ""}" style="--a: {shade(activation, scale)}" '
                     f'title="{value}" data-tip="{value}">{escape(token_text(token))}</span>')
    return Markup("".join(chips))


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


def make_templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(ROOT / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(token=token_text, number=number, percent=percent)
    env.globals.update(zip=zip, shade=shade, density_bar=density_bar, token_chips=token_chips, urls=URLs())
    return Jinja2Templates(env=env)


def is_htmx(request: Request) -> bool:
    """An htmx request for a fragment (a history restore wants the whole page)."""
    return request.headers.get("HX-Request") == "true" and "HX-History-Restore-Request" not in request.headers


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    urls = URLs(request.scope.get("root_path", ""))
    response = request.app.state.templates.TemplateResponse(
        request, template, {"urls": urls, **context}, status_code=status_code
    )
    response.headers["Vary"] = "HX-Request"
    return response


def json_response(data, status_code: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status_code)
