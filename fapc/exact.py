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
from dataclasses import dataclass

import numpy as np
import torch

from fapc.gather import rows


@dataclass(frozen=True)
class ExactSettings:
    """Chosen on TRAIN only (`fapc/weights/EXPERIMENTS.md`, "Exact planes on noiseless
    clouds"): the held-out shapes noiseless."""

    pair_k: int = 20  # planes through the query and two of its pair_k nearest points
    support_k: int = 48  # inliers counted among the query's support_k nearest (itself too)
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
    spacing_rank: int = 9  # the spacing: the distance to the query's 9th nearest point

    def __post_init__(self) -> None:
        if not 2 <= self.pair_k < self.support_k:
            raise ValueError(f"need 2 <= pair_k < support_k, got {self.pair_k}, {self.support_k}")
        if not self.spacing_rank < self.support_k:
            raise ValueError("spacing_rank must be below support_k")
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


def exact_planes(
    points: torch.Tensor,
    normals: torch.Tensor,
    *,
    query: torch.Tensor,
    support: torch.Tensor,
    resolution: float = 0.0,
    settings: ExactSettings = ExactSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's normal from the exact plane through it, where one holds its facet.

    Args:
        points: ``(N, 3)`` (float64 for the default ``tol``).
        normals: ``(Q, 3)`` the queries' current unit normals.
        query: ``(Q,)`` indices into ``points``.
        support: ``(Q, S)`` the queries' nearest points, nearest first, the query itself
            first (``S >= settings.support_k``).
        resolution: the coordinates' rounding, in their unit (:func:`coordinate_resolution`).

    Returns:
        ``normals (Q, 3)`` (the current one where no plane holds enough points; signs kept)
        and ``changed (Q,)`` bool.
    """
    s = settings
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {tuple(points.shape)}")
    if query.ndim != 1 or normals.shape != (len(query), 3):
        raise ValueError(f"query (Q,) and normals (Q, 3) expected, got {tuple(query.shape)} "
                         f"and {tuple(normals.shape)}")
    if support.ndim != 2 or len(support) != len(query) or support.shape[1] < s.support_k:
        raise ValueError(f"support must have shape (Q, >= {s.support_k}), got "
                         f"{tuple(support.shape)}")
    if resolution < 0:
        raise ValueError(f"resolution must be >= 0, got {resolution}")
    sup = support[:, :s.support_k].long()
    local = rows(points, sup) - points[query].unsqueeze(1)  # (Q, S, 3)
    spacing = local[:, s.spacing_rank].norm(dim=-1)  # (Q,)
    tol = (s.tol * spacing + resolution)[:, None, None]  # (Q, 1, 1)
    pairs = torch.tensor(list(itertools.combinations(range(1, s.pair_k + 1), 2)),
                         device=points.device)  # (P, 2)
    a, b = local[:, pairs[:, 0]], local[:, pairs[:, 1]]  # (Q, P, 3) each
    cross = torch.linalg.cross(a, b)  # (Q, P, 3)
    size = cross.norm(dim=-1)  # (Q, P)
    usable = size > s.min_sin * a.norm(dim=-1) * b.norm(dim=-1)
    plane = cross / size.clamp_min(torch.finfo(size.dtype).tiny).unsqueeze(-1)  # (Q, P, 3)
    dist = (plane @ local.transpose(1, 2)).abs()  # (Q, P, S)
    count = (dist < tol).sum(-1) * usable  # (Q, P)
    if resolution > 0:
        counts = count >= s.min_inliers_rounded
    else:
        tight = (dist < (s.tol_tight * spacing)[:, None, None]).sum(-1)  # (Q, P)
        counts = (count >= s.min_inliers) | (tight >= s.min_tight)
    best_count, best = torch.where(counts & usable, count, 0).max(1)  # (Q,)
    own = normals.to(local.dtype)
    own_count = ((local @ own.unsqueeze(2)).squeeze(2).abs() < tol[:, 0]).sum(1)  # (Q,)
    changed = (best_count > 0) & (best_count > own_count) & (spacing > 0)
    new = plane[torch.arange(len(query), device=points.device), best]  # (Q, 3)
    new = torch.where(((new * own).sum(1) < 0).unsqueeze(1), -new, new)
    return torch.where(changed.unsqueeze(1), new, own).to(normals.dtype), changed
