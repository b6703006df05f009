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

    Memory: a 64-bit hash per point, sorted in place, finds whether any two points may be
    equal (about 8 bytes per point for a cloud without duplicates: a 100 M-point scan on a
    laptop); only points whose hashes repeat are compared exactly.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    n = len(points)
    pts = np.ascontiguousarray(points, dtype=np.float64)
    bits = pts.view(np.uint64)  # (N, 3)
    h = _mix(bits[:, 0])
    for d in (1, 2):
        h ^= bits[:, d]
        h = _mix(h)  # (N,) uint64
    key = np.sort(h)
    if not (key[1:] == key[:-1]).any():
        return None
    del key
    order = np.argsort(h, kind="stable")  # (N,)
    hs = h[order]
    same = hs[1:] == hs[:-1]
    del h, hs
    in_run = np.zeros(n, bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    cand = np.sort(order[in_run])  # (C,) points whose hash repeats, in the input's order
    del order, in_run
    rows = pts[cand].view(np.dtype((np.void, 24))).ravel()
    _, at, group = np.unique(rows, return_index=True, return_inverse=True)  # exact, (G,), (C,)
    rep = np.arange(n)  # each point's first copy: cand is sorted, so cand[at] is the first
    rep[cand] = cand[at][group.ravel()]
    is_first = rep == np.arange(n)
    if is_first.all():  # hash collisions only
        return None
    first = np.flatnonzero(is_first)
    return first, (np.cumsum(is_first) - 1)[rep]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a ``uint64`` array (wrapping arithmetic): a well-spread hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
