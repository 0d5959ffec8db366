"""The README and the pages in docs/: a short landing page, every page linked from it, no broken link.

The README stays a landing page (at most 12 KB); the reference is in docs/.

Links are Markdown's ``[text](target)`` outside code (fenced blocks and inline
code spans). A relative target must name a file or folder of the repository;
a ``#anchor``, on the same page or another Markdown page, must be a heading
there, spelled as GitHub makes heading anchors (lower case, punctuation other
than ``-`` and ``_`` dropped, spaces to ``-``, ``-1``, ``-2``... for repeats).
Links to other sites are not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testlib import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, REPO_ROOT / "examples/README.md", REPO_ROOT / "bench/README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (their brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", page.read_text())):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))   # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def test_readme_is_a_landing_page():
    size = len(README.read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes: move reference material to a page in docs/"


def test_the_anchor_rule_matches_githubs():
    page = REPO_ROOT / "docs/setups.md"
    assert {"linux-the-special-network", "docker-desktop-macos-windows",
            "clients-that-ignore-the-port-in-the-imds-endpoint"} <= anchors(page)


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS, "docs/ has no pages"
    linked = {(README.parent / target.split("#", 1)[0]).resolve()
              for target in links(README) if not EXTERNAL.match(target) and not target.startswith("#")}
    missing = [str(page.relative_to(REPO_ROOT)) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md links to none of {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_resolve(page):
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or REPO_ROOT.resolve() not in [dest, *dest.parents]:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO_ROOT.resolve())}")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: " + "; ".join(broken)


def test_docs_pages_link_back_to_the_readme():
    """Each page is complete on its own, and one link away from the landing page."""
    for page in DOCS:
        targets = [t.split("#", 1)[0] for t in links(page)]
        assert "../README.md" in targets, f"{page.relative_to(REPO_ROOT)} has no link to ../README.md"
