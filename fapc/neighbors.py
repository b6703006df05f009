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


def distinct_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact duplicates among ``points (N, 3)`` (finite): None when every point is distinct,
    else ``(first, inverse)``: ``first (U,)`` int64, each distinct point's first index, in
    the input's order, and ``inverse (N,)`` int64, each point's row of ``points[first]``.

    Duplicates (merged scans, exported vertex lists) fill a neighbourhood with copies of
    few points: a 32-point patch of a cloud whose points all appear four times holds 8
    distinct ones. Estimating once per distinct point keeps the neighbourhood what it would
    be without them. Points are compared bit for bit (``-0.0`` and ``0.0`` differ), so the
    result does not depend on the pose of the cloud.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    rows = np.ascontiguousarray(points).view(np.dtype((np.void, 3 * points.itemsize))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)  # (U,), (N,)
    if len(first) == len(points):
        return None
    order = np.argsort(first, kind="stable")  # distinct points in the input's order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order].astype(np.int64), rank[inverse.ravel()].astype(np.int64)
