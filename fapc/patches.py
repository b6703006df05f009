"""Local patches for the normal network: a near and a far scale around each query point.

A patch is the ``k_near`` nearest neighbours of the query in the full cloud plus its
``k_far`` nearest neighbours in a fixed subsample holding ``1/far_stride`` of the points
(chosen by index with a fixed seed, never by coordinates), so one patch of
``k_near + k_far`` points sees both the fine detail and about ``k_far * far_stride``
neighbours' worth of context. Coordinates are centred on the query in float64, then divided
by the patch's RMS radius (scale invariance) and cast to float32.

All of this depends only on distances, so a rotated, reflected or translated cloud gives the
same patches, rotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class PatchSpec:
    """How patches are built (stored in the model's config)."""

    k_near: int = 32
    k_far: int = 32
    far_stride: int = 6

    @property
    def size(self) -> int:
        return self.k_near + self.k_far


class PatchBuilder:
    """Neighbour search structures of one cloud, reused for any number of queries.

    Args:
        points: ``(N, 3)`` finite float64 (already centred on the cloud, ideally).
        spec: patch shape.
        seed: seed of the far-scale subsample.
    """

    def __init__(self, points: np.ndarray, spec: PatchSpec, *, seed: int = 0) -> None:
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), got {points.shape}")
        self.points = np.asarray(points, np.float64)
        self.spec = spec
        n = len(points)
        self.tree = cKDTree(self.points)
        n_far = max(spec.k_far, n // max(spec.far_stride, 1))
        rng = np.random.default_rng(seed)
        self.far_index = np.sort(rng.choice(n, size=min(n, n_far), replace=False))
        self.far_tree = cKDTree(self.points[self.far_index])
        if n < spec.k_near or len(self.far_index) < spec.k_far:
            raise ValueError(f"need at least {spec.k_near} points for a patch, got {n}")

    def neighbours(self, query_index: np.ndarray) -> np.ndarray:
        """``(Q,)`` query indices -> ``(Q, k_near + k_far)`` neighbour indices into points."""
        q = self.points[query_index]
        _, near = self.tree.query(q, k=self.spec.k_near, workers=-1)
        _, far = self.far_tree.query(q, k=self.spec.k_far, workers=-1)
        near = np.asarray(near, np.int64).reshape(len(q), -1)
        far = self.far_index[np.asarray(far, np.int64).reshape(len(q), -1)]
        return np.concatenate([near, far], axis=1)

    def patches(self, query_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patches of the queries.

        Returns:
            ``patches (Q, K, 3)`` float32 (centred on the query, divided by ``scale``),
            ``scale (Q,)`` float64 (RMS radius), ``neighbours (Q, K)`` int64.
        """
        nb = self.neighbours(query_index)
        local = self.points[nb] - self.points[query_index][:, None, :]  # float64 centring
        scale = np.sqrt((local ** 2).sum(-1).mean(-1))  # (Q,)
        scale = np.where(scale > 0, scale, 1.0)
        return (local / scale[:, None, None]).astype(np.float32), scale, nb
