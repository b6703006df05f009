"""Local-PCA normals: the baseline every learned estimator is measured against.

For each query, the covariance of its ``k`` nearest neighbours (centred in float64 on the
query first, so georeferenced coordinates lose nothing), the eigenvector of the smallest
eigenvalue is the normal, ``lambda0 / (lambda0 + lambda1 + lambda2)`` the curvature (surface
variation), and ``(lambda1 - lambda0) / lambda1`` a confidence in [0, 1] (1 on a clean
plane, 0 where no direction is preferred: isotropic or duplicate-only neighbourhoods).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from fapc.eigen import sym3_eigh
from fapc.neighbors import knn


def patch_covariance(patches: torch.Tensor) -> torch.Tensor:
    """``patches (M, K, 3)`` -> covariance about the patch mean ``(M, 3, 3)``."""
    d = patches - patches.mean(dim=1, keepdim=True)  # (M, K, 3)
    return d.transpose(1, 2) @ d / patches.shape[1]


def normals_from_covariance(cov: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``cov (M, 3, 3)`` -> ``normal (M, 3)``, ``confidence (M,)``, ``curvature (M,)``."""
    vals, vecs = sym3_eigh(cov)
    vals = vals.clamp_min(0)
    total = vals.sum(-1)
    eps = torch.finfo(vals.dtype).tiny
    curvature = torch.where(total > eps, vals[:, 0] / total.clamp_min(eps), 0.0)
    confidence = torch.where(vals[:, 1] > eps, (vals[:, 1] - vals[:, 0]) / vals[:, 1].clamp_min(eps),
                             0.0)
    return vecs[..., 0], confidence, curvature


def pca_normals(
    points: np.ndarray,
    *,
    k: int = 30,
    neighbors: np.ndarray | None = None,
    query_index: np.ndarray | None = None,
    chunk: int = 1 << 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA normals of every point.

    Args:
        points: ``(N, 3)`` finite coordinates (float32 or float64).
        k: neighbourhood size (ignored when ``neighbors`` is given).
        neighbors: ``(Q, K)`` neighbour indices to reuse.
        query_index: ``(Q,)`` estimate only at these points (default: all).
        chunk: queries per step (bounds memory).

    Returns:
        ``normals (Q, 3)`` float32 unit (unoriented), ``confidence (Q,)``, ``curvature (Q,)``.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    pts = np.asarray(points, dtype=np.float64)
    qi = np.arange(len(pts)) if query_index is None else np.asarray(query_index)
    tree = cKDTree(pts) if neighbors is None else None
    n = len(qi)
    normals = np.empty((n, 3), np.float32)
    conf = np.empty(n, np.float32)
    curv = np.empty(n, np.float32)
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        # neighbours chunk by chunk: memory stays bounded for clouds of tens of millions
        idx = knn(pts, k, queries=pts[qi[sl]], tree=tree) if neighbors is None else neighbors[sl]
        local = (pts[idx] - pts[qi[sl], None, :]).astype(np.float32)  # (C, K, 3), float64 centring
        nrm, c, cu = normals_from_covariance(patch_covariance(torch.from_numpy(local)))
        normals[sl], conf[sl], curv[sl] = nrm.numpy(), c.numpy(), cu.numpy()
    return normals, conf, curv
