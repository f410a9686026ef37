"""Real English sentences that ship with Python: documentation strings.

No download and no data package. :func:`stdlib_sentences`: the docstrings of ``MODULES`` (stable,
hand-written English prose by the CPython developers) split into sentences, deterministic for one
Python version (the held-out evaluation text of the examples and benchmarks).
:func:`source_sentences`: many more, from the docstrings in the ``.py`` files of the standard library
and of the installed packages, read with :mod:`ast` (nothing is imported), for distillation; pass the
evaluation sentences as ``exclude`` to keep the two disjoint.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable

MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "re", "subprocess", "threading", "unittest",
    "email", "http.client", "urllib.request", "xml.dom.minidom", "csv", "datetime", "decimal", "fractions",
    "functools", "itertools", "random", "statistics", "string", "textwrap", "typing", "zipfile", "tarfile",
    "shutil", "tempfile", "socket", "ssl", "asyncio", "concurrent.futures", "multiprocessing", "pickle",
    "sqlite3", "difflib", "inspect", "ast", "dataclasses", "enum", "heapq", "bisect", "calendar", "locale",
    "gettext", "codecs", "io", "os", "platform", "sched", "queue", "smtplib", "imaplib", "ftplib", "pdb",
)  # fmt: skip

_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a module missing from this Python build contributes nothing
        return []
    found = [inspect.getdoc(module) or ""]
    for _, obj in sorted(vars(module).items()):
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__:
            found.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                found += [inspect.getdoc(m) or "" for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
    return found


def _sentences(doc: str, min_words: int, max_words: int) -> Iterable[str]:
    for para in re.split(r"\n\s*\n", doc):
        if para.lstrip().startswith((">>>", "-", "*", "|")) or "::" in para:
            continue
        for sent in _SPLIT.split(" ".join(para.split())):
            words = _WORD.findall(sent)
            letters = sum(ch.isalpha() or ch == " " for ch in sent)
            if min_words <= len(words) <= max_words and letters >= 0.85 * len(sent):
                yield sent


def _unique_sentences(docs: Iterable[str], n: int | None, min_words: int, max_words: int, exclude: Iterable[str] = ()) -> list[str]:
    """The sentences of ``docs`` (read lazily, in order) that are not in ``exclude``, each once, the first ``n``."""
    seen = set(exclude)
    out: list[str] = []
    for doc in docs:
        for sent in _sentences(doc, min_words, max_words):
            if sent not in seen:
                seen.add(sent)
                out.append(sent)
                if n is not None and len(out) >= n:
                    return out
    return out


def stdlib_sentences(n: int | None = None, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """English sentences from the docstrings of Python's standard library, deduplicated, in a fixed order.

    A sentence qualifies with ``min_words``..``max_words`` alphabetic words and mostly letters (code
    samples and tables are skipped). ``n`` caps the count. Raises ``ValueError`` when fewer than
    ``n`` are found (a stripped Python without docstrings, e.g. ``python -OO``).
    """
    out = _unique_sentences((doc for name in MODULES for doc in _docstrings(name)), n, min_words, max_words)
    if n is not None and len(out) < n:
        raise ValueError(f"only {len(out)} sentences found in the standard library's docstrings, {n} asked (python -OO strips them)")
    return out


def _file_docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # old escape sequences in some packages' sources
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def default_source_roots() -> list[Path]:
    """The standard library's directory and the environment's ``site-packages`` (purelib, platlib)."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths[k]) for k in ("stdlib", "purelib", "platlib") if Path(paths[k]).is_dir()})


def source_sentences(
    n: int | None = None,
    *,
    roots: Iterable[str | Path] | None = None,
    exclude: Iterable[str] = (),
    min_words: int = 6,
    max_words: int = 60,
) -> list[str]:
    """English sentences from the docstrings (module, class, function) of every ``.py`` file under
    ``roots`` (default :func:`default_source_roots`), parsed with :mod:`ast` -- no module is imported,
    so nothing runs. Same sentence rules as :func:`stdlib_sentences`; deduplicated; files in sorted
    path order (deterministic for one environment). ``exclude``: sentences never returned (e.g. the
    held-out evaluation sentences: they also occur in the standard library's sources). ``n`` caps the
    count (fewer are returned when the sources hold fewer). Raises ``ValueError`` for a root that is
    not a directory."""
    roots = [Path(r) for r in (default_source_roots() if roots is None else roots)]
    bad = [str(r) for r in roots if not r.is_dir()]
    if bad:
        raise ValueError(f"source roots must be directories: {bad}")
    paths = (path for root in roots for path in sorted(root.rglob("*.py"))
             # test suites' docstrings are terse and repetitive
             if not any(part in ("test", "tests", "idlelib", "lib2to3") for part in path.relative_to(root).parts))
    return _unique_sentences((doc for path in paths for doc in _file_docstrings(path)), n, min_words, max_words, exclude)
