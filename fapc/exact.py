"""Exact planes: on a cloud sampled exactly from a polygon mesh, each normal taken from the
facet that holds its point.

Points sampled without noise from a mesh lie exactly on their facets, so a query and the
points of its own facet are coplanar to the data's rounding, and no other plane through
the query holds more than a line's worth of points by chance. For each query this tries
the planes through the query and two of its ``pair_k`` nearest points (pairs that are
nearly collinear with it skipped) and counts each plane's inliers among the query's
``support_k`` nearest points (itself included): those within ``tol x spacing +
resolution`` of it. Where the best plane counts (it holds at least ``min_inliers`` points,
or ``min_tight`` within ``tol_tight x spacing``; ``min_inliers_rounded`` for rounded
coordinates, whose tolerance is looser) and holds more
than the plane through the query normal to its current normal, the query takes the best
plane's normal (the sign kept with the current one). Where the facet holds too few points,
or the surface is not a mesh (an analytic surface, noise of any size), no plane holds that
many and the normal stays as it was.

Scan lines are collinear points: a plane through a query's line holds the whole line, so
the default leaves clouds with scan lines alone (as for the plane vote,
:func:`fapc.near_scale.exact_for_figure`). ``resolution`` covers coordinates rounded to
float32 (:func:`coordinate_resolution`); coordinates rounded otherwise (decimal text)
leave the planes inexact and the step changes nothing.

Built from distances only: a rotated, reflected, translated or permuted cloud gives the
same result, moved (up to the rounding that ``tol`` absorbs).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fapc.eigen import sym3_eigh
from fapc.gather import rows


@dataclass(frozen=True)
class ExactSettings:
    """Chosen on TRAIN only (`fapc/weights/EXPERIMENTS.md`, "Exact planes on noiseless
    clouds"): the held-out shapes noiseless."""

    pair_k: int = 20  # planes through the query and two of its pair_k nearest points
    support_k: int = 48  # inliers counted among the query's support_k nearest (itself too)
    # tried first, a quarter of the cost: where these planes find nothing, the wider ones
    first_pair_k: int = 12
    first_support_k: int = 32
    # an inlier lies within tol x spacing (+ resolution) of the plane: float64 data sampled
    # on a facet lies within 1e-12 spacings of it, and 1e-6 also takes in the neighbouring
    # facets of a finely tessellated curve (dihedral angles of a few 1e-6 radians: the same
    # normal). On a noisy cloud or an analytic surface some plane through a query holds a
    # fourth point within 1e-6 spacings by chance at several percent of queries, a fifth
    # hardly ever, and a fourth within 1e-9 hardly ever: so a plane counts where it holds
    # min_inliers points within tol, or min_tight within tol_tight
    tol: float = 1e-6
    min_inliers: int = 5
    tol_tight: float = 1e-9
    min_tight: int = 4  # the query, the two points and one more, exactly
    min_inliers_rounded: int = 6  # within tol where resolution > 0 (tol_tight unused there)
    min_sin: float = 0.2  # pairs nearly collinear with the query (sine below) are skipped
    # a change by less than this many degrees is not made: 0 gives every point its facet's
    # normal; more leaves small departures from it (a smooth surface the facets approximate)
    # and puts right only normals that took another facet's
    min_change: float = 0.0
    spacing_rank: int = 9  # the spacing: the distance to the query's 9th nearest point

    def __post_init__(self) -> None:
        if not (2 <= self.pair_k < self.support_k and 2 <= self.first_pair_k < self.first_support_k
                and self.first_support_k <= self.support_k):
            raise ValueError(f"need 2 <= pair_k < support_k, got {self.pair_k}, {self.support_k} "
                             f"({self.first_pair_k}, {self.first_support_k} first)")
        if not self.spacing_rank < self.first_support_k:
            raise ValueError("spacing_rank must be below support_k")
        if not 0 <= self.min_change < 90:
            raise ValueError(f"min_change must be in [0, 90) degrees, got {self.min_change}")
        if (not 0 < self.tol_tight <= self.tol
                or min(self.min_inliers, self.min_tight, self.min_inliers_rounded) < 3
                or not 0 < self.min_sin < 1):
            raise ValueError("need 0 < tol_tight <= tol, min_inliers (all three) >= 3 and "
                             "0 < min_sin < 1")


def coordinate_resolution(points: np.ndarray) -> float:
    """How far rounding may have moved ``points (N, 3)`` off their surface: for
    coordinates that float32 holds exactly, half a float32 step at the largest magnitude
    (times 4: three coordinates, two points), else 0 (float64 data taken as exact)."""
    pts = np.asarray(points)
    if pts.size == 0:
        return 0.0
    as32 = pts.astype(np.float32)
    if pts.dtype != np.float32 and not np.array_equal(as32.astype(pts.dtype), pts):
        return 0.0
    return float(4 * 2.0**-24 * np.abs(as32).max())


def _check(points: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
           resolution: float, settings: ExactSettings) -> None:
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {tuple(points.shape)}")
    if query.ndim != 1:
        raise ValueError(f"query must have shape (Q,), got {tuple(query.shape)}")
    if support.ndim != 2 or len(support) != len(query) or support.shape[1] < settings.support_k:
        raise ValueError(f"support must have shape (Q, >= {settings.support_k}), got "
                         f"{tuple(support.shape)}")
    if resolution < 0:
        raise ValueError(f"resolution must be >= 0, got {resolution}")


def _local(points: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
           settings: ExactSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The support relative to each query ``(Q, S, 3)`` and the spacing ``(Q,)``."""
    local = rows(points, support[:, :settings.support_k].long()) - points[query].unsqueeze(1)
    return local, local[:, settings.spacing_rank].norm(dim=-1)


def facet_planes(
    points: torch.Tensor,
    *,
    query: torch.Tensor,
    support: torch.Tensor,
    resolution: float = 0.0,
    settings: ExactSettings = ExactSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's best plane that counts (module docstring), whatever its current normal.

    Args:
        points: ``(N, 3)`` (float64 for the default tolerances).
        query: ``(Q,)`` indices into ``points``.
        support: ``(Q, S)`` the queries' nearest points, nearest first, the query itself
            first (``S >= settings.support_k``).
        resolution: the coordinates' rounding, in their unit (:func:`coordinate_resolution`).

    Returns:
        ``planes (Q, 3)`` unit normals (arbitrary signs) and ``counts (Q,)`` their inliers,
        0 where no plane counts (or the query's neighbours coincide with it).
    """
    s = settings
    _check(points, query, support, resolution, s)
    plane, count = _best_planes(points, query, support, resolution, s, s.first_pair_k,
                                s.first_support_k)  # (Q, 3), (Q,)
    wide = (count == 0).nonzero().squeeze(1)
    if len(wide):  # the wider planes where the first find nothing
        plane[wide], count[wide] = _best_planes(points, query[wide], support[wide], resolution,
                                                s, s.pair_k, s.support_k)
    return plane, count


def _best_planes(points: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
                 resolution: float, s: ExactSettings, pair_k: int, support_k: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`facet_planes` from the pairs of the ``pair_k`` nearest, over the
    ``support_k`` nearest."""
    local = rows(points, support[:, :support_k].long()) - points[query].unsqueeze(1)
    spacing = local[:, s.spacing_rank].norm(dim=-1)  # (Q,)
    tol = (s.tol * spacing + resolution)[:, None, None]  # (Q, 1, 1)
    pairs = torch.tensor(list(itertools.combinations(range(1, pair_k + 1), 2)),
                         device=points.device)  # (P, 2)
    a, b = local[:, pairs[:, 0]], local[:, pairs[:, 1]]  # (Q, P, 3) each
    cross = torch.linalg.cross(a, b)  # (Q, P, 3)
    size = cross.norm(dim=-1)  # (Q, P)
    usable = size > s.min_sin * a.norm(dim=-1) * b.norm(dim=-1)
    plane = cross / size.clamp_min(torch.finfo(size.dtype).tiny).unsqueeze(-1)  # (Q, P, 3)
    dist = (plane @ local.transpose(1, 2)).abs()  # (Q, P, S)
    count = (dist < tol).sum(-1)  # (Q, P)
    if resolution > 0:
        counts = count >= s.min_inliers_rounded
    else:
        tight = (dist < (s.tol_tight * spacing)[:, None, None]).sum(-1)  # (Q, P)
        counts = (count >= s.min_inliers) | (tight >= s.min_tight)
    best_count, best = torch.where(counts & usable, count, 0).max(1)  # (Q,)
    best_count = torch.where(spacing > 0, best_count, 0)
    return plane[torch.arange(len(query), device=points.device), best], best_count


def exact_planes(
    points: torch.Tensor,
    normals: torch.Tensor,
    *,
    query: torch.Tensor,
    support: torch.Tensor,
    resolution: float = 0.0,
    settings: ExactSettings = ExactSettings(),
    planes: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's normal from the exact plane of its facet, where one is found.

    Args:
        points: ``(N, 3)`` (float64 for the default tolerances).
        normals: ``(Q, 3)`` the queries' current unit normals.
        query: ``(Q,)`` indices into ``points``.
        support: ``(Q, S)`` the queries' nearest points, nearest first, the query itself
            first (``S >= settings.support_k``).
        resolution: the coordinates' rounding, in their unit (:func:`coordinate_resolution`).
        planes, counts: :func:`facet_planes` at every point ``(N, 3)``, ``(N,)`` (read at
            the queries and their support points; counts 0 where not known: they must be
            known at the queries). Where the query's own planes find nothing, the facets
            of support points whose planes hold the query (within ``tol_tight x spacing +
            resolution``) give its normal: the top eigenvector of their summed ``n n^T``.
            None: its own planes only.

    Returns:
        ``normals (Q, 3)`` (the current one where nothing is found; signs kept with it) and
        ``changed (Q,)`` bool.
    """
    s = settings
    _check(points, query, support, resolution, s)
    if normals.shape != (len(query), 3):
        raise ValueError(f"normals must have shape ({len(query)}, 3), got {tuple(normals.shape)}")
    if (planes is None) != (counts is None):
        raise ValueError("planes and counts go together")
    if planes is None:
        new, best_count = facet_planes(points, query=query, support=support,
                                       resolution=resolution, settings=s)  # (Q, 3), (Q,)
    else:
        new, best_count = planes[query].to(points.dtype), counts[query]
    local, spacing = _local(points, query, support, s)  # (Q, S, 3), (Q,)
    own = normals.to(local.dtype)
    tol = s.tol * spacing + resolution  # (Q,)
    own_count = ((local @ own.unsqueeze(2)).squeeze(2).abs() < tol[:, None]).sum(1)  # (Q,)
    changed = (best_count > 0) & (best_count > own_count)
    if planes is not None and counts is not None:
        sup = support[:, 1:s.support_k].long()  # (Q, S - 1) not the query itself
        n_j = rows(planes.to(local.dtype), sup)  # (Q, S - 1, 3)
        held = ((local[:, 1:] * n_j).sum(-1).abs()
                < (s.tol_tight * spacing + resolution)[:, None]) & (rows(counts, sup) > 0)
        held &= ~changed.unsqueeze(1) & (spacing > 0).unsqueeze(1)  # (Q, S - 1)
        outer = (n_j * held.unsqueeze(-1).to(n_j.dtype)).transpose(1, 2) @ n_j  # (Q, 3, 3)
        from_facets = held.any(1)
        if from_facets.any():
            new = torch.where(from_facets.unsqueeze(1), sym3_eigh(outer)[1][..., 2], new)
            changed = changed | from_facets
    new = torch.where(((new * own).sum(1) < 0).unsqueeze(1), -new, new)
    if s.min_change > 0:  # (new . own) >= 0 now: the angle between them is below 90
        changed &= (new * own).sum(1) < math.cos(math.radians(s.min_change))
    return torch.where(changed.unsqueeze(1), new, own).to(normals.dtype), changed
