"""Consistent orientation of unoriented normals.

- ``mst``: propagation over a minimum spanning tree of the kNN graph (flip across the edges
  whose ends agree best first). An edge's agreement is
  ``m = n_i . n_j - lam (e . n_i)(e . n_j)`` with ``e`` its unit direction. ``lam = 2``
  compares ``n_i`` with ``n_j`` mirrored through the plane that bisects the edge: that holds
  for any circular arc through both points, and reads an edge across a thin wall (along both
  normals, normals opposite when oriented) the right way round. ``lam = 0`` is the plain
  comparison (Hoppe et al.), right where the edge lies in the tangent plane. ``lam`` goes
  from 0 to 2 as both ends' offsets along their normals go from ``c`` to ``2 c`` times the
  cloud's median RMS offset to its neighbours (``c`` = :data:`REFLECT_SIGNIFICANCE`), so
  offsets that noise explains keep the plain comparison. The cost is
  ``1 - |m| + w (|e . n_i| + |e . n_j|) / 2 x (1 - lam / 2)``: the second term keeps the tree
  in the surface where the mirror does not apply (``w`` = :data:`TANGENT_WEIGHT`). On a
  noisy cloud (the median point's RMS slope ``|e . n|`` to its neighbours at least
  :data:`DENOISE_ROUGHNESS`) the edges are measured between the points moved along their
  normals onto the plane through the mean of their 16 nearest points, so that a wall a few
  noise widths thick still shows. The tree is walked with vectorised pointer jumping, not a
  Python loop. Each connected component then faces outward by the sign of its normals' flux
  of ``p - centroid`` (``sum n . (p - c)``): over a closed surface with outward normals that
  flux is 3 x the enclosed volume, positive for any shape, convex or not.
- ``viewpoint``: every normal faces a sensor position (``n . (view - p) > 0``), one for
  the cloud or one per point (an E57 file's scans, each facing its own scanner).
- ``outward``: every normal faces away from the cloud's centroid (star-shaped objects).
- ``direction``: every normal has a non-negative component along a direction, ``+z`` by
  default (airborne LiDAR: ground and roofs face up); normals at right angles to it (walls)
  keep their sign.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree
from scipy.spatial import cKDTree

from fapc.neighbors import distinct_points, knn

MODES = ("none", "mst", "viewpoint", "outward", "direction")
# Chosen on TRAIN meshes (100,000 points, the FA normals, noise 0 / 0.125 / 0.6 %: 111
# clouds): clouds oriented >= 99 % consistently 59 -> 64, mean 85.9 -> 88.9 %; 0.5 and 1.0
# gained as much there but flipped whole faces of clean thin plates (README: where it is weaker).
TANGENT_WEIGHT = 0.25
# Chosen on the same TRAIN meshes, with noise 0.03 % added (148 clouds): 3 and 4 gained as
# much on clean clouds but lost 8-48 % on some clouds at 0.03 %, where noise passed the gate.
REFLECT_SIGNIFICANCE = 6.0
# Where the median point's RMS slope to its neighbours along its normal reaches this, noise
# rules the kNN scale; on the same TRAIN clouds clean ones scored at most 0.27, 0.03 % noise
# 0.09-0.29, 0.125 % and 0.6 % at least 0.32.
DENOISE_ROUGHNESS = 0.3
DENOISE_K = 16  # the denoising neighbourhood, the point itself included


def parse_orient(spec: str) -> tuple[str, np.ndarray | None]:
    """``none``, ``mst``, ``outward``, ``viewpoint[:x,y,z]`` or ``direction[:x,y,z]`` ->
    the mode and its vector (None where not given)."""
    mode, _, rest = spec.partition(":")
    if mode not in MODES:
        raise ValueError(f"--orient takes {', '.join(MODES)} (viewpoint:x,y,z, direction:x,y,z), "
                         f"got {spec!r}")
    if rest:
        if mode not in ("viewpoint", "direction"):
            raise ValueError(f"only viewpoint and direction take coordinates, got {spec!r}")
        try:
            vec = np.array([float(v) for v in rest.split(",")])
        except ValueError:
            raise ValueError(f"bad {mode} {rest!r}: expected x,y,z") from None
        if vec.shape != (3,) or not np.isfinite(vec).all():
            raise ValueError(f"bad {mode} {rest!r}: expected x,y,z")
        if mode == "direction" and not vec.any():
            raise ValueError(f"bad direction {rest!r}: it must not be zero")
        return mode, vec
    return mode, None


def orient_towards(points: np.ndarray, normals: np.ndarray, viewpoint: np.ndarray) -> np.ndarray:
    """Flip normals ``(N, 3)`` to face ``viewpoint``: one sensor position ``(3,)``, or one
    per point ``(N, 3)`` (a cloud merged from several scans, each facing its own scanner)."""
    viewpoint = np.asarray(viewpoint)
    if viewpoint.shape not in ((3,), points.shape):
        raise ValueError(f"viewpoint must have shape (3,) or {points.shape}, got {viewpoint.shape}")
    s = np.einsum("ij,ij->i", normals, viewpoint - points)
    return np.where((s < 0)[:, None], -normals, normals)


def orient_along(normals: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Flip normals ``(N, 3)`` so that ``n . direction >= 0`` (``direction (3,)``)."""
    direction = np.asarray(direction, np.float64)
    if direction.shape != (3,) or not direction.any():
        raise ValueError(f"direction must be a non-zero (3,) vector, got {direction.tolist()}")
    return np.where((normals @ direction < 0)[:, None], -normals, normals)


def orient_outward(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    s = np.einsum("ij,ij->i", normals, points - points.mean(0))
    return np.where((s < 0)[:, None], -normals, normals)


def orient_mst(points: np.ndarray, normals: np.ndarray, *, k: int = 8,
               tangent_weight: float = TANGENT_WEIGHT,
               reflect_significance: float | None = REFLECT_SIGNIFICANCE,
               denoise_roughness: float | None = DENOISE_ROUGHNESS) -> np.ndarray:
    """Orient ``normals (N, 3)`` consistently over the kNN graph of ``points (N, 3)``.

    ``tangent_weight``: ``w`` in the module's edge cost (0 for the plain normal-agreement
    cost). ``reflect_significance``: ``c`` of the mirrored agreement (module docstring);
    ``None`` compares the normals as they are (Hoppe's criterion). ``denoise_roughness``:
    the roughness from which the edges are measured between denoised points (module
    docstring); ``None`` never. Exact duplicate points are oriented once (the first of each)
    and each copy takes the side that agrees with it.
    """
    if len(points) < 2:
        return normals.copy()
    dup = distinct_points(np.asarray(points, np.float64))
    if dup is not None:  # copies would make components of their own: orient one of each
        first, inverse = dup
        rep = orient_mst(points[first], normals[first], k=k, tangent_weight=tangent_weight,
                         reflect_significance=reflect_significance,
                         denoise_roughness=denoise_roughness)[inverse]  # (N, 3)
        return np.where((np.einsum("ij,ij->i", normals, rep) < 0)[:, None], -normals, normals)
    n = len(points)
    k = min(k + 1, n)
    kd = cKDTree(points)
    epts, idx = points, None
    if reflect_significance is not None and denoise_roughness is not None:
        some = np.arange(0, n, max(1, n // 20_000))  # (S,) a strided sample is enough
        d = points[knn(points, k, queries=points[some], tree=kd)[:, 1:]] - points[some, None]
        slope2 = np.einsum("skd,sd->sk", d, normals[some]) ** 2 / np.maximum(
            np.einsum("skd,skd->sk", d, d), 1e-300)  # (S, k-1)
        if float(np.median(np.sqrt(slope2.mean(1)))) >= denoise_roughness:
            # noise rules the offsets at the kNN scale: measure between denoised points
            near = knn(points, max(k, min(DENOISE_K, n)), tree=kd)  # (N, K) self first
            epts, idx = _onto_local_planes(points, normals, near), near[:, 1:k]
    if idx is None:
        idx = knn(points, k, tree=kd)[:, 1:]  # (N, k-1) without self
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    agree, out_of_plane, mirror, offset = _edge_terms(epts, normals, rows, cols,
                                                      significance=reflect_significance)
    cost = 1.0 - np.abs(agree) + 1e-6 + 0.5 * tangent_weight * out_of_plane * (1.0 - mirror / 2)
    # directed kNN edges; scipy reads each as undirected, and the cost is symmetric
    graph = coo_matrix((cost, (rows, cols)), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(graph)
    tree = tree + tree.T
    ncomp, labels = connected_components(tree, directed=False)
    parent = np.arange(n)
    roots = np.unique(labels, return_index=True)[1]  # any point of a component starts its walk
    for r in roots:
        order, pred = breadth_first_order(tree, r, directed=False, return_predecessors=True)
        parent[order[1:]] = pred[order[1:]]
    # sign of each node relative to its parent, then parity to the root by pointer jumping
    child = np.arange(n)
    rel = np.sign(_edge_terms(epts, normals, child, parent, significance=reflect_significance,
                              offset=offset)[0])
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
    # each component faces outward by the sign of its normals' flux of (p - centroid): over a
    # closed surface with outward normals that is 3 x the enclosed volume, > 0 for any shape
    cent = np.stack([np.bincount(labels, points[:, d], minlength=ncomp) for d in range(3)], 1)
    cent /= np.bincount(labels, minlength=ncomp)[:, None]
    flux = np.bincount(labels, np.einsum("ij,ij->i", out, points - cent[labels]), minlength=ncomp)
    return np.where((flux[labels] < 0)[:, None], -out, out)


def _onto_local_planes(points: np.ndarray, normals: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Each point moved along its normal onto the plane through the mean of its neighbourhood
    ``near (N, K)`` (itself included): ``(N, 3)``."""
    mean = points[near].mean(1)  # (N, 3)
    return points - np.einsum("ij,ij->i", points - mean, normals)[:, None] * normals


def _edge_terms(points: np.ndarray, normals: np.ndarray, rows: np.ndarray, cols: np.ndarray, *,
                significance: float | None, offset: float | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per edge ``(rows[e], cols[e])``: the signed agreement ``m (E,)`` (its sign is the
    relative orientation), the out-of-plane term ``|e . n_i| + |e . n_j|`` ``(E,)``, the mirror
    weight ``lam (E,)`` in [0, 2], and the offset scale ``c`` x the median over ``rows`` of
    their RMS offset along their own normal (computed from these edges unless given).
    Symmetric in the two ends."""
    d = (points[cols] - points[rows]).astype(np.float64)  # (E, 3)
    length = np.maximum(np.sqrt(np.einsum("ij,ij->i", d, d)), 1e-300)
    off_i = np.einsum("ij,ij->i", d, normals[rows])  # (E,) offsets along each end's normal
    off_j = np.einsum("ij,ij->i", d, normals[cols])
    agree = np.einsum("ij,ij->i", normals[rows], normals[cols])
    mirror = np.zeros_like(agree)
    if significance is not None:
        if offset is None:
            count = np.bincount(rows)
            has = count > 0
            rms = np.sqrt(np.bincount(rows, off_i ** 2)[has] / count[has])
            offset = significance * float(np.median(rms))
        # 2 where both offsets clearly exceed the cloud's typical (noise or curvature) offset
        sig = np.minimum(np.abs(off_i), np.abs(off_j)) / max(offset, 1e-300)
        mirror = 2.0 * np.clip(sig - 1.0, 0.0, 1.0)
        agree = agree - mirror * (off_i / length) * (off_j / length)
    return agree, (np.abs(off_i) + np.abs(off_j)) / length, mirror, offset or 0.0


def orient(points: np.ndarray, normals: np.ndarray, mode: str, *,
           viewpoint: np.ndarray | None = None, direction: np.ndarray | None = None,
           k: int = 8) -> np.ndarray:
    """Dispatch on ``mode`` (see the module docstring); ``normals`` are not modified.
    ``viewpoint``: ``(3,)`` or one per point ``(N, 3)`` (default the origin); ``direction``:
    ``(3,)`` (default ``+z``)."""
    if mode == "none":
        return normals
    if mode == "mst":
        return orient_mst(points, normals, k=k)
    if mode == "viewpoint":
        return orient_towards(points, normals, np.zeros(3) if viewpoint is None else viewpoint)
    if mode == "outward":
        return orient_outward(points, normals)
    if mode == "direction":
        return orient_along(normals, np.array([0.0, 0.0, 1.0]) if direction is None else direction)
    raise ValueError(f"unknown orientation mode {mode!r}")


def orient_spec(points: np.ndarray, normals: np.ndarray, spec: str, *,
                file_viewpoint: np.ndarray | None = None, k: int = 8) -> np.ndarray:
    """:func:`orient` from an ``--orient`` text (:func:`parse_orient`): its coordinates, or
    for a bare ``viewpoint`` the file's own sensor position(s) ``file_viewpoint`` (``(3,)``
    or ``(N, 3)``; the origin when None)."""
    mode, vec = parse_orient(spec)
    if mode == "viewpoint":
        return orient(points, normals, mode, viewpoint=file_viewpoint if vec is None else vec, k=k)
    return orient(points, normals, mode, direction=vec, k=k)
