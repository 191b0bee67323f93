"""Every URL the app emits is built here; templates get an instance as the global `urls`.

A page's JSON twin is the same path plus `.json` (`fmt="json"`), with the same query string.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

HTMX_VERSION_FILE = "htmx.min.js"


class URLs:
    def __init__(self, root_path: str = ""):
        self.root = root_path.rstrip("/")

    def _build(self, path: str, fmt: str | None = None, **query) -> str:
        if fmt:
            path = f"{path}.{fmt}"
        params = {k: v for k, v in query.items() if v is not None and v != ""}
        return self.root + path + (f"?{urlencode(params)}" if params else "")

    def index(self, fmt: str | None = None) -> str:
        return self._build("/index", fmt) if fmt else self.root + "/"

    def sae(self, sae_id: str, fmt: str | None = None, **query) -> str:
        """SAE page; query: sort, order, page, per_page."""
        return self._build(f"/saes/{quote(sae_id, safe='')}", fmt, **query)

    def feature(self, sae_id: str, index: int, fmt: str | None = None) -> str:
        return self._build(f"/saes/{quote(sae_id, safe='')}/features/{int(index)}", fmt)

    def probe(self, sae: str | None = None, text: str | None = None) -> str:
        return self._build("/probe", sae=sae, text=text)

    def api_probe(self) -> str:
        return self.root + "/api/probe"

    def docs(self) -> str:
        return self.root + "/docs"

    def openapi(self) -> str:
        return self.root + "/openapi.json"

    def static(self, path: str) -> str:
        return f"{self.root}/static/{path.lstrip('/')}"

    def htmx(self) -> str:
        return self.static(f"vendor/htmx.org/{HTMX_VERSION_FILE}")
