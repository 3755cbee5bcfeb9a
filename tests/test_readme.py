"""The README's Python block is the quick start of docs/guides/peft.md, which
tests/test_docs.py runs (with the pages that continue it: spectra, export), so the
README's example runs as written; and every file the README links to exists."""

from __future__ import annotations

import re

from codeblocks import DOCS, ROOT, python_blocks

README = ROOT / "README.md"


def test_readme_quick_start_is_the_one_the_docs_run():
    quick_start = python_blocks(DOCS / "guides" / "peft.md")[:1]
    assert python_blocks(README) == quick_start, "README: the quick start, as in the docs"


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "README: links into docs/"
    for link in local:
        assert (ROOT / link).exists(), link
