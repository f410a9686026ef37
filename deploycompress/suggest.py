"""Close-match suggestions for error messages, written once.

Every "did you mean" the project prints (command-line choices and options, recipe keys, config_list keys,
op types and module names, backend names, torchvision models, array names) comes from :func:`closest` /
:func:`did_you_mean`: :func:`difflib.get_close_matches` (Ratcliff/Obershelp similarity, best first), so
``resnet81`` suggests ``resnet18``, never the alphabetically first names.

This module imports nothing from the project, so every room may import it.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

__all__ = ["closest", "did_you_mean", "CUTOFF"]

CUTOFF = 0.6  #: difflib's similarity ratio a candidate needs (0..1), difflib's own default


def closest(word: Any, candidates: Iterable[Any], n: int = 3, cutoff: float = CUTOFF) -> list[str]:
    """Up to ``n`` of ``candidates`` most similar to ``word``, best first (their ``str``)."""
    return difflib.get_close_matches(str(word), [str(c) for c in candidates], n=n, cutoff=cutoff)


def did_you_mean(word: Any, candidates: Iterable[Any], n: int = 3, cutoff: float = CUTOFF) -> str:
    """``" (did you mean 'a' or 'b'?)"`` with :func:`closest`'s matches, or ``""`` when none is close."""
    found = closest(word, candidates, n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(f) for f in found)}?)" if found else ""
