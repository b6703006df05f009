"""Local patches for the normal network: a near and a far scale around each query point.

A patch is the ``k_near`` nearest neighbours of the query in the full cloud plus its
``k_far`` nearest neighbours in a fixed subsample holding ``1/far_stride`` of the points
(chosen by index with a fixed seed, never by coordinates), so one patch of
``k_near + k_far`` points sees both the fine detail and about ``k_far * far_stride``
neighbours' worth of context. With ``k_ext > 0`` the patch goes on with the next ``k_ext``
far neighbours (an outer ring the network does not see; the model weights it per patch).
With ``wide_stride > 0`` it ends with :data:`WIDE_ROWS` rows that summarise a much wider
neighbourhood of raw points (see :func:`wide_summary`), for the fits only.
Coordinates are centred on the query in float64, then divided
by the RMS radius of the first ``k_near + k_far`` points (scale invariance) and cast to float32.

All of this depends only on distances, so a rotated, reflected or translated cloud gives the
same patches, rotated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.spatial import cKDTree

from fapc.eigen import sym3_eigh
from fapc.gather import rows


@dataclass(frozen=True)
class PatchSpec:
    """How patches are built (stored in the model's config)."""

    k_near: int = 32
    k_far: int = 32
    far_stride: int = 6
    far_smooth: int = 0  # passes of neighbour averaging applied to far-scale points
    k_ext: int = 0  # outer ring: far neighbours k_far .. k_far + k_ext - 1 (not seen by the net)
    wide_stride: int = 0  # wide summary: cells of a 1/wide_stride subsample (0: off)
    k_wide: int = 32  # cells per wide summary

    @property
    def size(self) -> int:
        return self.k_near + self.k_far + self.k_ext + (WIDE_ROWS if self.wide_stride else 0)

    @property
    def k_far_all(self) -> int:
        """Far neighbours per query, outer ring included."""
        return self.k_far + self.k_ext

    @property
    def far_rows(self) -> slice:
        """The far scale's columns of a neighbour array (the network's far points)."""
        return slice(self.k_near, self.k_near + self.k_far)


WIDE_ROWS = 6  # pseudo-points per wide summary


def cell_moments(points: torch.Tensor, centres: torch.Tensor,
                 owner: torch.Tensor) -> torch.Tensor:
    """Raw moments of the points of each cell about the cell's centre: ``points (N, 3)``,
    ``centres (M, 3)``, ``owner (N,)`` (the cell of each point) -> ``(M, 10)``: count, the
    sum of ``d`` (3) and the sum of ``d d^T`` (xx, yy, zz, xy, xz, yz), ``d = p - centre``."""
    d = points - centres[owner]  # (N, 3)
    x, y, z = d.unbind(-1)
    rows = torch.stack([torch.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], -1)
    return torch.zeros(len(centres), 10, dtype=d.dtype, device=d.device).index_add_(0, owner, rows)


def wide_summary(moments: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Six pseudo-points ``(Q, 6, 3)`` with the same mean and covariance as the raw points
    of ``k_wide`` cells around each query, weighted by a Gaussian of the cell's distance.

    ``moments (Q, k_wide, 10)`` (:func:`cell_moments` of the query's cells), ``offsets (Q,
    k_wide, 3)`` (cell centre minus query). A cell's weight is ``exp(-2 (r / r_max)^2)``, ``r``
    its centre's distance to the query and ``r_max`` the largest of those: distances only, so
    the summary turns with the cloud. The pseudo-points are ``mean +- sqrt(3 lambda_j) e_j``
    over the eigenpairs of the pooled covariance: equal weights on them give back that mean
    and covariance exactly, so a weighted plane fit can take the whole wide neighbourhood
    (typically a thousand raw points) as six rows. Unlike averaging each point with its own
    neighbours, pooling the cells counts every raw point once, so heavy noise does not bias it.
    """
    r = offsets.norm(dim=-1)  # (Q, C)
    w = torch.exp(-2 * (r / r.amax(-1, keepdim=True).clamp_min(1e-30)).square())  # (Q, C)
    wm = (w.unsqueeze(1) @ moments).squeeze(1)  # (Q, 10): the weighted sums of the moments
    total = wm[:, 0].clamp_min(1e-30)  # (Q,)
    wn = w * moments[..., 0]  # (Q, C) weighted counts
    ws = w.unsqueeze(-1) * moments[..., 1:4]  # (Q, C, 3) weighted first moments
    # about the query, d -> d + o: sum (d + o) = s + n o and
    # sum (d + o)(d + o)^T = S + s o^T + o s^T + n o o^T, summed over the cells
    mean = (wm[:, 1:4] + (wn.unsqueeze(1) @ offsets).squeeze(1)) / total[:, None]  # (Q, 3)
    cross = ws.transpose(1, 2) @ offsets  # (Q, 3, 3): sum_c w s o^T
    spread = (offsets * wn.unsqueeze(-1)).transpose(1, 2) @ offsets  # (Q, 3, 3): sum w n o o^T
    sq = wm[:, [4, 7, 8, 7, 5, 9, 8, 9, 6]].reshape(-1, 3, 3)  # (Q, 3, 3): sum w S
    cov = (sq + cross + cross.transpose(1, 2) + spread) / total[:, None, None] \
        - mean.unsqueeze(-1) * mean.unsqueeze(-2)  # (Q, 3, 3)
    return pseudo_points(mean, cov)


def pseudo_points(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``mean +- sqrt(3 lambda_j) e_j`` ``(Q, 6, 3)`` for ``mean (Q, 3)`` and ``cov (Q, 3,
    3)``: six equally weighted points with exactly that mean and covariance."""
    vals, vecs = sym3_eigh(cov)
    arms = vecs * (3 * vals.clamp_min(0)).sqrt().unsqueeze(-2)  # (Q, 3, 3): columns
    arms = arms.transpose(-1, -2)  # (Q, 3 axes, 3 coords)
    return torch.cat([mean.unsqueeze(1) + arms, mean.unsqueeze(1) - arms], 1)  # (Q, 6, 3)


def summary_of(points: torch.Tensor) -> torch.Tensor:
    """The wide-summary rows ``(B, 6, 3)`` of the points ``(B, K, 3)`` themselves (equal
    weights): for feeding a model with a wide summary patches that come without one."""
    mean = points.mean(1)  # (B, 3)
    d = points - mean.unsqueeze(1)
    return pseudo_points(mean, d.transpose(1, 2) @ d / points.shape[1])


def smoothed_positions(points: np.ndarray, near: np.ndarray) -> np.ndarray:
    """The mean of each point's near neighbours ``(N, 3)``: far-scale points are replaced by
    these, which averages the noise of ``k_near`` points into each of them."""
    pts, nb = torch.from_numpy(points), torch.from_numpy(near)
    out = torch.empty_like(pts)
    for s in range(0, len(points), 1 << 16):
        out[s:s + (1 << 16)] = rows(pts, nb[s:s + (1 << 16)]).mean(1)
    return out.numpy()


def wide_subsample(n: int, spec: PatchSpec, seed: int) -> np.ndarray:
    """Sorted indices of the wide summary's cell centres (by index, seeded; never by
    coordinates). Raises ``ValueError`` when the cloud has too few points for ``k_wide``."""
    m = max(spec.k_wide, n // spec.wide_stride)
    if n < m:
        raise ValueError(f"need at least {spec.k_wide} points for a wide summary, got {n}")
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=m, replace=False))


def patch_scale(local: torch.Tensor, spec: PatchSpec) -> torch.Tensor:
    """RMS radius ``(Q,)`` of the points the network sees (``local (Q, K, 3)``, outer ring
    excluded, so the ring does not change the network's input)."""
    return local[:, : spec.k_near + spec.k_far].square().sum(-1).mean(-1).sqrt()


def far_subsample(n: int, spec: PatchSpec, seed: int) -> np.ndarray:
    """The far scale's subsample of ``n`` points: ``1/far_stride`` of them (at least
    ``k_far_all``), seeded, as sorted indices ``(M,)``."""
    n_far = max(spec.k_far_all, n // max(spec.far_stride, 1))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, n_far), replace=False))


def _far_index(n: int, spec: PatchSpec, seed: int, far_index: np.ndarray | None) -> np.ndarray:
    if far_index is None:
        return far_subsample(n, spec, seed)
    far_index = np.asarray(far_index, np.int64)
    if far_index.ndim != 1 or (len(far_index) and (far_index.min() < 0 or far_index.max() >= n)):
        raise ValueError(f"far_index must be indices into the {n} points")
    return far_index


class PatchBuilder:
    """Neighbour search structures of one cloud, reused for any number of queries.

    Args:
        points: ``(N, 3)`` finite float64 (already centred on the cloud, ideally).
        spec: patch shape.
        seed: seed of the far-scale subsample.
        far_index: the far-scale subsample ``(M,)`` (sorted indices) instead of the seeded
            one: a tile of a larger cloud takes its share of the whole cloud's
            (:mod:`fapc.tiles`).
    """

    def __init__(self, points: np.ndarray, spec: PatchSpec, *, seed: int = 0,
                 far_index: np.ndarray | None = None) -> None:
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), got {points.shape}")
        self.points = np.asarray(points, np.float64)
        self.spec = spec
        n = len(points)
        self.tree = cKDTree(self.points)
        self.far_index = _far_index(n, spec, seed, far_index)
        self.far_tree = cKDTree(self.points[self.far_index])
        if n < spec.k_near or len(self.far_index) < spec.k_far_all:
            raise ValueError(f"need at least {spec.k_near} points for a patch, got {n}")
        self.near_all: np.ndarray | None = None
        self.smooth: np.ndarray | None = None
        if spec.far_smooth:
            # in blocks, kept as int32: one query of every point would hold its distances
            # and int64 indices at once, 512 bytes per point, the run's peak memory
            self.near_all = np.empty((n, spec.k_near), np.int32 if n < 2**31 else np.int64)
            for b in range(0, n, 1 << 17):
                _, near = self.tree.query(self.points[b:b + (1 << 17)], k=spec.k_near, workers=-1)
                self.near_all[b:b + (1 << 17)] = np.asarray(near).reshape(-1, spec.k_near)
            self.smooth = self.points
            for _ in range(int(spec.far_smooth)):
                self.smooth = smoothed_positions(self.smooth, self.near_all)
        self.wide_tree: cKDTree | None = None
        if spec.wide_stride:  # every point joins the cell of its nearest wide-subsample point
            wide = wide_subsample(n, spec, seed)
            self.wide_centres = self.points[wide]
            self.wide_tree = cKDTree(self.wide_centres)
            _, owner = self.wide_tree.query(self.points, k=1, workers=-1)
            self.wide_moments = cell_moments(torch.from_numpy(self.points),
                                             torch.from_numpy(self.wide_centres),
                                             torch.from_numpy(np.asarray(owner, np.int64)))

    @staticmethod
    def as_index(index: np.ndarray) -> np.ndarray:
        """Point indices as this builder takes them (numpy int64)."""
        return np.asarray(index, np.int64)

    def near(self, index: np.ndarray) -> np.ndarray:
        """``(M,)`` point indices -> ``(M, k_near)`` their nearest points, nearest first."""
        if self.near_all is not None:
            return self.near_all[index].astype(np.int64)
        _, near = self.tree.query(self.points[index], k=self.spec.k_near, workers=-1)
        return np.asarray(near, np.int64).reshape(len(index), -1)

    def nearest(self, index: np.ndarray, k: int) -> np.ndarray:
        """``(M,)`` point indices -> ``(M, k)`` their ``k`` nearest points, nearest first."""
        _, near = self.tree.query(self.points[index], k=k, workers=-1)
        return np.asarray(near, np.int64).reshape(len(index), -1)

    def neighbours(self, query_index: np.ndarray) -> np.ndarray:
        """``(Q,)`` query indices -> ``(Q, k_near + k_far_all)`` neighbour indices into
        points: the near scale's, then the far scale's."""
        q = self.points[query_index]
        near = self.near(query_index)
        _, far = self.far_tree.query(q, k=self.spec.k_far_all, workers=-1)
        far = self.far_index[np.asarray(far, np.int64).reshape(len(q), -1)]
        return np.concatenate([near, far], axis=1)

    def patches(self, query_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patches of the queries.

        Returns:
            ``patches (Q, K, 3)`` float32 (centred on the query, divided by ``scale``),
            ``scale (Q,)`` float64 (RMS radius), ``neighbours (Q, K')`` int64 (the rows that
            are points of the cloud: all but a wide summary's).
        """
        nb = self.neighbours(query_index)
        k = self.spec.k_near
        # gathers in torch (multi-threaded), arithmetic in float64 until the patch is centred
        pts = torch.from_numpy(self.points)
        nb_t = torch.from_numpy(nb)
        q = pts[torch.from_numpy(np.asarray(query_index, np.int64))].unsqueeze(1)  # (Q, 1, 3)
        if self.smooth is not None:  # far scale: smoothed positions
            pos = torch.cat([rows(pts, nb_t[:, :k]), rows(torch.from_numpy(self.smooth), nb_t[:, k:])], 1)
        else:
            pos = rows(pts, nb_t)
        local = pos - q  # (Q, K, 3) float64
        if self.wide_tree is not None:
            _, cells = self.wide_tree.query(q.squeeze(1).numpy(), k=self.spec.k_wide, workers=-1)
            cells = torch.from_numpy(np.asarray(cells, np.int64).reshape(len(nb), -1))
            offsets = rows(torch.from_numpy(self.wide_centres), cells) - q  # (Q, C, 3)
            local = torch.cat([local, wide_summary(rows(self.wide_moments, cells), offsets)], 1)
        scale = patch_scale(local, self.spec)  # (Q,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        patches = (local / scale[:, None, None]).to(torch.float32)
        return patches.numpy(), scale.numpy(), nb


class TorchPatchBuilder:
    """:class:`PatchBuilder` on a torch device: the same patches (same far subsample), with
    the exact grid kNN of :mod:`fapc.knn_torch` instead of scipy, so the whole pipeline can
    stay on a GPU. ``points`` must already be centred (in float64) before the cast."""

    def __init__(self, points: np.ndarray, spec: PatchSpec, *, device: str | torch.device,
                 seed: int = 0, far_index: np.ndarray | None = None) -> None:
        from fapc.knn_torch import GridKNN

        n = len(points)
        self.spec = spec
        self.points = torch.as_tensor(np.asarray(points, np.float32), device=device)
        far = _far_index(n, spec, seed, far_index)  # the same subsample as PatchBuilder
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
                    self.smooth[s:s + (1 << 18)] = rows(prev, self.near_all[s:s + (1 << 18)]).mean(1)
        self.wide_grid: GridKNN | None = None
        if spec.wide_stride:
            wide = torch.as_tensor(wide_subsample(n, spec, seed), device=device)
            self.wide_centres = self.points[wide]
            self.wide_grid = GridKNN(self.wide_centres, spec.k_wide)
            owner = torch.cat([self.wide_grid.query(self.points[s:s + (1 << 18)], 1)[0][:, 0]
                               for s in range(0, n, 1 << 18)])
            self.wide_moments = cell_moments(self.points, self.wide_centres, owner)

    def as_index(self, index: np.ndarray) -> torch.Tensor:
        """Point indices as this builder takes them (a tensor on its device)."""
        return torch.as_tensor(index, device=self.points.device)

    def near(self, index: torch.Tensor) -> torch.Tensor:
        """``(M,)`` point indices -> ``(M, k_near)`` their nearest points, nearest first."""
        if self.near_all is not None:
            return self.near_all[index]
        return self.grid.query(self.points[index], self.spec.k_near)[0]

    def nearest(self, index: torch.Tensor, k: int) -> torch.Tensor:
        """``(M,)`` point indices -> ``(M, k)`` their ``k`` nearest points, nearest first."""
        return self.grid.query(self.points[index], k)[0]

    def neighbours(self, query_index: torch.Tensor) -> torch.Tensor:
        """``(Q,)`` indices -> ``(Q, k_near + k_far_all)``: near, then far neighbours."""
        far, _ = self.far_grid.query(self.points[query_index], self.spec.k_far_all)
        return torch.cat([self.near(query_index), self.far_index[far]], 1)

    def patches(self, query_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Q,)`` indices -> ``patches (Q, K, 3)`` float32, ``scale (Q,)`` and the
        neighbours ``(Q, K')`` (as :meth:`PatchBuilder.patches`)."""
        q = self.points[query_index]  # (Q, 3)
        nb = self.neighbours(query_index)
        near, far = nb[:, :self.spec.k_near], nb[:, self.spec.k_near:]
        if self.smooth is not None:
            pos = torch.cat([rows(self.points, near), rows(self.smooth, far)], 1)
        else:
            pos = rows(self.points, torch.cat([near, far], 1))
        local = pos - q.unsqueeze(1)  # (Q, K, 3)
        if self.wide_grid is not None:
            cells, _ = self.wide_grid.query(q, self.spec.k_wide)
            offsets = rows(self.wide_centres, cells) - q.unsqueeze(1)  # (Q, C, 3)
            local = torch.cat([local, wide_summary(rows(self.wide_moments, cells), offsets)], 1)
        scale = patch_scale(local, self.spec)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return local / scale[:, None, None], scale, nb


def builder_for_near_scale(
    builder: PatchBuilder | TorchPatchBuilder, spec: PatchSpec
) -> PatchBuilder | TorchPatchBuilder | None:
    """``builder`` for ``spec``, a patch that differs from its own in the near scale only,
    sharing its search structures (a shallow copy: no tree is built or query run again; with
    far smoothing, the far points keep the positions ``builder`` smoothed, and the near
    scale's neighbours are the first columns of its table). None where that cannot be done:
    a larger near scale than a far-smoothing builder's table holds, or too few points."""
    if replace(spec, k_near=builder.spec.k_near) != builder.spec:
        raise ValueError("the patch specs differ in more than the near scale")
    if len(builder.points) < spec.k_near or (
            builder.near_all is not None and spec.k_near > builder.spec.k_near):
        return None
    out = copy.copy(builder)
    out.spec = spec
    if builder.near_all is not None:
        out.near_all = builder.near_all[:, :spec.k_near]  # (N, k) nearest first
    return out


def builder_with_far_index(
    builder: PatchBuilder | TorchPatchBuilder, far_index: np.ndarray
) -> PatchBuilder | TorchPatchBuilder:
    """``builder`` with another far-scale subsample ``far_index (M,)`` (sorted indices into
    its points), sharing everything else: the kD-tree or grid, the near table and the smoothed
    positions (a shallow copy; only the far scale's search structure is built again, over
    ``M`` points). Another draw of the far scale for :func:`fapc.fa_run.fa_normals`'s
    ``draws``; a wide summary, where there is one, keeps ``builder``'s subsample."""
    n = len(builder.points)
    far = _far_index(n, builder.spec, 0, far_index)
    if len(far) < builder.spec.k_far_all:
        raise ValueError(f"far_index needs at least {builder.spec.k_far_all} points, "
                         f"got {len(far)}")
    out = copy.copy(builder)
    if isinstance(builder, TorchPatchBuilder):
        from fapc.knn_torch import GridKNN

        out.far_index = torch.as_tensor(far, device=builder.points.device)
        out.far_grid = GridKNN(builder.points[out.far_index], builder.spec.k_far_all)
    else:
        out.far_index = far
        out.far_tree = cKDTree(builder.points[far])
    return out
