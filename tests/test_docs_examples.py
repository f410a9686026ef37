"""Every Python block in README.md and docs/*.md runs as written; every CLI line there parses.

A block runs alone, in a fresh namespace and an empty working directory, unless its first line says
otherwise (visible to the reader too):

* ``# continues the block above`` - runs in the namespace the previous block of the same page left;
* ``# fragment: <why>`` - shown for its shape only (it needs the user's own data or a GPU): compiled, not run.

Blocks that take longer than a few seconds are listed in ``SLOW`` (marked ``slow``).
``deploycompress ...`` lines in ``bash`` blocks are parsed by the real argument parser (``[...]`` in a
synopsis line are optional parts, checked with them and without). The README's Python and CLI lines, and
``yaml`` recipe blocks, go through the same checks.
"""

from __future__ import annotations

import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTINUES, FRAGMENT = "# continues the block above", "# fragment:"
SLOW = {"README.md#1", "README.md#2", "docs/pruning.md#2", "docs/tensorrt.md#0"}  # > 5 s: trains, or a torchvision model


@dataclass
class Block:
    page: str
    index: int  # 0-based among the page's blocks of this language
    line: int
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}"


def _blocks(lang: str) -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text()
        found = [m for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) == lang]
        for i, m in enumerate(found):
            out.append(Block(str(page.relative_to(ROOT)), i, text[: m.start()].count("\n") + 1, lang, m.group(2)))
    return out


PYTHON = _blocks("python")


def _params(blocks):
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.id in SLOW else []) for b in blocks]


def _chain(block: Block) -> list[Block]:
    """The block and, while a block says it continues the one above, the blocks it continues."""
    same_page = [b for b in PYTHON if b.page == block.page]
    chain = [block]
    while chain[0].code.startswith(CONTINUES):
        assert chain[0].index > 0, f"{chain[0].id} continues a block above, but it is the page's first"
        chain.insert(0, same_page[chain[0].index - 1])
    return chain


@pytest.mark.parametrize("block", _params(PYTHON))
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    for b in _chain(block):
        compile(b.code, f"{b.page}:{b.line}", "exec")
    if block.code.startswith(FRAGMENT):
        return
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__main__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for b in _chain(block):
            exec(compile(b.code, f"{b.page}:{b.line}", "exec"), namespace)


def test_every_fragment_says_why():
    for b in PYTHON:
        if b.code.startswith(FRAGMENT):
            assert len(b.code.splitlines()[0]) > len(FRAGMENT) + 5, f"{b.id}: say why it is a fragment"


def _cli_lines() -> list[tuple[str, str]]:
    lines = []
    for b in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", b.code)  # continued lines
        for raw in text.splitlines():
            cmd = raw.split(" #")[0].strip()
            if cmd.startswith("cd ") and "&&" in cmd:
                cmd = cmd.split("&&", 1)[1].strip()
            if cmd.startswith("deploycompress "):
                lines.append((f"{b.page}:{b.line}", cmd))
    return lines


@pytest.mark.parametrize("where, line", _cli_lines(), ids=[f"{w} {c[:40]}" for w, c in _cli_lines()])
def test_cli_line_parses(where, line):
    from deploycompress.cli import build_parser

    bare = line
    while re.search(r"\[[^\[\]]*\]", bare):  # without the optional parts
        bare = re.sub(r"\s*\[[^\[\]]*\]", "", bare)
    variants = {bare}
    full = line
    while re.search(r"\[([^\[\]]*)\]", full):  # with all of them (nested brackets opened from inside out)
        full = re.sub(r"\[([^\[\]]*)\]", r"\1", full)
    variants.add(full)
    for v in variants:
        try:
            build_parser().parse_args(shlex.split(v)[1:])
        except SystemExit as exc:
            pytest.fail(f"{where}: {v!r} does not parse (exit {exc.code})")


def test_there_are_cli_lines_to_check():
    assert len(_cli_lines()) >= 10


@pytest.mark.parametrize("block", _params(_blocks("yaml")))
def test_yaml_recipe_block_passes_the_recipe_schema(block):
    import yaml

    from deploycompress.cli_args import check_recipe

    check_recipe(yaml.safe_load(block.code), f"{block.page}:{block.line}")


def test_every_public_name_is_on_a_docs_page():
    import deploycompress as dc

    text = "".join(p.read_text() for p in PAGES)
    missing = [n for n in dc.__all__ if n != "__version__" and n not in text]
    assert not missing, f"public names no docs page mentions (run tools/gen_api_index.py for docs/api.md): {missing}"
