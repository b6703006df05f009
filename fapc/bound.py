"""The Bayes bound: the least RMSE any normal estimator can reach on a noisy sampled mesh.

A benchmark cloud is made by sampling a mesh uniformly by area and adding isotropic Gaussian
noise of a known sigma to each point. Given the mesh, the points are independent, so all that
the whole cloud says about where one point was drawn from is in that point's own position:
the posterior over its surface origin is the area density times the Gaussian kernel around the
noisy position. The normal that minimises the expected squared unoriented angle under that
posterior (its weighted Karcher mean on the projective plane) is the Bayes estimate; in
expectation no estimator has a lower squared error at any point, so none has a lower RMSE per
cloud (up to the sampling error of the query set).

This estimator knows the clean mesh and sigma, which no real one does: it is a floor to
measure the benchmark's columns against, not a method. The posterior is approximated by a dense
area-uniform sample of the mesh (spacing about sigma / 2.5); that sample's own noise makes a
few near-even blends suboptimal, which raises the bound by a few hundredths of a degree on a
benchmark cloud (29.68 against 29.64 deg with a spacing of sigma / 4 on TEST's armadillo at
1.2 %).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from fapc import bench_data
from fapc.datasets import Shape, load_shape
from fapc.eigen import sym3_eigh
from fapc.evaluate import NOISE_COLUMNS, angle_errors, build_clouds, scores
from fapc.io.mesh import face_normals, sample_mesh

log = logging.getLogger(__name__)


def bayes_normals(
    points: np.ndarray,
    *,
    surface_points: np.ndarray,
    surface_normals: np.ndarray,
    sigma: float,
    support: float = 4.0,
    max_neighbours: int = 768,
    iters: int = 20,
    chunk: int = 2048,
) -> np.ndarray:
    """Bayes estimate of the unoriented normal at each noisy point.

    Args:
        points: ``(Q, 3)`` noisy positions.
        surface_points: ``(M, 3)`` a dense area-uniform sample of the clean surface.
        surface_normals: ``(M, 3)`` unit normals at those samples (sign irrelevant).
        sigma: the noise's standard deviation, in the points' units (> 0).
        support: samples farther than ``support * sigma`` are ignored (weight < 0.04 %).
        max_neighbours: at most this many samples per point (a log line counts the points
            where this, not the support, limited them: enough for a sample spacing of
            ``sigma / 2.5``, where a plane holds about 310 within the support).
        iters: Karcher-mean iterations (from the top eigenvector of the weighted ``n n^T``).

    Returns:
        ``(Q, 3)`` unit normals.
    """
    points = np.asarray(points, dtype=np.float64)
    surface_points = np.asarray(surface_points, dtype=np.float64)
    surface_normals = np.asarray(surface_normals, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (Q, 3), got {points.shape}")
    if surface_points.ndim != 2 or surface_points.shape[1] != 3 or len(surface_points) == 0:
        raise ValueError(f"surface_points must be (M, 3) with M > 0, got {surface_points.shape}")
    if surface_normals.shape != surface_points.shape:
        raise ValueError(f"surface_normals {surface_normals.shape} must match surface_points "
                         f"{surface_points.shape}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma}")
    tree = cKDTree(surface_points)
    k = min(max_neighbours, len(surface_points))
    out = np.empty_like(points)
    for s in range(0, len(points), chunk):
        out[s:s + chunk] = _bayes_chunk(points[s:s + chunk], tree, surface_normals, sigma=sigma,
                                        radius=support * sigma, k=k, iters=iters)
    return out


def _bayes_chunk(x: np.ndarray, tree: cKDTree, normals: np.ndarray, *, sigma: float,
                 radius: float, k: int, iters: int) -> np.ndarray:
    d, idx = tree.query(x, k=k, distance_upper_bound=radius, workers=-1)
    d, idx = d.reshape(len(x), k), idx.reshape(len(x), k)  # (C, K)
    found = np.isfinite(d)
    if found[:, -1].any():
        log.info("bound: %d of %d points had more than %d samples within the support",
                 int(found[:, -1].sum()), len(x), k)
    w = np.where(found, np.exp(-0.5 * (np.where(found, d, 0.0) / sigma) ** 2), 0.0)
    lost = ~found[:, 0]
    if lost.any():  # farther than the support from every sample: the nearest one decides
        _, near = tree.query(x[lost], k=1)
        idx[lost, 0], w[lost, 0] = near, 1.0
    nj = normals[np.where(w > 0, idx, 0)]  # (C, K, 3)
    w = w / w.sum(1, keepdims=True)
    scatter = torch.from_numpy(np.einsum("ck,cki,ckj->cij", w, nj, nj))  # (C, 3, 3)
    basis = sym3_eigh(scatter)[1].numpy()  # (C, 3, 3): eigenvector columns, ascending
    n, cost = _karcher(nj, w, basis[..., 2], iters)
    # Where the posterior spans several faces the expected loss can have several minima (at a
    # cube's corner, four): restart from the other axes and the diagonals, keep the lowest.
    spread = np.nonzero(cost > np.radians(1.0) ** 2)[0]
    if len(spread):
        b = basis[spread]
        starts = [b[..., 0], b[..., 1]] + [
            (b[..., 2] + sa * b[..., 1] + sb * b[..., 0]) / np.sqrt(3.0)
            for sa in (1.0, -1.0) for sb in (1.0, -1.0)]
        for st in starts:
            m, c = _karcher(nj[spread], w[spread], st, iters)
            better = c < cost[spread] - 1e-12
            n[spread[better]], cost[spread[better]] = m[better], c[better]
    return n


def _karcher(nj: np.ndarray, w: np.ndarray, n: np.ndarray, iters: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Karcher mean of the unoriented directions ``nj (C, K, 3)`` (weights ``w (C, K)``
    summing to 1), from ``n (C, 3)``: the mean and its expected squared angle, ``(C,)``."""
    for _ in range(iters):
        c = np.einsum("cki,ci->ck", nj, n)
        aligned = nj * np.where(c < 0, -1.0, 1.0)[..., None]
        c = np.clip(np.abs(c), 0.0, 1.0)
        tangent = aligned - c[..., None] * n[:, None]  # (C, K, 3)
        tn = np.linalg.norm(tangent, axis=-1)
        log_map = tangent * (np.arccos(c) / np.maximum(tn, 1e-12))[..., None]
        v = (w[..., None] * log_map).sum(1)  # (C, 3): the mean in the tangent plane
        vn = np.linalg.norm(v, axis=-1)
        if vn.max() < 1e-10:
            break
        step = np.where(vn[:, None] > 0, v / np.maximum(vn, 1e-30)[:, None], 0.0)
        n = np.cos(vn)[:, None] * n + np.sin(vn)[:, None] * step
        n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    cos = np.clip(np.abs(np.einsum("cki,ci->ck", nj, n)), 0.0, 1.0)
    return n, (w * np.arccos(cos) ** 2).sum(1)


def dense_sample_size(shape: Shape, sigma: float, *, per_sigma: float = 2.5,
                      lo: int = 20_000, hi: int = 4_000_000) -> int:
    """Samples for a spacing of about ``sigma / per_sigma`` over the mesh, within [lo, hi]."""
    if not shape.is_mesh:
        raise ValueError(f"{shape.name}: the bound needs a mesh")
    area = float(face_normals(shape.vertices, shape.faces)[1].sum())
    return int(np.clip(per_sigma ** 2 * area / sigma ** 2, lo, hi))


def bayes_rmse(shape: Shape, points: np.ndarray, normals: np.ndarray, queries: np.ndarray, *,
               sigma: float, seed: int = 12345) -> float:
    """The Bayes estimate's RMSE (degrees) at ``points[queries]`` of a cloud sampled from the
    mesh ``shape`` with noise ``sigma``; ``normals (N, 3)`` is the cloud's ground truth."""
    if points.shape != normals.shape:
        raise ValueError(f"points {points.shape} and normals {normals.shape} differ")
    m = dense_sample_size(shape, sigma)
    dense, dense_n, _ = sample_mesh(shape.vertices, shape.faces, m, seed=seed)
    est = bayes_normals(points[queries], surface_points=dense, surface_normals=dense_n,
                        sigma=sigma)
    return scores(angle_errors(est, normals[queries]))["rmse"]


def benchmark_bound(root: str, *, queries: int = 5000,
                     columns: tuple[str, ...] = ("0.125%", "0.6%", "1.2%")) -> dict[str, Any]:
    """The bound on the TEST meshes' noise columns, the same clouds and queries as
    ``python -m fapc.bench accuracy``: ``{"columns": {col: mean RMSE}, "rows": [...]}``."""
    rows = []
    for mesh in bench_data.TEST_MESHES:
        shape = load_shape(os.path.join(root, mesh))
        for c in build_clouds([shape], columns=columns, queries=queries):
            sigma = NOISE_COLUMNS[c.column] * shape.diagonal
            r = bayes_rmse(shape, c.points, c.normals, c.queries, sigma=sigma)
            rows.append({"mesh": mesh, "column": c.column, "rmse": r})
            log.info("bound %s %s %.3f", mesh, c.column, r)
    cols = {col: float(np.mean([r["rmse"] for r in rows if r["column"] == col]))
            for col in columns}
    return {"columns": cols, "rows": rows}
