"""Crease snapping: put a normal that straddles a sharp edge back onto one face.

Any fit over a neighbourhood that crosses a crease (the edge of a CAD part, the rim of a
hole) returns a blend of the two faces' normals, off both by tens of degrees; such points
are few, but they carry most of an RMSE on clean data. A point on a face has, among its
neighbours, points farther from the edge whose normals are right. So for each query we try
the normals of its candidates (its own and its patch's neighbours') as planes through the
query, score each by how many of the query's nearest points lie on it (a Gaussian of the
distance, in units of the local noise level), and take the best if it beats the query's own
normal by a margin.

The noise level ``eps`` of a query is a low quantile, over its candidates, of their
``spread``: the RMS distance of a point's nearest neighbours to its tangent plane. Points on
a face away from the edge give the noise floor; the quantile ignores the blended ones. A
query snaps only where that level is small against the point spacing (clean or lightly noisy
data): under heavy noise the scores cannot tell faces apart, and the normal is left alone.
It also snaps only where its own spread is many times that level: a blended normal fits its
neighbourhood badly, while on a smoothly curved or scanned surface every point bends away from
its tangent plane alike, and a neighbour's tilted plane that happens to fit a scan line
better must not win there.

Everything here is built from distances and normals (up to their sign), so a rotated,
reflected or translated cloud snaps the same points to the same (moved) normals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SnapSettings:
    """Tuned on TRAIN shapes only (see the model card): the validation shapes under the
    PCPNet protocol, and sculpted and CAD shapes clean, dense and as simulated line scans."""

    tau: float = 0.7  # score kernel width, in units of the noise level eps
    margin: float = 0.2  # the best candidate must score (1 + margin) x the query's own normal
    quantile: float = 0.1  # eps: this quantile of the candidates' spread
    gamma: float = 0.1  # snap only where eps < gamma x spacing (clean or lightly noisy data)
    floor: float = 0.01  # eps >= floor x spacing: exactly flat faces stay well conditioned
    spacing_rank: int = 8  # spacing: distance to the query's (rank + 1)-th nearest point
    spread_k: int = 12  # nearest points (the point itself included) that measure its spread
    rho: float = 7.0  # snap only where the query's own spread > rho x eps (a blend, not a bend)


def spread(points: torch.Tensor, normals: torch.Tensor, index: torch.Tensor,
           near: torch.Tensor) -> torch.Tensor:
    """RMS distance of each point's nearest neighbours to its tangent plane.

    Args:
        points: ``(N, 3)``.
        normals: ``(N, 3)`` unit normals (only the rows in ``index`` are read).
        index: ``(M,)`` the points to measure.
        near: ``(M, S)`` indices of their nearest neighbours.

    Returns:
        ``(M,)``.
    """
    rel = points[near] - points[index].unsqueeze(1)  # (M, S, 3)
    dist = (rel * normals[index].unsqueeze(1)).sum(-1)  # (M, S)
    return dist.square().mean(-1).sqrt()


def snap_normals(
    points: torch.Tensor,
    normals: torch.Tensor,
    spreads: torch.Tensor,
    *,
    query: torch.Tensor,
    candidates: torch.Tensor,
    support: torch.Tensor,
    settings: SnapSettings = SnapSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap the normals of ``query`` points that straddle a crease onto one face.

    Args:
        points: ``(N, 3)``.
        normals: ``(N, 3)`` unit normals, read at ``query`` and ``candidates``.
        spreads: ``(N,)`` from :func:`spread`, read at ``candidates``.
        query: ``(Q,)`` indices.
        candidates: ``(Q, C)`` indices whose normals are tried (e.g. the patch's points).
        support: ``(Q, S)`` the query's nearest points, nearest first (``S > spacing_rank``);
            they score the candidates.

    Returns:
        ``normals (Q, 3)`` (the query's own where not snapped) and ``snapped (Q,)`` bool.
    """
    if points.ndim != 2 or points.shape[1] != 3 or normals.shape != points.shape:
        raise ValueError(f"points and normals must both have shape (N, 3), got "
                         f"{tuple(points.shape)} and {tuple(normals.shape)}")
    if candidates.ndim != 2 or support.ndim != 2 or len(candidates) != len(query) \
            or len(support) != len(query):
        raise ValueError("candidates (Q, C) and support (Q, S) need one row per query")
    s = settings
    if support.shape[1] <= s.spacing_rank:
        raise ValueError(f"support needs more than {s.spacing_rank} points per query")
    own = normals[query]  # (Q, 3)
    spacing = (points[support[:, s.spacing_rank]] - points[query]).norm(dim=-1)  # (Q,)
    k = max(1, round(s.quantile * candidates.shape[1]))
    eps = spreads[candidates].kthvalue(k, dim=1).values  # (Q,) noise level
    eps = torch.maximum(eps, s.floor * spacing)
    # the gates first (cheap); the scores only where a query may snap (a few % of them)
    maybe = ((eps < s.gamma * spacing) & (spreads[query] > s.rho * eps)).nonzero().squeeze(1)
    snapped = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    out = own.clone()
    if len(maybe) == 0:
        return out, snapped
    q, sup = query[maybe], support[maybe]  # (M,), (M, S)
    rel = points[sup] - points[q].unsqueeze(1)  # (M, S, 3)
    cand = torch.cat([own[maybe].unsqueeze(1), normals[candidates[maybe]]], 1)  # (M, 1 + C, 3)
    r = rel @ cand.transpose(1, 2)  # (M, S, 1 + C): distances to each candidate plane
    width = (s.tau * eps[maybe]).square().clamp_min(torch.finfo(r.dtype).tiny)[:, None, None]
    score = torch.exp(-0.5 * r.square() / width).sum(1)  # (M, 1 + C)
    best_score, best = score.max(1)
    take = best_score > (1 + s.margin) * score[:, 0]  # (M,)
    snapped[maybe] = take
    chosen = cand[torch.arange(len(cand), device=cand.device), best]  # (M, 3)
    out[maybe] = torch.where(take.unsqueeze(1), chosen, own[maybe])
    return out, snapped
