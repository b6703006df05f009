"""Light smoothing: under light noise, each normal refitted from its nearest points' normals.

Optional (``fapc normals --light-smoothing``, ``estimate_normals(..., light_smoothing=True)``),
a last pass of the neighbour consensus (:mod:`fapc.consensus`). Under light noise (0.03-0.25 %
of the diagonal, as most scanners give) the network reads noise as detail: on a torus and an
ellipsoid with exact normals at 0.03-0.125 % its normals were off by 1.8-2.1 deg where PCA
over 128 points is at 0.8-1.3, and below ``gamma x spacing`` the consensus step only snaps,
so nothing averages that noise.

Where the consensus step's noise level ``eps`` lies between ``light_from x spacing`` and
``gamma x spacing`` (:func:`light_gate`), each normal ``n`` is refitted from its ``S`` nearest
points' normals ``n_j``, each turned to agree with ``n`` and weighted by a narrow kernel of the
angle between them, ``exp(-sin^2 / width^2)`` (about 9 deg: the other face of a crease, or a
facet tilted further, hardly counts). The fit is linear over ``n``'s tangent plane,
``n_j ~ a + b u_j + c v_j`` (weighted least squares, a small ridge on ``b`` and ``c``), and the
new normal is its value at the point, ``a / |a|``: unlike a plain average of the neighbours'
normals it does not lean toward the side with more points on a curved surface. A noiseless
cloud's ``eps`` sits at its floor (``0.01 x spacing``), below ``light_from``, and is left
alone.

It rounds detail at the scale of the point spacing, which light noise cannot be told from:
on PCPNet's noiseless armadillo, whose sculpted detail is that fine, it cost 0.75 deg
(`fapc/weights/EXPERIMENTS.md`, "Light smoothing"), so it is not on by default.

Built from distances and unoriented normals only: a rotated, reflected, translated or
permuted cloud gives the same result, moved. The fit is invariant to the choice of tangent
axes (a linear regression is, under any invertible map of its regressors, and the ridge is
isotropic in the plane).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fapc.consensus import ConsensusSettings, check_inputs, noise_level
from fapc.gather import rows
from fapc.models.fits import spd_solve


@dataclass(frozen=True)
class LightSettings:
    """Chosen on TRAIN only (`fapc/weights/EXPERIMENTS.md`, "Light smoothing"): suite C of
    ``python -m fapc.validate`` against the held-out shapes at 0.03-0.125 % noise."""

    light_from: float = 0.012  # eps > light_from x spacing: just above the noise level's floor
    width: float = 0.15  # angle kernel, in units of sin(angle): about 9 deg
    ridge: float = 1e-3  # on the slopes, relative to the weights' sum: collinear neighbours

    def __post_init__(self) -> None:
        if not 0 < self.light_from < ConsensusSettings.gamma:
            raise ValueError(f"light_from must lie in (0, {ConsensusSettings.gamma}), "
                             f"got {self.light_from}")
        if self.width <= 0 or self.ridge <= 0:
            raise ValueError(f"width and ridge must be > 0, got {self.width}, {self.ridge}")


def light_gate(eps: torch.Tensor, spacing: torch.Tensor, *,
               settings: LightSettings = LightSettings(),
               consensus: ConsensusSettings = ConsensusSettings()) -> torch.Tensor:
    """``(Q,)`` bool: where the light smoothing runs, ``light_from x spacing < eps <
    gamma x spacing`` (``eps (Q,)``, ``spacing (Q,)`` from
    :func:`fapc.consensus.noise_level`)."""
    return (eps > settings.light_from * spacing) & (eps < consensus.gamma * spacing)


def light_smoothing(
    points: torch.Tensor,
    normals: torch.Tensor,
    spreads: torch.Tensor,
    *,
    query: torch.Tensor,
    candidates: torch.Tensor,
    support: torch.Tensor,
    settings: LightSettings = LightSettings(),
    consensus: ConsensusSettings = ConsensusSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refit each gated query's normal from its ``support`` points' normals.

    Args:
        points: ``(N, 3)``.
        normals: ``(N, 3)`` unit normals, read at ``query`` and ``support``.
        spreads: ``(N,)`` from :func:`fapc.consensus.spread`, read at ``candidates`` (they
            give the noise level).
        query: ``(Q,)`` indices.
        candidates: ``(Q, C)`` the query's patch points.
        support: ``(Q, S)`` the query's nearest points, nearest first
            (``S > consensus.spacing_rank``): the normals it is refitted from.

    Returns:
        ``normals (Q, 3)`` (the query's own where the gate is closed) and ``smoothed (Q,)``
        bool.
    """
    check_inputs(points, normals, query, candidates, support, consensus)
    eps, spacing = noise_level(points, spreads, query=query, candidates=candidates,
                               support=support, settings=consensus)  # (Q,) each
    out = normals[query].clone()  # (Q, 3)
    gate = light_gate(eps, spacing, settings=settings, consensus=consensus)
    at = gate.nonzero().squeeze(1)
    if len(at):
        out[at] = linear_refit(points, normals, query[at], support[at], settings=settings)
    return out, gate


def tangent_axes(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors ``(M, 3)`` each, orthogonal to the unit ``n (M, 3)`` and to each
    other."""
    axis = torch.zeros_like(n)
    use_x = n[:, 0].abs() < 0.9
    axis[:, 0] = use_x.to(n.dtype)
    axis[:, 1] = (~use_x).to(n.dtype)
    b1 = axis - (axis * n).sum(-1, keepdim=True) * n
    b1 = b1 / b1.norm(dim=-1, keepdim=True)
    return b1, torch.linalg.cross(n, b1)


def linear_refit(points: torch.Tensor, normals: torch.Tensor, query: torch.Tensor,
                 support: torch.Tensor, *, settings: LightSettings = LightSettings()
                 ) -> torch.Tensor:
    """``(M, 3)``: the value at each ``query (M,)`` point of the weighted linear fit
    ``n_j ~ a + b u_j + c v_j`` of its ``support (M, S)`` points' normals (signs turned to
    the query's) over its tangent plane, normalised; the query's own normal where the fit
    has no direction."""
    own = normals[query]  # (M, 3)
    nj = rows(normals, support)  # (M, S, 3)
    cos = (nj * own.unsqueeze(1)).sum(-1)  # (M, S)
    w = torch.exp(-(1 - cos.square()).clamp_min(0) / settings.width ** 2)  # (M, S)
    nj = torch.where(cos.unsqueeze(-1) < 0, -nj, nj)
    rel = rows(points, support) - points[query].unsqueeze(1)  # (M, S, 3)
    b1, b2 = tangent_axes(own)
    uv = torch.stack([(rel * b1.unsqueeze(1)).sum(-1), (rel * b2.unsqueeze(1)).sum(-1)], -1)
    scale = uv.square().sum(-1).mean(-1).sqrt().clamp_min(torch.finfo(uv.dtype).tiny)  # (M,)
    x = torch.cat([torch.ones_like(uv[..., :1]), uv / scale[:, None, None]], -1)  # (M, S, 3)
    xw = x * w.unsqueeze(-1)
    a = xw.transpose(1, 2) @ x  # (M, 3, 3): the normal equations, symmetric positive definite
    ridge = settings.ridge * w.sum(-1)  # (M,) the query's own weight is 1, so > 0
    a = a + torch.diag_embed(torch.stack([torch.zeros_like(ridge), ridge, ridge], -1))
    rhs = xw.transpose(1, 2) @ nj  # (M, 3, 3): rows the regressors, columns x y z
    # the intercept is the first row of a^-1 rhs, and (a symmetric) that row is a^-1 e0
    e0 = torch.zeros_like(a[:, 0])
    e0[:, 0] = 1
    first = spd_solve(a, e0)  # (M, 3)
    fit = (first.unsqueeze(-1) * rhs).sum(1)  # (M, 3)
    length = fit.norm(dim=-1, keepdim=True)
    return torch.where(length > 0, fit / length.clamp_min(torch.finfo(fit.dtype).tiny), own)
