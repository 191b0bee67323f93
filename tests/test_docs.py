"""The documentation: every relative link between README.md, BENCHMARKS.md and docs/ points at a
file that exists and, with a #fragment, at a heading it has (GitHub's anchors); the front pages
stay short; the README gives the front-door commands, the one CI runs among them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", page.read_text())) if "://" not in target]


def test_the_pages_exist():
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "BENCHMARKS.md", "docs/pipeline.md", "docs/app.md", "docs/deployment.md",
            "docs/benchmarks.md", "docs/architecture.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    readme = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert {page.resolve() for page in PAGES if page.parent.name == "docs"} <= readme


def test_front_pages_stay_short():
    assert len((ROOT / "README.md").read_bytes()) < 8_000
    assert len((ROOT / "BENCHMARKS.md").read_bytes()) < 15_000


def test_readme_gives_the_front_door_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for command in ("make demo", "make test", "make test-fast"):
        assert re.search(rf"^{command}\b", readme, re.M), f"{command} is not in the README's quick start"
