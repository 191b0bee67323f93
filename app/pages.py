"""One view per page: `route()` registers a page and its JSON twin from one function.

A page's view is a function whose parameters are the routes' parameters (path, query string,
dependencies: declared once) and which returns the page's record, a pydantic model. `route()`
registers two GET routes from it:

- `{path}.json`: the record as JSON, documented in /openapi.json by its model;
- `{path}`: the page's template, rendered from the same record (under `name`).

Datasette's way: the HTML is rendered from the object the JSON is, so the two cannot drift apart.
What only the page has (an htmx part, the feature page's "try your own text", the search box's
redirect) goes in an `html` hook, whose own parameters are the page's alone:

    @pages.route(router, "/saes/{sae_id}", template="sae.html", name="latent_page", summary="One SAE: ...")
    def read_sae(sae_id: str, session: SessionDep, urls: URLsDep, sort: SortKey = "density") -> SaePageOut:
        ...

    def search_page(page: PageCall, go: bool = False) -> Response:   # html=search_page
        result = page.data()                                         # the view, on the same arguments
        ...
        return page.render(result)                                   # the page, or the part asked for
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from app.render import hx_target, json_response, render


@dataclass
class PageCall:
    """One request for a page, as its `html` hook gets it."""

    request: Request
    params: dict[str, Any]  # the view's arguments, as the routes parsed them
    view: Callable[..., Any]
    template: str
    name: str  # the record's name in the template
    parts: Mapping[str, str] = field(default_factory=dict)  # htmx target id -> the template of that part

    @property
    def part(self) -> str | None:
        """The page part an htmx request asks for (one of `parts`), or None: the whole page."""
        return hx_target(self.request, self.parts)

    def data(self, **changes):
        """The view on this request's arguments (`changes` replacing some): the record, or an
        awaitable of it for an async view. A sync view runs in the calling thread."""
        return self.view(**self.params | changes)

    def render(self, record, template: str | None = None, status_code: int = 200, **context) -> HTMLResponse:
        """The page (or the part asked for) from `record`, with the page's own `context`."""
        template = template or self.parts.get(self.part, self.template)
        return render(self.request, template, status_code=status_code, **{self.name: record}, **context)


def route(router: APIRouter, path: str, *, template: str, name: str, summary: str, json_path: str | None = None,
          responses: dict | None = None, parts: Mapping[str, str] | None = None, html: Callable | None = None):
    """Register the view it decorates as GET `path` (HTML) and GET `json_path` (default `path` +
    ".json"), both with the view's parameters. The view returns its record, a pydantic model (its
    return annotation, the twin's response model); its docstring is the twin's description.
    `html(page: PageCall, **own)` makes the page's response itself; without it, the page is
    `template` rendered from the record."""

    def register(view: Callable) -> Callable:
        hints = get_type_hints(view, include_extras=True)
        model = hints.get("return")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{view.__name__} must be annotated to return a pydantic model, the twin's schema")
        view_params = _parameters(view, hints)
        own_params = _parameters(html, get_type_hints(html, include_extras=True))[1:] if html else []
        names = [p.name for p in view_params]
        if clash := set(names) & {p.name for p in own_params}:
            raise TypeError(f"{html.__name__} declares {sorted(clash)} again: the view's parameters reach it in page.params")
        # the page needs the request; the view may take it too, as FastAPI gives it to any endpoint
        request_param = [] if "request" in names else [
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)]

        if inspect.iscoroutinefunction(view):
            async def read_json(**arguments):
                return json_response(await view(**arguments))
        else:
            def read_json(**arguments):
                return json_response(view(**arguments))

        def call(arguments: dict) -> tuple[PageCall, dict]:
            own = {p.name: arguments.pop(p.name) for p in own_params}
            request = arguments["request"] if "request" in names else arguments.pop("request")
            return PageCall(request, arguments, view, template, name, parts or {}), own

        if html is not None and inspect.iscoroutinefunction(html):
            async def read_html(**arguments):
                page_call, own = call(arguments)
                return await html(page_call, **own)
        elif html is not None:
            if inspect.iscoroutinefunction(view):
                raise TypeError(f"{html.__name__} must be async to run the async view {view.__name__}")

            def read_html(**arguments):
                page_call, own = call(arguments)
                return html(page_call, **own)
        elif inspect.iscoroutinefunction(view):
            async def read_html(**arguments):
                page_call, _ = call(arguments)
                return page_call.render(await page_call.data())
        else:
            def read_html(**arguments):
                page_call, _ = call(arguments)
                return page_call.render(page_call.data())

        _endpoint(read_json, view, view_params, f"{view.__name__}_json")
        _endpoint(read_html, view, request_param + view_params + own_params, view.__name__)
        # The twin answers the record's fields itself (json_response) rather than through FastAPI's
        # round trip of the response model, which would ask back what only the page shows (exclude=True).
        router.add_api_route(json_path or f"{path}.json", read_json, methods=["GET"], name=read_json.__name__,
                             response_model=model, summary=summary, description=inspect.getdoc(view),
                             responses=responses)
        router.add_api_route(path, read_html, methods=["GET"], name=read_html.__name__, include_in_schema=False)
        return view

    return register


def _parameters(function: Callable, hints: dict) -> list[inspect.Parameter]:
    """The function's parameters as an endpoint declares them: keyword-only (so that two
    functions' parameters join in any order), their annotations resolved in the function's module."""
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(function).parameters.values()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def _endpoint(endpoint: Callable, view: Callable, params: list[inspect.Parameter], name: str) -> None:
    """What FastAPI reads of an endpoint: its signature (the parameters of the routes), its name
    (the operation id of the twin is built from it, as it was for a hand-written route)."""
    endpoint.__signature__ = inspect.Signature(params)
    endpoint.__name__ = endpoint.__qualname__ = name
    endpoint.__module__ = view.__module__
    endpoint.view = view  # both routes of a page point to their one view (tests/app/test_web_pages.py)
