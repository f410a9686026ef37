"""Real English sentences that ship with Python: the standard library's documentation strings.

No download and no data package: the docstrings of ``MODULES`` (stable, hand-written English prose
by the CPython developers) split into sentences. Deterministic for one Python version.
"""

from __future__ import annotations

import importlib
import inspect
import re

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


def stdlib_sentences(n: int | None = None, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """English sentences from the docstrings of Python's standard library, deduplicated, in a fixed order.

    A sentence qualifies with ``min_words``..``max_words`` alphabetic words and mostly letters (code
    samples and tables are skipped). ``n`` caps the count. Raises ``ValueError`` when fewer than
    ``n`` are found (a stripped Python without docstrings, e.g. ``python -OO``).
    """
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        for doc in _docstrings(name):
            for para in re.split(r"\n\s*\n", doc):
                if para.lstrip().startswith((">>>", "-", "*", "|")) or "::" in para:
                    continue
                for sent in _SPLIT.split(" ".join(para.split())):
                    words = _WORD.findall(sent)
                    letters = sum(ch.isalpha() or ch == " " for ch in sent)
                    if not (min_words <= len(words) <= max_words) or letters < 0.85 * len(sent) or sent in seen:
                        continue
                    seen.add(sent)
                    out.append(sent)
                    if n is not None and len(out) >= n:
                        return out
    if n is not None:
        raise ValueError(f"only {len(out)} sentences found in the standard library's docstrings, {n} asked (python -OO strips them)")
    return out
