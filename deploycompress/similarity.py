"""Row cosine similarity, the one rule behind every "cosine to the reference" figure (validate, hf.int8).

Rows are the last axis's vectors (one per sample or token). A row that is zero in both arrays is identical:
cosine 1; a row zero in one array only is as far as it can be from the other's: cosine 0 (before this rule was
shared, ``validate.compare_outputs`` gave 1.0 to a deployed output of zeros against a non-zero reference, and
``hf.int8.mean_cosine`` gave 0 to two zero rows).
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_cosines"]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two (N, D) arrays, in float64: (N,). Zero rows as the module says.
    Raises ``ValueError`` when the shapes differ or are not 2-D."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"row_cosines needs two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (na > 0) & (nb > 0)
    cos = (a * b).sum(1) / np.where(both, na * nb, 1.0)
    return np.where(both, cos, np.where((na == 0) & (nb == 0), 1.0, 0.0))
