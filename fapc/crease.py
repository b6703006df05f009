"""Face choice at creases under light noise: an optional last post-network step
(``estimate_normals(..., crease=True)``, ``fapc normals --crease``).

Under light noise (about 0.1-0.3 point spacings) a point a few noise widths from a crease
often carries the other face's normal, and so do its neighbours on its own face: the wrong
normals come in a band along the crease, so no test built on the neighbours' normals can
correct them. Positions can. Over the query's ``k`` nearest points, every point's own
plane (a PCA fit to its ``plane_k`` nearest) is a hypothesis; where no single plane holds
most of them within ``inlier x sigma`` but two planes at least ``apart`` degrees from each
other hold nearly all, the neighbourhood is a crease. Each face is refitted to the points
only it holds, and the query takes the face it lies on when it lies well off the other
(``off x sigma``). Nearer the crease than that the choice is left to the network and the
consensus step, whose blend is about as good as the data allows there.

``sigma`` is one figure per cloud: a low quantile of every point's RMS distance to its own
plane, which face interiors set, over a calibration factor measured on TRAIN shapes (the
residual of a ``plane_k``-point fit is biased low). That residual stops growing with the
noise once the noise nears the spacing (the nearest points are then those displaced alike),
so the step runs only on clouds whose residual is below ``gate_hi`` spacings, and not on
noiseless ones (below ``gate_lo``), where the consensus step's snapping does this job.

Everything is built from distances and planes, so the step moves with the cloud under
rotations, reflections, translations and permutations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fapc.eigen import sym3_eigh
from fapc.gather import rows
from fapc.models.fits import homogeneous, moment_fit, spd_solve
from fapc.pca import patch_covariance


@dataclass(frozen=True)
class CreaseSettings:
    """Chosen on TRAIN shapes only (`fapc/weights/EXPERIMENTS.md`)."""

    k: int = 48  # support: the query's nearest points, itself first
    pre_k: int = 32  # a cheaper first look over this many, whose best plane must hold <= pre
    pre: float = 0.9
    plane_k: int = 10  # each point's own plane: a PCA fit to its plane_k nearest
    inlier: float = 2.0  # a point lies on a plane within inlier x sigma
    one: float = 0.8  # a crease: no single plane holds more than this share of the support
    two: float = 0.9  # ... and two planes together hold at least this share
    apart: float = 20.0  # degrees between the two planes, at least
    off: float = 3.0  # the query must lie more than off x sigma from the other face
    min_face: int = 6  # points each face needs to itself
    top: int = 8  # pairs searched: each of the best `top` single planes with every plane
    smooth: float = 1.5  # no crease where a quadric height field fits within smooth x sigma
    quantile: float = 0.25  # sigma: this quantile of the points' plane residuals ...
    calib: float = 0.62  # ... over this factor
    gate_lo: float = 0.01  # run where that quantile is at least gate_lo x spacing ...
    gate_hi: float = 0.17  # ... and below gate_hi x spacing
    spacing_rank: int = 8  # spacing: distance to the (rank + 1)-th nearest point

    def __post_init__(self) -> None:
        if not (self.plane_k >= 3 and self.k >= self.pre_k > self.spacing_rank):
            raise ValueError("need plane_k >= 3 and k >= pre_k > spacing_rank")


def local_planes(points: torch.Tensor, near: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each point's own plane, a PCA fit to its nearest points.

    Args:
        points: ``(N, 3)``.
        near: ``(M, P)`` indices of the ``P`` nearest points of ``M`` points (themselves
            included).

    Returns:
        ``centres (M, 3)``, unit ``normals (M, 3)`` and ``residual (M,)``, the RMS distance of
        the ``P`` points to their plane.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {tuple(points.shape)}")
    if near.ndim != 2 or near.shape[1] < 3:
        raise ValueError(f"near must have shape (M, P >= 3), got {tuple(near.shape)}")
    nb = rows(points, near)  # (M, P, 3)
    w, v = sym3_eigh(patch_covariance(nb))  # (M, 3), (M, 3, 3)
    return nb.mean(1), v[..., 0], w[:, 0].clamp_min(0).sqrt()


def residual_scale(residual: torch.Tensor, spacing: torch.Tensor,
                   settings: CreaseSettings = CreaseSettings()) -> tuple[float, float]:
    """``(r, h)``: the ``quantile`` of the points' plane residuals and their median spacing.

    Args:
        residual: ``(N,)`` the points' :func:`local_planes` residuals.
        spacing: ``(N,)`` their distances to their ``(spacing_rank + 1)``-th nearest points.
    """
    if residual.shape != spacing.shape or residual.ndim != 1 or not len(residual):
        raise ValueError("residual and spacing must both have shape (N,), N >= 1")
    k = min(len(residual), max(1, round(settings.quantile * len(residual))))
    r = residual.double().kthvalue(k).values.item()  # (torch.quantile refuses > 16 M values)
    return r, spacing.double().median().item()


def cloud_sigma(residual: torch.Tensor, spacing: torch.Tensor,
                settings: CreaseSettings = CreaseSettings()) -> float | None:
    """The cloud's noise figure for the step, or None where the gate is closed.

    Args:
        residual: ``(N,)`` every point's :func:`local_planes` residual.
        spacing: ``(N,)`` every point's distance to its ``(spacing_rank + 1)``-th nearest.
    """
    s = settings
    r, h = residual_scale(residual, spacing, s)
    if not (h > 0 and s.gate_lo * h <= r < s.gate_hi * h):
        return None
    return r / s.calib


def _inliers(points: torch.Tensor, centres: torch.Tensor, normals: torch.Tensor,
             support: torch.Tensor, band: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``inl (Q, K, K)``: support point ``j`` lies within ``band`` of support point ``i``'s
    plane; and the support's positions ``(Q, K, 3)``."""
    pos = rows(points, support)  # (Q, K, 3)
    n = rows(normals, support)  # (Q, K, 3)
    off = (n * rows(centres, support)).sum(-1)  # (Q, K)
    dist = (n @ pos.transpose(1, 2) - off.unsqueeze(2)).abs()  # (Q, K plane, K point)
    return dist < band, pos


def quadric_residual(pos: torch.Tensor) -> torch.Tensor:
    """``(Q,)``: the RMS residual of a least-squares quadric height field over each row of
    ``pos (Q, K, 3)``, heights along the smallest principal axis of the points (a sharp edge
    fits it badly; a smoothly curved patch fits it to the noise)."""
    return quadric_heights(pos)[0].square().mean(1).sqrt()


def quadric_heights(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares quadric height field over each row of ``pos (Q, K, 3)``, heights
    along the smallest principal axis of the points: each point's residual ``(Q, K)`` (fit
    minus height) and its coordinates over the tangent plane ``(Q, K, 2)`` (in units of the
    row's RMS radius)."""
    rel = pos - pos.mean(1, keepdim=True)  # (Q, K, 3)
    axes = sym3_eigh(patch_covariance(pos))[1]  # (Q, 3, 3) ascending: height first
    loc = rel @ axes  # (Q, K, 3): (w, u, v) in the principal frame
    w, u, v = loc.unbind(-1)
    scale = (u.square() + v.square()).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
    u, v = u / scale, v / scale
    basis = torch.stack([u * u, u * v, v * v, u, v, torch.ones_like(u)], -1)  # (Q, K, 6)
    gram = basis.transpose(1, 2) @ basis  # (Q, 6, 6)
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).sum(1)  # (Q,) keeps collinear points solvable
    gram = gram + ridge[:, None, None] * torch.eye(6, dtype=gram.dtype, device=gram.device)
    coef = spd_solve(gram, (basis.transpose(1, 2) @ w.unsqueeze(2)).squeeze(2))  # (Q, 6)
    return (basis @ coef.unsqueeze(2)).squeeze(2).sub(w), torch.stack([u, v], -1)


def crease_candidates(points: torch.Tensor, centres: torch.Tensor, normals: torch.Tensor, *,
                      support: torch.Tensor, sigma: float,
                      settings: CreaseSettings = CreaseSettings()) -> torch.Tensor:
    """``(Q,)`` bool: the first look, where the best single plane over ``support (Q, k')``
    (nearest first) holds at most ``pre`` of it, so that the full test may apply. On a smooth
    surface the support's own least-squares plane holds nearly all of it, so that plane is
    tried first and the points' planes only where it fails (a few % of a smooth cloud)."""
    band = settings.inlier * sigma
    pos = rows(points, support)  # (Q, K', 3)
    ls = sym3_eigh(patch_covariance(pos))[1][..., 0]  # (Q, 3)
    dist = ((pos - pos.mean(1, keepdim=True)) * ls.unsqueeze(1)).sum(-1).abs()  # (Q, K')
    out = (dist < band).float().mean(1) <= settings.pre  # (Q,) the plane fails
    at = out.nonzero().squeeze(1)
    if len(at):
        inl, _ = _inliers(points, centres, normals, support[at], band)
        out[at] = inl.float().mean(2).amax(1) <= settings.pre
    return out


def crease_faces(points: torch.Tensor, own: torch.Tensor, centres: torch.Tensor,
                 normals: torch.Tensor, *, support: torch.Tensor, sigma: float,
                 settings: CreaseSettings = CreaseSettings()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The face each query lies on, where its neighbourhood is a crease (module docstring).

    Args:
        points: ``(N, 3)``.
        own: ``(Q, 3)`` the queries' normals so far.
        centres, normals: ``(N, 3)`` each point's own plane (:func:`local_planes`).
        support: ``(Q, K)`` each query's ``K`` nearest points, itself first.
        sigma: the cloud's noise figure (:func:`cloud_sigma`).

    Returns:
        ``normals (Q, 3)`` (the query's own where the step does not apply, signs turned to
        agree with it) and ``changed (Q,)`` bool.
    """
    if points.ndim != 2 or points.shape[1] != 3 or centres.shape != points.shape \
            or normals.shape != points.shape:
        raise ValueError("points, centres and normals must all have shape (N, 3)")
    if support.ndim != 2 or own.shape != (len(support), 3):
        raise ValueError(f"support (Q, K) and own (Q, 3) need one row per query, got "
                         f"{tuple(support.shape)} and {tuple(own.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    s = settings
    q, k = support.shape
    out = own.clone()
    changed = torch.zeros(q, dtype=torch.bool, device=own.device)
    if q == 0:
        return out, changed
    inl, pos = _inliers(points, centres, normals, support, s.inlier * sigma)  # (Q, K, K)
    share = inl.float().mean(2)  # (Q, K) each plane's share of the support
    at = (share.amax(1) <= s.one).nonzero().squeeze(1)
    if not len(at):
        return out, changed
    inl, pos, share, sup = inl[at], pos[at], share[at], support[at]
    g = len(at)
    m = min(s.top, k)
    top = share.topk(m, dim=1).indices  # (G, M)
    first = torch.gather(inl, 1, top.unsqueeze(2).expand(g, m, k))  # (G, M, K)
    cover = (first.unsqueeze(2) | inl.unsqueeze(1)).float().mean(-1)  # (G, M, K)
    n_sup = rows(normals, sup)  # (G, K, 3)
    n_top = torch.gather(n_sup, 1, top.unsqueeze(2).expand(g, m, 3))  # (G, M, 3)
    close = (n_top @ n_sup.transpose(1, 2)).abs() > math.cos(math.radians(s.apart))
    cover = cover.masked_fill(close, 0.0)
    best, flat = cover.reshape(g, -1).max(1)
    i = torch.gather(top, 1, (flat // k).unsqueeze(1)).squeeze(1)  # (G,)
    j = flat % k
    ar = torch.arange(g, device=own.device)
    a, b = inl[ar, i], inl[ar, j]  # (G, K) each
    face_a, face_b = a & ~b, b & ~a
    ok = (best >= s.two) & (face_a.sum(1) >= s.min_face) & (face_b.sum(1) >= s.min_face)
    ok &= quadric_residual(pos) > s.smooth * sigma  # a smoothly curved patch is no crease
    aug = homogeneous(pos - pos[:, :1])  # (G, K, 4) centred on the query (pos[:, 0])
    fits = []
    for face in (face_a, face_b):
        _, vecs, mean = moment_fit(aug, face.to(pos.dtype))  # the face's own points' plane
        nrm = vecs[..., 0]  # (G, 3)
        fits.append((nrm, (mean.squeeze(1) * nrm).sum(-1).abs() / sigma))  # query's distance
    (na, ra), (nb, rb) = fits
    take_a = ok & (ra < s.inlier) & (rb > s.off)
    take_b = ok & (rb < s.inlier) & (ra > s.off)
    new = torch.where(take_a.unsqueeze(1), na, nb).to(own.dtype)
    take = take_a | take_b
    new = torch.where(((new * own[at]).sum(-1, keepdim=True) < 0), -new, new)
    out[at] = torch.where(take.unsqueeze(1), new, own[at])
    changed[at] = take
    return out, changed
