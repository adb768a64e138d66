"""Every relative link in README.md and docs/**/*.md points to a file of the repository, and every #anchor to a
heading of its page: a reader who follows a link never lands nowhere, and no link leaves the repository."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def links(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())  # code blocks hold commands, not links
    return [m.group(1) for m in LINK.finditer(text)]


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_anchor_rule_matches_github_on_known_headings():
    # written out by hand from GitHub's rendering of such headings
    assert anchor("summary.json and the reproducibility ledger") == "summaryjson-and-the-reproducibility-ledger"
    assert anchor("Weights & Biases") == "weights--biases"
    assert anchor('The KD++ family as its authors ran it') == "the-kd-family-as-its-authors-ran-it"
    assert anchor("2. DOT against the vanilla trainer") == "2-dot-against-the-vanilla-trainer"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, frag = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not file.startswith(ROOT + os.sep) or not os.path.exists(file):
            broken.append(f"{target} (no file {os.path.relpath(file, ROOT)})")
        elif frag and file.endswith(".md") and frag not in anchors(file):
            broken.append(f"{target} (no heading #{frag} in {os.path.relpath(file, ROOT)})")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links: {broken}"


def test_no_page_links_outside_the_repository():
    outside = [(os.path.relpath(p, ROOT), t) for p in PAGES for t in links(p)
               if "shared/" in t or t.startswith("/")]
    assert not outside
