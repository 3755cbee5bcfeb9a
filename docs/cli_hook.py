"""An MkDocs hook: writes each ``cera-rs`` command's ``--help`` into the CLI reference
page (reference/cli.md, at its marker) while the site is built, so the page is argparse's
own text for this version and cannot drift from it."""

from __future__ import annotations

import contextlib
import io
import os

MARKER = "<!-- cera-rs --help -->"
WIDTH = "76"  # argparse wraps to $COLUMNS: one width everywhere, and within the page


def _help(argv: list[str]) -> str:
    from cera_rs.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*argv, "--help"])
    return out.getvalue().rstrip()


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    from cera_rs.cli import COMMANDS

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        sections = [f"## `cera-rs`\n\n```text\n{_help([])}\n```"]
        sections += [f"## `cera-rs {name}`\n\n```text\n{_help([name])}\n```" for name in COMMANDS]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return markdown.replace(MARKER, "\n\n".join(sections))
