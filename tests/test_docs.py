"""The documentation site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``: a
broken link or anchor, a page left out of the nav, an API reference that does not
resolve or a CLI page that cannot be written fails it. The site needs no network (no
script, stylesheet or font from another host), works opened from disk (every link a file
that exists, the search index beside it as a script), and every Python block of its pages
runs as written.

Which blocks run is tests/codeblocks.py's convention, shared with tests/test_readme.py:
a block fenced as ```` ```python ```` runs; ``sh``, ``text`` and every other language
are shown, not run. A page's blocks run in one process, in order; a page whose first
line is ``<!-- continues: guides/peft.md -->`` runs after that page's blocks, in its
process (spectra and export continue the quick start)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html import unescape
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from codeblocks import DOCS, ROOT, check_shown_output, continued, python_blocks, run


def mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    # not --quiet: it drops the warnings before --strict counts them
    command = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        str(config),
        "--site-dir",
        str(site),
    ]
    quiet = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice, not the site's
    return subprocess.run(
        command, cwd=config.parent, capture_output=True, text=True, timeout=300, env=quiet
    )


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site, built once for every test that reads it."""
    out = tmp_path_factory.mktemp("site")
    built = mkdocs(ROOT / "mkdocs.yml", out)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def test_every_page_is_built(site):
    """Each page is a file named after it (use_directory_urls: false)."""
    for page in DOCS.rglob("*.md"):
        assert (site / page.relative_to(DOCS).with_suffix(".html")).is_file(), page


def _local_links(page: Path) -> list[tuple[str, str, Path]]:
    """(tag, link, the file it opens from disk) for each href and src of ``page`` that
    stays on the site (no scheme, not an anchor of the page itself)."""
    out = []
    for tag in re.findall(r"<(?:a|link|script|img)\b[^>]*>", page.read_text()):
        for link in re.findall(r'\b(?:href|src)="([^"]*)"', tag):
            link = unescape(link)
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or not parts.path:
                continue
            out.append((tag, link, (page.parent / unquote(parts.path)).resolve()))
    return out


def test_the_site_works_opened_from_disk(site):
    """A browser opening site/index.html follows links as paths: every nav link (and
    every other link and script) of every page is a file, never a folder, which a
    browser would show as a listing; and the search finds its index as a script, which
    file:// pages load where they may not fetch JSON, and its worker's script."""
    # 404.html is a web server's page (its links are absolute): never opened from disk
    pages = sorted(p for p in site.rglob("*.html") if p.name != "404.html")
    nav = 0
    for page in pages:
        for tag, link, target in _local_links(page):
            assert target.is_file(), (page.relative_to(site), link)
            nav += "md-nav__link" in tag
        config = re.search(r'<script id="__config"[^>]*>(.*?)</script>', page.read_text(), re.S)
        assert config, page
        config = json.loads(config.group(1))
        base = (page.parent / config["base"]).resolve()
        assert base == site.resolve(), page
        assert (page.parent / config["search"]).resolve().is_file(), page
        assert "javascripts/iframe-worker.js" in page.read_text(), page  # the worker shim
    assert nav >= len(pages) * 20, nav  # each page's nav lists the whole site
    index = (site / "search" / "search_index.js").read_text()
    assert index.startswith("var __index = "), index[:40]
    docs = json.loads(index.removeprefix("var __index = "))["docs"]
    assert {d["location"].split("#")[0] for d in docs} >= {"index.html", "guides/spectra.html"}
    for doc in docs:
        assert (site / doc["location"].split("#")[0]).is_file(), doc["location"]


def test_home_page_shows_the_quick_start(site):
    """The home page includes the quick start of guides/peft.md (the block README.md
    holds and test_docs_python_blocks_run runs), not a copy of it."""
    quick_start = python_blocks(DOCS / "guides" / "peft.md")[0]
    assert "quick-start" in (DOCS / "index.md").read_text()
    shown = [
        unescape(re.sub(r"<[^>]+>", "", block))
        for block in re.findall(r"<pre\b.*?</pre>", (site / "index.html").read_text(), re.S)
    ]
    assert any(quick_start.strip() == text.strip() for text in shown), shown[:1]


def test_nothing_comes_from_another_host(site):
    """Scripts, stylesheets and fonts are the site's own files (search included)."""
    for html in site.rglob("*.html"):
        text = html.read_text()
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", text):
            assert not re.search(r'(?:src|href)="(?:https?:)?//', tag), (html, tag)
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, html
    assert (site / "search" / "search_index.json").is_file()
    assert (site / "search" / "search_index.js").is_file()  # the same, for file://


def test_cli_page_is_each_commands_help(site):
    from cera_rs.cli import COMMANDS

    text = (site / "reference" / "cli.html").read_text()
    assert "usage: cera-rs [-h]" in text
    for name in COMMANDS:
        assert f"usage: cera-rs {name}" in text, name
    assert "paired 95 % bootstrap interval" in text and "%%" not in text


def test_api_pages_hold_the_docstrings(site):
    config = (site / "reference" / "config.html").read_text()
    assert 'id="cera_rs.CeraConfig"' in config and "from_lora_config" in config
    export = (site / "reference" / "export.html").read_text()
    assert 'id="cera_rs.export.to_lora"' in export


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ("[a page](missing.md)", "contains a link 'missing.md', but the target is not found"),
        ("[an anchor](#nowhere)", "there is no such anchor on this page"),
        ("::: cera_rs.no_such_name", "cera_rs.no_such_name could not be found"),
    ],
)
def test_a_broken_page_fails_the_strict_build(tmp_path, broken, said):
    """The build this file runs would notice: the same validation and API handler,
    one page holding one mistake."""
    ours = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (plugin,) = [p for p in ours["plugins"] if isinstance(p, dict) and "mkdocstrings" in p]
    handler = plugin["mkdocstrings"]["handlers"]["python"]
    handler["paths"] = [str(ROOT / "python")]
    config = {
        "site_name": "broken",
        "validation": ours["validation"],
        "plugins": [{"mkdocstrings": {"handlers": {"python": handler}}}],
    }
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(f"# Broken\n\n{broken}\n")
    built = mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0 and said in built.stderr, built.stderr[-2000:]


def _chains() -> dict[str, list[Path]]:
    """Each page that continues no other, with the pages that continue it, in path order."""
    pages = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p) or continued(p))
    chains: dict[str, list[Path]] = {}
    for page in pages:
        root = continued(page) or page
        chain = chains.setdefault(str(root.relative_to(DOCS)), [root])
        if page != root:
            chain.append(page)
    return chains


def _quick_start(out: str, cwd: Path) -> None:
    assert "trainable params" in out and "step 2: loss" in out
    assert "eff.rank" in out and "lin@k" in out  # guides/spectra.md, guides/export.md
    for name in (
        "cera-adapter/adapter_model.safetensors",
        "spectra.png",
        "spectra.json",
        "lora-adapter/adapter_model.safetensors",
    ):
        assert (cwd / name).is_file(), name
    assert check_shown_output(DOCS / "guides" / "export.md", out) == 4


def _diffusers(out: str, cwd: Path) -> None:
    assert out.split() == ["['default']"]
    assert (cwd / "cera-unet" / "adapter_model.safetensors").is_file()


CHECKS = {"guides/peft.md": _quick_start, "guides/diffusers.md": _diffusers}


def test_the_runnable_pages_are_the_checked_ones():
    """A page that gains or loses its Python blocks gains or loses its checks here."""
    assert set(_chains()) == set(CHECKS)


@pytest.mark.parametrize("root", sorted(CHECKS))
def test_docs_python_blocks_run(root, tmp_path):
    pages = _chains()[root]
    blocks = [b for page in pages for b in python_blocks(page)]
    assert blocks, root
    done = run(blocks, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    CHECKS[root](done.stdout, tmp_path)
