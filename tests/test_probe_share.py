"""Share links on a tiny real model: /p/{id} stores the SAE and the text under an id derived
from their hash, and reopens the same view after the app restarts."""

from __future__ import annotations

import html
import re
from urllib.parse import urlencode

from fastapi.testclient import TestClient

from app.db import make_engine, session_factory
from app.main import create_app
from app.models import ShareLink
from app.settings import Settings
from app.shares import create_share, share_digest

TEXT = "for line in open(path):\n    print(line)  # <i>x</i>"


def app_client(database_url: str) -> TestClient:
    return TestClient(create_app(Settings(database_url=database_url)))


def test_share_round_trip_across_an_app_restart(tiny_db, tiny_sae_id):
    with app_client(tiny_db) as client:
        made = client.post("/api/share", json={"sae": tiny_sae_id, "text": TEXT})
        assert made.status_code in (200, 201)
        share = made.json()
        assert re.fullmatch(r"[a-z2-7]{10}", share["id"]) and share["url"] == f"/p/{share['id']}"
        again = client.post("/api/share", json={"sae": tiny_sae_id, "text": TEXT})
        assert again.status_code == 200 and again.json()["id"] == share["id"]  # sharing twice: the same link
        before = client.get(f"/p/{share['id']}.json").json()
        probe = client.post("/api/probe", json={"sae": tiny_sae_id, "text": TEXT}).json()
        page_before = client.get(f"/p/{share['id']}")

    with app_client(tiny_db) as client:  # a new app: nothing in memory, the database only
        assert client.app.state.probe.loaded() == []
        after = client.get(f"/p/{share['id']}.json")
        assert after.status_code == 200
        after = after.json()
        assert after == before
        assert after["text"] == TEXT and after["sae"] == tiny_sae_id and after["error"] is None
        assert after["probe"] == probe  # the same view as probing the text directly
        page = client.get(f"/p/{share['id']}")
        assert page.status_code == 200
        tokens = lambda html: html.split('class="context probe-tokens', 1)[1].split("</div>", 1)[0]  # noqa: E731
        assert tokens(page.text) == tokens(page_before.text)
        assert "&lt;i&gt;x&lt;/i&gt;" in page.text and "<i>x</i>" not in page.text


def test_share_button_without_and_with_javascript(tiny_db, tiny_sae_id):
    form = {"sae": tiny_sae_id, "text": TEXT.replace("\n", "\r\n"), "latent": "3", "all": "1"}  # a form sends CRLF
    with app_client(tiny_db) as client:
        redirect = client.post("/probe/share", data=form, follow_redirects=False)
        assert redirect.status_code == 303
        share_id = share_digest(tiny_sae_id, TEXT)[:10]  # CRLF read as the newline the user typed
        assert redirect.headers["location"] == f"/p/{share_id}?latent=3&all=1"
        fragment = client.post("/probe/share", data=form, headers={"HX-Request": "true"})
        assert fragment.status_code == 200 and "<html" not in fragment.text
        # a relative link; the link to copy is whole, at the request's own (allowed) host
        assert f'href="/p/{share_id}?latent=3&amp;all=1"' in fragment.text
        assert f'data-copy="http://testserver/p/{share_id}?latent=3&amp;all=1"' in fragment.text
        view = client.get(redirect.headers["location"])
        assert view.status_code == 200 and "Highlighting latent" in view.text and 'name="all" value="1" checked' in view.text
        empty = client.post("/probe/share", data=form | {"text": "  "}, headers={"HX-Request": "true"})
        assert empty.status_code == 422 and "must not be empty" in empty.text


def test_shared_page_previews_with_open_graph_tags(tiny_db, tiny_sae_id):
    with app_client(tiny_db) as client:
        share = client.post("/api/share", json={"sae": tiny_sae_id, "text": TEXT}).json()
        page = client.get(share["url"]).text
        head = page.split("</head>", 1)[0]
        title = re.search(r'<meta property="og:title" content="([^"]*)">', head).group(1)
        description = re.search(r'<meta property="og:description" content="([^"]*)">', head).group(1)
        assert title.startswith("“for line in open(path): print(line)") and "saescope" in title
        assert tiny_sae_id in description and "tokens" in description
        assert f'<meta property="og:url" content="http://testserver/p/{share["id"]}">' in head
        assert '<meta name="twitter:card" content="summary">' in head


def open_graph(page: str) -> dict[str, str]:
    """The og:* tags of a page's head, by property (og:title as "title"), their content unescaped."""
    head = page.split("</head>", 1)[0]
    return {name: html.unescape(content) for name, content in re.findall(r'<meta property="og:(\w+)" content="([^"]*)">', head)}


def test_probe_page_previews_with_its_whole_view(tiny_db, tiny_sae_id):
    state = {"latent": "3", "sort": "sum", "all": "1"}
    with app_client(tiny_db) as client:
        page = client.get("/probe", params={"sae": tiny_sae_id, "text": TEXT} | state)
        assert page.status_code == 200 and "Highlighting latent" in page.text
        og = open_graph(page.text)
        assert og["type"] == "website" and og["site_name"] == "saescope"
        assert og["title"].startswith("“for line in open(path): print(line)") and og["title"].endswith("· saescope probe")
        assert tiny_sae_id in og["description"] and "tokens" in og["description"]
        # the whole view, as the address bar holds it: the latent, the order and all=1 included
        assert og["url"] == "http://testserver/probe?" + urlencode({"sae": tiny_sae_id, "text": TEXT} | state)
        assert client.get(og["url"]).status_code == 200

        share = client.post("/api/share", json={"sae": tiny_sae_id, "text": TEXT}).json()
        shared = open_graph(client.get(share["url"], params=state).text)
        assert shared["url"] == f"http://testserver{share['url']}?{urlencode(state)}"
        assert shared["title"] == og["title"] and shared["description"] == og["description"]


def test_blank_probe_page_previews_as_the_site(tiny_db, tiny_sae_id):
    with app_client(tiny_db) as client:
        for params in ({}, {"sae": tiny_sae_id}, {"sae": tiny_sae_id, "all": "1"}):
            page = client.get("/probe", params=params)
            assert page.status_code == 200 and 'class="context probe-tokens' not in page.text
            og = open_graph(page.text)
            assert og["title"] == "saescope probe" and og["type"] == "website"
            assert "Type or paste text" in og["description"] and tiny_sae_id in og["description"]
            assert og["url"] == "http://testserver/probe?" + urlencode({"sae": tiny_sae_id} | params)
            assert f'<meta name="description" content="{html.escape(og["description"])}">' in page.text
            assert "<title>Probe · saescope</title>" in page.text


def test_unknown_share_and_sae_are_404(tiny_db, tiny_sae_id):
    with app_client(tiny_db) as client:
        assert client.get("/p/nosuchlink").status_code == 404
        missing = client.get("/p/nosuchlink.json")
        assert missing.status_code == 404 and missing.json() == {"detail": "no shared probe 'nosuchlink'"}
        unknown = client.post("/api/share", json={"sae": "no-such-sae", "text": "hi"})
        assert unknown.status_code == 404
        for text, status in (("", 422), ("x" * 4001, 413), ("bell \x07", 422)):
            assert client.post("/api/share", json={"sae": tiny_sae_id, "text": text}).status_code == status


def test_a_prefix_collision_gets_a_longer_id(tiny_db, tiny_sae_id):
    text = "a text whose short id is already taken"
    digest = share_digest(tiny_sae_id, text)
    sessions = session_factory(make_engine(tiny_db))
    with sessions() as session:
        session.add(ShareLink(id=digest[:10], sae_id=tiny_sae_id, text="some other text"))
        session.commit()
        share, created = create_share(session, tiny_sae_id, text)
        assert created and share.id == digest[:16] and share.text == text
        assert create_share(session, tiny_sae_id, text) == (share, False)
        assert session.get(ShareLink, digest[:10]).text == "some other text"  # never overwritten
