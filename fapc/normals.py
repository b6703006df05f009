"""``estimate_normals``: the Python entry point behind ``fapc normals``.

Non-finite points are handled here, once, for every method: they are left out of every
neighbourhood and get a zero normal, zero confidence and zero curvature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from fapc.errors import FapcError

log = logging.getLogger(__name__)

METHODS = ("pca",)


@dataclass
class NormalsResult:
    """Per-point outputs, in the input's order.

    Attributes:
        normals: ``(N, 3)`` float32, unit (zero for invalid points).
        confidence: ``(N,)`` float32 in [0, 1].
        curvature: ``(N,)`` float32 (surface variation, in [0, 1/3]).
        valid: ``(N,)`` bool, False where the input point was not finite.
    """

    normals: np.ndarray
    confidence: np.ndarray
    curvature: np.ndarray
    valid: np.ndarray


def as_points(points: Any) -> np.ndarray:
    """``(N, 3)`` numpy array from a numpy array, a torch tensor, a :class:`fapc.PointCloud`
    or an open3d ``PointCloud``."""
    if hasattr(points, "points") and not isinstance(points, np.ndarray):
        points = points.points  # fapc.PointCloud or open3d.geometry.PointCloud
    if hasattr(points, "detach"):
        points = points.detach().cpu().numpy()
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return arr


def estimate_normals(
    points: Any,
    *,
    method: str = "pca",
    k: int = 30,
) -> NormalsResult:
    """Estimate unoriented normals, a confidence and the curvature of every point.

    Args:
        points: ``(N, 3)`` array (float64 kept as float64 until each patch is centred),
            a torch tensor, a :class:`fapc.PointCloud` or an open3d ``PointCloud``.
        method: ``"pca"`` (local PCA over ``k`` neighbours).
        k: neighbourhood size.

    Raises:
        FapcError: no finite point, or fewer finite points than ``k``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if k < 3:
        raise ValueError(f"k must be at least 3, got {k}")
    pts = as_points(points)
    valid = np.isfinite(pts).all(axis=1)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise FapcError("no finite point")
    if n_valid < k:
        raise FapcError(f"only {n_valid} finite points, fewer than k={k}")
    finite = pts[valid] if n_valid < len(pts) else pts
    # centre the whole cloud in float64 first: georeferenced coordinates keep their precision
    finite = np.asarray(finite, np.float64)
    finite = finite - finite.mean(axis=0)
    from fapc.pca import pca_normals

    nrm, conf, curv = pca_normals(finite, k=k)
    if n_valid == len(pts):
        return NormalsResult(nrm, conf, curv, valid)
    out = NormalsResult(np.zeros((len(pts), 3), np.float32), np.zeros(len(pts), np.float32),
                        np.zeros(len(pts), np.float32), valid)
    out.normals[valid], out.confidence[valid], out.curvature[valid] = nrm, conf, curv
    return out
