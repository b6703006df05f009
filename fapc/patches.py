"""Local patches for the normal network: a near and a far scale around each query point.

A patch is the ``k_near`` nearest neighbours of the query in the full cloud plus its
``k_far`` nearest neighbours in a fixed subsample holding ``1/far_stride`` of the points
(chosen by index with a fixed seed, never by coordinates), so one patch of
``k_near + k_far`` points sees both the fine detail and about ``k_far * far_stride``
neighbours' worth of context. With ``k_ext > 0`` the patch goes on with the next ``k_ext``
far neighbours (an outer ring the network does not see; the model weights it per patch).
Coordinates are centred on the query in float64, then divided
by the RMS radius of the first ``k_near + k_far`` points (scale invariance) and cast to float32.

All of this depends only on distances, so a rotated, reflected or translated cloud gives the
same patches, rotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class PatchSpec:
    """How patches are built (stored in the model's config)."""

    k_near: int = 32
    k_far: int = 32
    far_stride: int = 6
    far_smooth: int = 0  # passes of neighbour averaging applied to far-scale points
    k_ext: int = 0  # outer ring: far neighbours k_far .. k_far + k_ext - 1 (not seen by the net)

    @property
    def size(self) -> int:
        return self.k_near + self.k_far + self.k_ext

    @property
    def k_far_all(self) -> int:
        """Far neighbours per query, outer ring included."""
        return self.k_far + self.k_ext


def smoothed_positions(points: np.ndarray, near: np.ndarray) -> np.ndarray:
    """The mean of each point's near neighbours ``(N, 3)``: far-scale points are replaced by
    these, which averages the noise of ``k_near`` points into each of them."""
    pts, nb = torch.from_numpy(points), torch.from_numpy(near)
    out = torch.empty_like(pts)
    for s in range(0, len(points), 1 << 16):
        out[s:s + (1 << 16)] = pts[nb[s:s + (1 << 16)]].mean(1)
    return out.numpy()


def patch_scale(local: torch.Tensor, spec: PatchSpec) -> torch.Tensor:
    """RMS radius ``(Q,)`` of the points the network sees (``local (Q, K, 3)``, outer ring
    excluded, so the ring does not change the network's input)."""
    return local[:, : spec.k_near + spec.k_far].square().sum(-1).mean(-1).sqrt()


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
        n_far = max(spec.k_far_all, n // max(spec.far_stride, 1))
        rng = np.random.default_rng(seed)
        self.far_index = np.sort(rng.choice(n, size=min(n, n_far), replace=False))
        self.far_tree = cKDTree(self.points[self.far_index])
        if n < spec.k_near or len(self.far_index) < spec.k_far_all:
            raise ValueError(f"need at least {spec.k_near} points for a patch, got {n}")
        self.near_all: np.ndarray | None = None
        self.smooth: np.ndarray | None = None
        if spec.far_smooth:
            _, near = self.tree.query(self.points, k=spec.k_near, workers=-1)
            self.near_all = np.asarray(near, np.int64).reshape(n, -1)
            self.smooth = self.points
            for _ in range(int(spec.far_smooth)):
                self.smooth = smoothed_positions(self.smooth, self.near_all)

    def neighbours(self, query_index: np.ndarray) -> np.ndarray:
        """``(Q,)`` query indices -> ``(Q, size)`` neighbour indices into points."""
        q = self.points[query_index]
        if self.near_all is not None:
            near = self.near_all[query_index]
        else:
            _, near = self.tree.query(q, k=self.spec.k_near, workers=-1)
        _, far = self.far_tree.query(q, k=self.spec.k_far_all, workers=-1)
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
        k = self.spec.k_near
        # gathers in torch (multi-threaded), arithmetic in float64 until the patch is centred
        pts = torch.from_numpy(self.points)
        nb_t = torch.from_numpy(nb)
        q = pts[torch.from_numpy(np.asarray(query_index, np.int64))].unsqueeze(1)  # (Q, 1, 3)
        if self.smooth is not None:  # far scale: smoothed positions
            pos = torch.cat([pts[nb_t[:, :k]], torch.from_numpy(self.smooth)[nb_t[:, k:]]], 1)
        else:
            pos = pts[nb_t]
        local = pos - q  # (Q, K, 3) float64
        scale = patch_scale(local, self.spec)  # (Q,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        patches = (local / scale[:, None, None]).to(torch.float32)
        return patches.numpy(), scale.numpy(), nb


class TorchPatchBuilder:
    """:class:`PatchBuilder` on a torch device: the same patches (same far subsample), with
    the exact grid kNN of :mod:`fapc.knn_torch` instead of scipy, so the whole pipeline can
    stay on a GPU. ``points`` must already be centred (in float64) before the cast."""

    def __init__(self, points: np.ndarray, spec: PatchSpec, *, device: str | torch.device,
                 seed: int = 0) -> None:
        from fapc.knn_torch import GridKNN

        n = len(points)
        self.spec = spec
        self.points = torch.as_tensor(np.asarray(points, np.float32), device=device)
        n_far = max(spec.k_far_all, n // max(spec.far_stride, 1))
        rng = np.random.default_rng(seed)  # the same subsample as PatchBuilder
        far = np.sort(rng.choice(n, size=min(n, n_far), replace=False))
        if n < spec.k_near or len(far) < spec.k_far_all:
            raise ValueError(f"need at least {spec.k_near} points for a patch, got {n}")
        self.far_index = torch.as_tensor(far, device=device)
        self.grid = GridKNN(self.points, spec.k_near)
        self.far_grid = GridKNN(self.points[self.far_index], spec.k_far_all)
        self.near_all: torch.Tensor | None = None
        self.smooth: torch.Tensor | None = None
        if spec.far_smooth:
            self.near_all, _ = self.grid.query(self.points, spec.k_near)
            self.smooth = self.points
            for _ in range(int(spec.far_smooth)):
                prev, self.smooth = self.smooth, torch.empty_like(self.points)
                for s in range(0, n, 1 << 18):
                    self.smooth[s:s + (1 << 18)] = prev[self.near_all[s:s + (1 << 18)]].mean(1)

    def patches(self, query_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q,)`` indices -> ``patches (Q, K, 3)`` float32 and ``scale (Q,)``."""
        q = self.points[query_index]  # (Q, 3)
        if self.near_all is not None:
            near = self.near_all[query_index]
        else:
            near, _ = self.grid.query(q, self.spec.k_near)
        far, _ = self.far_grid.query(q, self.spec.k_far_all)
        far = self.far_index[far]
        if self.smooth is not None:
            pos = torch.cat([self.points[near], self.smooth[far]], 1)
        else:
            pos = self.points[torch.cat([near, far], 1)]
        local = pos - q.unsqueeze(1)  # (Q, K, 3)
        scale = patch_scale(local, self.spec)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return local / scale[:, None, None], scale
