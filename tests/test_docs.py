"""The documentation's generated parts (issue #46): the CLI reference equals `--help` for every command, and every
generated page (the CLI and bench references, the README's headline table) is what its source gives now. The site
itself is built by `make docs` (`mkdocs build --strict`), which `make test` runs; the guides' code blocks run in
tests/test_readme.py."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["prune", "distill", "eval", "report", "export", "serve", "push", "pull"]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page_blocks() -> dict[str, str]:
    """`linearpatch [COMMAND]` -> the help block the CLI page shows for it."""
    text = (ROOT / "docs" / "reference" / "cli.md").read_text()
    return {
        name: block for name, block in re.findall(r"^## (linearpatch[\w ]*)\n\n```text\n(.*?)```", text, re.M | re.S)
    }


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_cli_reference_equals_help(command):
    generator = _generator()
    argv = [sys.executable, "-m", "linearpatch.cli", *([command] if command else []), "--help"]
    env = dict(os.environ, COLUMNS=str(generator.HELP_COLUMNS))
    shown = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    blocks = _page_blocks()
    assert set(blocks) == {"linearpatch", *(f"linearpatch {name}" for name in COMMANDS)}  # every command, no other
    assert blocks["linearpatch" + (f" {command}" if command else "")] == shown


def test_generated_pages_are_up_to_date():
    generator = _generator()
    for path, text in generator.generated().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `python docs/generate.py`"


def test_every_page_is_in_the_site_and_every_figure_is_made():
    """mkdocs.yml's nav lists every page of docs/ (a page left out is built but unreachable), and every image a page
    shows is one `docs/generate.py --figures` makes."""
    generator = _generator()
    nav = set(re.findall(r"([\w/.-]+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md")}
    assert nav == pages
    shown = {
        name
        for path in (ROOT / "docs").rglob("*.md")
        for name in re.findall(r"\]\((?:\.\./)?images/([\w.-]+)\)", path.read_text())
    }
    assert shown and shown <= set(generator.FIGURES)
