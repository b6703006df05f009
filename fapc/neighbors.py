"""k-nearest-neighbour search (CPU: scipy's cKDTree on all cores).

Exact search, so the neighbourhoods, and everything computed from them, do not depend on
the pose of the cloud.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def knn(
    points: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    workers: int = -1,
    tree: cKDTree | None = None,
) -> np.ndarray:
    """Indices of the ``k`` nearest points of each query (the query itself included when it
    is one of ``points``).

    Args:
        points: ``(N, 3)`` float.
        k: neighbours per query, ``1 <= k <= N``.
        queries: ``(Q, 3)``; default ``points``.
        workers: threads for scipy (-1: all cores).
        tree: a prebuilt ``cKDTree(points)`` to reuse.

    Returns:
        ``(Q, k)`` int64, nearest first.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    if not 1 <= k <= len(points):
        raise ValueError(f"k must be in [1, {len(points)}], got {k}")
    tree = cKDTree(points) if tree is None else tree
    q = points if queries is None else queries
    _, idx = tree.query(q, k=k, workers=workers)
    return np.asarray(idx, dtype=np.int64).reshape(len(q), k)
