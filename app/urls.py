"""Every URL the app emits is built here; templates get an instance as the global `urls`.

A page's JSON twin is the same path plus `.json` (`fmt="json"`), with the same query string.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from app.resources import HTMX_PREFIX, HTMX_VERSION_FILE, hashed_name


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
        """SAE page; query: sort, order, page, per_page, min_density, max_density, hide_dead, hide_dense."""
        return self._build(f"/saes/{quote(sae_id, safe='')}", fmt, **query)

    def sae_latents_csv(self, sae_id: str, **query) -> str:
        """Every latent the SAE page lists, as CSV; query: its sort, order and filters (not its page)."""
        return self._build(f"/saes/{quote(sae_id, safe='')}/latents.csv", None, **query)

    def feature_examples_csv(self, sae_id: str, index: int, **state) -> str:
        """A latent's examples, a row per token, as CSV; state: context=full (whole contexts, not snippets)."""
        return self._build(f"/saes/{quote(sae_id, safe='')}/features/{int(index)}/examples.csv", None, **state)

    def feature(self, sae_id: str, index: int, fmt: str | None = None, **state) -> str:
        """A latent's page; state: context=full (whole contexts instead of snippets), text (the
        "try your own text" box)."""
        return self._build(f"/saes/{quote(sae_id, safe='')}/features/{int(index)}", fmt, **state)

    def random_feature(self, sae_id: str, fmt: str | None = None) -> str:
        """Redirects to a random latent of the SAE that fired in the harvest (its page, or with
        fmt="json" its JSON)."""
        return self._build(f"/saes/{quote(sae_id, safe='')}/random", fmt)

    def ladders(self, fmt: str | None = None) -> str:
        """The scaling ladders (sweeps) in the database."""
        return self._build("/ladders", fmt)

    def ladder(self, ladder_id: str, fmt: str | None = None) -> str:
        """A ladder's scaling page: its fits, charts and rungs."""
        return self._build(f"/ladders/{quote(ladder_id, safe='')}", fmt)

    def search(self, sae: str | None = None, q: str | None = None, fmt: str | None = None, **query) -> str:
        """Search an SAE's latents by explanation and by token; query: limit. fmt "json" is the
        page's twin, "csv" its results as a download."""
        return self._build("/search", fmt, sae=sae, q=q, **query)

    def search_example(self, sae: str | None = None, text: str | None = None, fmt: str | None = None, **query) -> str:
        """The latents most specific to a snippet of text (find by example); query: limit."""
        return self._build("/search/example", fmt, sae=sae, text=text, **query)

    def api_search_example(self) -> str:
        """POST: find by example, the JSON API (the snippet in the body, not the address)."""
        return f"{self.root}/api/search/example"

    def probe(self, sae: str | None = None, text: str | None = None, fmt: str | None = None, **state) -> str:
        """Probe page; state: latent (highlighted), sort (max|sum), all=1 (frequent latents and the
        first position included), token (the position whose latents the page lists)."""
        return self._build("/probe", fmt, sae=sae, text=text, **state)

    def probe_token(self, position: int) -> str:
        """The latents of one token of the probe (an htmx fragment)."""
        return f"{self.root}/probe/tokens/{int(position)}"

    def probe_share(self) -> str:
        return self.root + "/probe/share"

    def share(self, share_id: str, fmt: str | None = None, **state) -> str:
        """A shared probe's short permanent link; state as for probe()."""
        return self._build(f"/p/{quote(share_id, safe='')}", fmt, **state)

    def steer(self, sae: str | None = None, prompt: str | None = None, latents: str | None = None,
              fmt: str | None = None, **state) -> str:
        """Steering page; latents "INDEX:STRENGTH,..."; state: mode (add|clamp), tokens, temperature,
        top_p, seed."""
        return self._build("/steer", fmt, sae=sae, prompt=prompt, latents=latents, **state)

    def steer_shared(self, share_id: str, fmt: str | None = None) -> str:
        """A shared steering's short permanent link."""
        return self._build(f"/s/{quote(share_id, safe='')}", fmt)

    def steer_share(self) -> str:
        """The steering page's Share button (a form POST)."""
        return self.root + "/steer/share"

    def api_steer(self) -> str:
        return self.root + "/api/steer"

    def api_steer_share(self) -> str:
        return self.root + "/api/steer/share"

    def feature_ablation(self, sae_id: str, index: int, fmt: str | None = None) -> str:
        """What removing the latent changes over its top examples (computed on first view, then kept)."""
        return self._build(f"/saes/{quote(sae_id, safe='')}/features/{int(index)}/ablation", fmt)

    def api_probe(self) -> str:
        return self.root + "/api/probe"

    def api_share(self) -> str:
        return self.root + "/api/share"

    def docs(self) -> str:
        return self.root + "/docs"

    def api_docs(self) -> str:
        """The API reference page (app.routes.api_docs): offline, unlike /docs."""
        return self.root + "/api"

    def openapi(self) -> str:
        return self.root + "/openapi.json"

    def static(self, path: str) -> str:
        """A static file, under a name that carries its content's hash (app.caching lets
        browsers keep it for good: a changed file gets a new name)."""
        return f"{self.root}/static/{hashed_name(path.lstrip('/'))}"

    def htmx(self) -> str:
        return self.static(HTMX_PREFIX + HTMX_VERSION_FILE)
