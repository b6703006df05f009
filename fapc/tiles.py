"""Large clouds in tiles, so that memory stays bounded (a laser scan of 100 M points).

The FA pipeline holds about 0.6 GB per million points while it works (neighbour tables, kD
trees, patches). Above ``tile_points`` points, :func:`tiled_fa_normals` splits the cloud into
tiles of at most that many points, runs :func:`fapc.fa_run.fa_normals` on each tile plus a
halo around it, and keeps each tile's own answers, so the working memory is that of one tile.

- **Tiles** (:func:`plan_tiles`): the cloud is split at the median of its points' offsets
  along the top eigenvector of their covariance, and each half again, until every tile holds
  at most ``tile_points`` points. The two sides of a median plane do not depend on the sign
  of the eigenvector, so the tiles are the same sets of points whatever the pose of the
  cloud, and the result stays exactly equivariant (as the frames do, up to ties and
  repeated eigenvalues).
- **Halo**: every point within ``reach`` of the tile's side of each of its planes, where
  ``reach`` is :data:`REACH` far-patch radii (the 99.5 % quantile over the tile of the
  distance to the ``k_far``-th nearest point of a ``1/far_stride`` subsample). A point's
  answer reads its patch (one far radius, and two near radii more for the smoothed far
  positions), and each of the three snapping passes and the plane vote's pass reads its
  candidates' patches (one far radius more each); the confidence's, the light smoothing's
  and the crease step's near neighbourhoods add less than a far radius: about 5.5 typical
  far radii in all.
- **Same answers**: each tile takes its share of the whole cloud's far subsample
  (:func:`fapc.patches.far_subsample`), so where the halo covers every point a tile's
  answers read, they are those of one run over the whole cloud. A region much sparser than
  its tile's typical spacing, near a tile's border, can read past the halo; its normals
  there come from neighbourhoods cut at the halo's edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
# torch, scipy and the patch code are imported where used: the command line reads
# TILE_POINTS from here at start-up

TILE_POINTS = 5_000_000  # about 3 GB of working memory on a CPU
MIN_TILE_POINTS = 1_000  # smaller tiles would be mostly halo
REACH = 6.0  # far-patch radii of halo (see the module docstring)
RADIUS_SAMPLE = 4096  # points of a tile whose far radius sets its halo
CHUNK = 1 << 22  # points per projection chunk (keeps temporaries near 100 MB)


@dataclass
class Plane:
    """One side of a median plane: ``side * ((p - centre) . axis - offset) <= 0``."""

    centre: np.ndarray  # (3,)
    axis: np.ndarray  # (3,) unit
    offset: float
    side: int  # -1: offsets at most ``offset``; +1: above it

    def keep(self, points: np.ndarray, margin: float) -> np.ndarray:
        """``(M,)`` bool: the points of ``points (M, 3)`` on this side, or within ``margin``."""
        s = (points - self.centre) @ self.axis - self.offset
        return s <= margin if self.side < 0 else s >= -margin


@dataclass
class Tile:
    """``own``: the sorted indices a tile answers for; ``planes``: the sides it lies on."""

    own: np.ndarray
    planes: list[Plane]


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _offsets(points: np.ndarray, index: np.ndarray, centre: np.ndarray,
             axis: np.ndarray) -> np.ndarray:
    out = np.empty(len(index))
    for s in range(0, len(index), CHUNK):
        out[s:s + CHUNK] = (points[index[s:s + CHUNK]] - centre) @ axis
    return out


def _top_axis(points: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid ``(3,)`` and the top eigenvector ``(3,)`` of the covariance of
    ``points[index]`` (accumulated in chunks, float64)."""
    import torch

    from fapc.eigen import sym3_eigh

    total, outer = np.zeros(3), np.zeros((3, 3))
    for s in range(0, len(index), CHUNK):
        p = points[index[s:s + CHUNK]]
        total += p.sum(0)
    centre = total / len(index)
    for s in range(0, len(index), CHUNK):
        d = points[index[s:s + CHUNK]] - centre
        outer += d.T @ d
    _, vecs = sym3_eigh(torch.from_numpy(outer)[None])  # ascending eigenvalues
    return centre, vecs[0, :, 2].numpy()


def plan_tiles(points: np.ndarray, *, tile_points: int) -> list[Tile]:
    """Split ``points (N, 3)`` at median planes until every tile holds at most
    ``tile_points`` points (see the module docstring); tiles in a fixed order."""
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    if tile_points < 1:
        raise ValueError(f"tile_points must be >= 1, got {tile_points}")
    leaves: list[Tile] = []
    # int32 indices where they fit: 100 M points' indices are 400 MB, not 800
    todo = [Tile(np.arange(len(points), dtype=_index_dtype(len(points))), [])]
    while todo:
        tile = todo.pop()
        if len(tile.own) <= tile_points:
            leaves.append(tile)
            continue
        centre, axis = _top_axis(points, tile.own)
        s = _offsets(points, tile.own, centre, axis)
        median = float(np.median(s))
        low = s <= median
        if low.all() or not low.any():  # every point on the plane: no split helps
            leaves.append(tile)
            continue
        # the high side first onto the stack, so the low side is taken (and listed) first
        todo.append(Tile(tile.own[~low], [*tile.planes, Plane(centre, axis, median, 1)]))
        todo.append(Tile(tile.own[low], [*tile.planes, Plane(centre, axis, median, -1)]))
    return leaves


def far_radius(points: np.ndarray, spec: Any, *, seed: int = 0) -> float:
    """The 99.5 % quantile of the far patch's radius over up to :data:`RADIUS_SAMPLE` of
    ``points (M, 3)``: the distance to the ``k_far``-th nearest point of a
    ``1/far_stride`` subsample of them (``spec``: a :class:`fapc.patches.PatchSpec`)."""
    from scipy.spatial import cKDTree

    from fapc.patches import far_subsample

    sub = points[far_subsample(len(points), spec, seed)]
    k = min(spec.k_far_all, len(sub))
    rng = np.random.default_rng(seed)
    probe = points[rng.choice(len(points), size=min(len(points), RADIUS_SAMPLE), replace=False)]
    d, _ = cKDTree(sub).query(probe, k=k, workers=-1)
    return float(np.quantile(np.asarray(d).reshape(len(probe), -1)[:, -1], 0.995))


def halo(points: np.ndarray, tile: Tile, margin: float) -> np.ndarray:
    """Sorted indices of the points on the tile's side of each of its planes, or within
    ``margin`` of it (``tile.own`` among them)."""
    parts = []
    for s in range(0, len(points), CHUNK):
        p = points[s:s + CHUNK]
        keep = np.ones(len(p), bool)
        for plane in tile.planes:
            keep &= plane.keep(p, margin)
        parts.append(np.flatnonzero(keep) + s)
    return np.concatenate(parts)


def tiled_fa_normals(points: np.ndarray, model: Any, *, tile_points: int, seed: int = 0,
                     query_index: np.ndarray | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fapc.fa_run.fa_normals` over ``points (N, 3)`` (finite, centred, float64) one
    tile at a time: the same ``(Q, 3)``, ``(Q,)``, ``(Q,)`` outputs (``Q`` = the queries,
    default every point). ``kwargs`` go to ``fa_normals``; ``progress(done, total)`` counts
    the queries answered (within a tile, its share of that tile's work)."""
    from fapc.fa_run import fa_normals
    from fapc.patches import far_subsample

    n = len(points)
    spec = model.config.patch
    queries = np.arange(n) if query_index is None else np.asarray(query_index, np.int64)
    slot = np.full(n, -1, _index_dtype(n))  # each point's row among the queries (-1: none)
    slot[queries] = np.arange(len(queries))
    normals = np.zeros((len(queries), 3), np.float32)
    confidence = np.zeros(len(queries), np.float32)
    curvature = np.zeros(len(queries), np.float32)
    draws = int(kwargs.get("draws", 1))
    # the whole cloud's far subsamples (what one run would use), one per draw
    far_all = [far_subsample(n, spec, seed + d) for d in range(draws)]
    tiles = plan_tiles(points, tile_points=tile_points)
    log.info("%d points in %d tiles of at most %d", n, len(tiles), tile_points)
    done = 0
    inside = np.zeros(n, bool)
    for i, tile in enumerate(tiles):
        asked = tile.own[slot[tile.own] >= 0]  # the tile's queries (sorted)
        if not len(asked):
            continue
        margin = REACH * max(far_radius(points[tile.own], spec, seed=seed + d)
                             for d in range(draws))
        ring = halo(points, tile, margin)  # (H,) sorted, own included
        inside[ring] = True
        shares = [np.searchsorted(ring, f[inside[f]]) for f in far_all]  # the tile's share
        inside[ring] = False
        far = shares[0] if draws == 1 else shares
        log.info("tile %d/%d: %d points, %d with the halo (%.3g wide)", i + 1, len(tiles),
                 len(tile.own), len(ring), margin)

        def tick(d: int, t: int, base: int = done, size: int = len(asked)) -> None:
            if progress is not None:
                progress(base + int(size * d / max(t, 1)), len(queries))

        # every point of the tile asked (a whole cloud): one run over tile and halo, whose
        # own rows are kept (cheaper than query mode's neighbour hops); else the queries
        whole = len(asked) == len(tile.own)
        local = np.searchsorted(ring, asked)
        nrm, conf, curv = fa_normals(points[ring], model, seed=seed, far_index=far,
                                     query_index=None if whole else local, progress=tick,
                                     **kwargs)
        if whole:
            nrm, conf, curv = nrm[local], conf[local], curv[local]
        rows = slot[asked]
        normals[rows], confidence[rows], curvature[rows] = nrm, conf, curv
        done += len(asked)
    if progress is not None:
        progress(len(queries), len(queries))
    return normals, confidence, curvature
