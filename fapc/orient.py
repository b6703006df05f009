"""Consistent orientation of unoriented normals.

- ``mst``: propagation over a minimum spanning tree of the kNN graph, edge cost
  ``1 - |n_i . n_j| + w (|e . n_i| + |e . n_j|) / 2`` with ``e`` the edge's unit direction
  (flip across the edges where neighbouring normals agree best first; the second term keeps
  the tree in the surface: an edge that leaves the tangent plane, as one across a thin wall
  to the other side does, costs more, ``w`` = :data:`TANGENT_WEIGHT`); each connected
  component is seeded at its point farthest from the component's centroid, oriented
  outward. The tree is walked with vectorised pointer jumping, not a Python loop.
- ``viewpoint``: every normal faces a sensor position (``n . (view - p) > 0``).
- ``outward``: every normal faces away from the cloud's centroid (star-shaped objects).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

from fapc.neighbors import knn

MODES = ("none", "mst", "viewpoint", "outward")
# Chosen on TRAIN meshes (100,000 points, the FA normals, noise 0 / 0.125 / 0.6 %: 111
# clouds): clouds oriented >= 99 % consistently 59 -> 64, mean 85.9 -> 88.9 %; 0.5 and 1.0
# gained as much there but flipped whole faces of clean thin plates (README: where it is weaker).
TANGENT_WEIGHT = 0.25


def parse_orient(spec: str) -> tuple[str, np.ndarray | None]:
    """``none``, ``mst``, ``outward``, ``viewpoint`` or ``viewpoint:x,y,z``."""
    mode, _, rest = spec.partition(":")
    if mode not in MODES:
        raise ValueError(f"--orient takes {', '.join(MODES)} (viewpoint:x,y,z), got {spec!r}")
    if rest:
        if mode != "viewpoint":
            raise ValueError(f"only viewpoint takes coordinates, got {spec!r}")
        try:
            vp = np.array([float(v) for v in rest.split(",")])
        except ValueError:
            raise ValueError(f"bad viewpoint {rest!r}: expected x,y,z") from None
        if vp.shape != (3,):
            raise ValueError(f"bad viewpoint {rest!r}: expected x,y,z")
        return mode, vp
    return mode, None


def orient_towards(points: np.ndarray, normals: np.ndarray, viewpoint: np.ndarray) -> np.ndarray:
    """Flip normals to face ``viewpoint (3,)``."""
    s = np.einsum("ij,ij->i", normals, viewpoint[None, :] - points)
    return np.where((s < 0)[:, None], -normals, normals)


def orient_outward(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    s = np.einsum("ij,ij->i", normals, points - points.mean(0))
    return np.where((s < 0)[:, None], -normals, normals)


def orient_mst(points: np.ndarray, normals: np.ndarray, *, k: int = 8,
               tangent_weight: float = TANGENT_WEIGHT) -> np.ndarray:
    """Orient ``normals (N, 3)`` consistently over the kNN graph of ``points (N, 3)``
    (``tangent_weight``: ``w`` in the module's edge cost; 0 for the plain normal-agreement
    cost)."""
    n = len(points)
    if n < 2:
        return normals.copy()
    k = min(k + 1, n)
    idx = knn(points, k)[:, 1:]  # (N, k-1) without self
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    cost = 1.0 - np.abs(np.einsum("ij,ij->i", normals[rows], normals[cols])) + 1e-6
    if tangent_weight:
        e = (points[cols] - points[rows]).astype(np.float64)  # (E, 3) edge directions
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
        out_of_plane = (np.abs(np.einsum("ij,ij->i", e, normals[rows]))
                        + np.abs(np.einsum("ij,ij->i", e, normals[cols])))  # (E,) in [0, 2]
        cost += 0.5 * tangent_weight * out_of_plane
    graph = coo_matrix((cost, (rows, cols)), shape=(n, n)).tocsr()
    graph = graph.maximum(graph.T)  # symmetric
    tree = minimum_spanning_tree(graph)
    tree = tree + tree.T
    ncomp, labels = connected_components(tree, directed=False)
    parent = np.arange(n)
    roots = _component_roots(points, labels, ncomp)
    for r in roots:
        order, pred = breadth_first_order(tree, r, directed=False, return_predecessors=True)
        parent[order[1:]] = pred[order[1:]]
    # sign of each node relative to its parent, then parity to the root by pointer jumping
    rel = np.sign(np.einsum("ij,ij->i", normals, normals[parent]))
    rel[rel == 0] = 1
    rel[roots] = 1
    sign = rel.astype(np.int8)
    anc = parent.copy()
    while True:  # after round r, sign[i] covers 2^r edges towards the root
        sign = sign * sign[anc]
        if np.all(anc[anc] == anc):
            break
        anc = anc[anc]
    out = normals * sign[:, None]
    # seed orientation: each root faces away from its component's centroid
    for r in roots:
        comp = labels == labels[r]
        c = points[comp].mean(0)
        if np.dot(out[r], points[r] - c) < 0:
            out[comp] = -out[comp]
    return out


def _component_roots(points: np.ndarray, labels: np.ndarray, ncomp: int) -> np.ndarray:
    """Per component, the point farthest from the component's centroid."""
    counts = np.bincount(labels, minlength=ncomp).astype(np.float64)
    cent = np.stack([np.bincount(labels, points[:, d], minlength=ncomp) for d in range(3)], 1)
    cent /= counts[:, None]
    dist = ((points - cent[labels]) ** 2).sum(1)
    order = np.lexsort((-dist, labels))  # by label, farthest first
    first = np.ones(len(order), bool)
    first[1:] = labels[order[1:]] != labels[order[:-1]]
    return order[first]


def orient(points: np.ndarray, normals: np.ndarray, mode: str, *,
           viewpoint: np.ndarray | None = None, k: int = 8) -> np.ndarray:
    """Dispatch on ``mode`` (see the module docstring); ``normals`` are not modified."""
    if mode == "none":
        return normals
    if mode == "mst":
        return orient_mst(points, normals, k=k)
    if mode == "viewpoint":
        return orient_towards(points, normals, np.zeros(3) if viewpoint is None else viewpoint)
    if mode == "outward":
        return orient_outward(points, normals)
    raise ValueError(f"unknown orientation mode {mode!r}")
