"""Neighbour consensus: each normal looks at its patch's normals once more, and either snaps
onto a face at a crease (clean data) or smooths with them (heavy noise).

Both steps read a per-query noise level ``eps``: a low quantile, over the query's candidates
(its patch's points), of their ``spread``, the RMS distance of a point's nearest neighbours to
its tangent plane. Points on a face away from any edge give the noise floor; the quantile
ignores the few that straddle an edge. ``eps`` is compared with the point spacing (the
distance to the query's 9th nearest point), so both steps are scale-free.

**Snapping** (``eps < gamma x spacing``: clean or lightly noisy data). Any fit over a
neighbourhood that crosses a crease (the edge of a CAD part, the rim of a hole) returns a
blend of the two faces' normals, off both by tens of degrees; such points are few, but they
carry most of an RMSE on clean data. A point on a face has, among its neighbours, points
farther from the edge whose normals are right. So we try the candidates' normals as planes
through the query, score each by how many of the query's nearest points lie on it (a
Gaussian of the distance, in units of ``eps``), and take the best if it beats the query's own
normal by a margin. Only where the query's own spread is many times ``eps``: a blended normal
fits its neighbourhood badly, while on a smoothly curved or scanned surface every point bends
away from its tangent plane alike, and a neighbour's tilted plane that happens to fit a scan
line better must not win there. A normal whose candidates all straddle the edge too (near a
corner, on a thin or small feature) has nothing to snap to at first; so the snapping runs
again (``snap_passes`` in all), each pass with the normals and spreads the last one left:
once its neighbours have snapped, it can.

**Smoothing** (``eps`` above ``smooth_from x spacing``: heavy noise). Each patch's fit
carries its own share of the noise; the candidates' normals, spread over about four times
the near scale's area, average it down. The query's normal becomes the top eigenvector of
``(1 - t) n n^T + t mean_j n_j n_j^T`` (unoriented: ``n`` and ``-n`` count alike), with ``t``
rising from 0 to 1 as ``eps / spacing`` goes from ``smooth_from`` to ``smooth_full``.

Everything here is built from distances and normals (up to their sign), so a rotated,
reflected or translated cloud gives the same result, moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fapc.eigen import sym3_eigh
from fapc.gather import rows


@dataclass(frozen=True)
class ConsensusSettings:
    """Tuned on TRAIN shapes only (`fapc/weights/EXPERIMENTS.md`): the validation shapes under the
    PCPNet protocol, and sculpted and CAD shapes clean, dense and as simulated line scans."""

    quantile: float = 0.1  # eps: this quantile of the candidates' spread
    floor: float = 0.01  # eps >= floor x spacing: exactly flat faces stay well conditioned
    spacing_rank: int = 8  # spacing: distance to the query's (rank + 1)-th nearest point
    spread_k: int = 12  # nearest points (the point itself included) that measure a spread
    tau: float = 0.7  # snap: score kernel width, in units of eps
    margin: float = 0.2  # snap: the best candidate must score (1 + margin) x the own normal
    gamma: float = 0.1  # snap only where eps < gamma x spacing (clean or lightly noisy data)
    rho: float = 7.0  # snap only where the query's own spread > rho x eps (a blend, not a bend)
    smooth_from: float = 0.25  # smoothing starts where eps = smooth_from x spacing
    smooth_full: float = 0.35  # ... and is full from eps = smooth_full x spacing
    snap_passes: int = 3  # snapping passes; each after the first sees the last one's normals

    def __post_init__(self) -> None:
        if self.snap_passes < 1:
            raise ValueError(f"snap_passes must be >= 1, got {self.snap_passes}")


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
    rel = rows(points, near) - points[index].unsqueeze(1)  # (M, S, 3)
    dist = (rel * normals[index].unsqueeze(1)).sum(-1)  # (M, S)
    return dist.square().mean(-1).sqrt()


def noise_level(points: torch.Tensor, spreads: torch.Tensor, *, query: torch.Tensor,
                candidates: torch.Tensor, support: torch.Tensor,
                settings: ConsensusSettings = ConsensusSettings()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``eps (Q,)``, the noise level (a low quantile of the candidates' ``spreads``, at least
    ``floor x spacing``), and ``spacing (Q,)``, the distance to the query's
    ``(spacing_rank + 1)``-th nearest point (``support (Q, S)``, nearest first)."""
    s = settings
    spacing = (points[support[:, s.spacing_rank]] - points[query]).norm(dim=-1)  # (Q,)
    k = max(1, round(s.quantile * candidates.shape[1]))
    eps = rows(spreads, candidates).kthvalue(k, dim=1).values  # (Q,)
    return torch.maximum(eps, s.floor * spacing), spacing


def learned_gate(eps: torch.Tensor, spacing: torch.Tensor,
                 settings: ConsensusSettings = ConsensusSettings()) -> torch.Tensor:
    """``(Q,)`` bool: where the learned smoothing runs (noisy data: ``eps >= gamma x spacing``;
    never where the spacing is 0, as among duplicate points, whose features are undefined)."""
    return (eps >= settings.gamma * spacing) & (spacing > 0)


def check_inputs(points: torch.Tensor, normals: torch.Tensor, query: torch.Tensor,
                 candidates: torch.Tensor, support: torch.Tensor,
                 settings: ConsensusSettings = ConsensusSettings()) -> None:
    """Shapes of a consensus pass's inputs (this module's and :mod:`fapc.light`'s): ``points``
    and ``normals (N, 3)``, ``query (Q,)``, ``candidates (Q, C)``, ``support (Q, S)`` with
    ``S > spacing_rank``; a ``ValueError`` naming what is wrong otherwise."""
    if points.ndim != 2 or points.shape[1] != 3 or normals.shape != points.shape:
        raise ValueError(f"points and normals must both have shape (N, 3), got "
                         f"{tuple(points.shape)} and {tuple(normals.shape)}")
    if query.ndim != 1 or candidates.ndim != 2 or support.ndim != 2 \
            or len(candidates) != len(query) or len(support) != len(query):
        raise ValueError("query (Q,), candidates (Q, C) and support (Q, S) need one row per "
                         f"query, got {tuple(query.shape)}, {tuple(candidates.shape)} and "
                         f"{tuple(support.shape)}")
    if support.shape[1] <= settings.spacing_rank:
        raise ValueError(f"support needs more than {settings.spacing_rank} points per query")


def consensus_normals(
    points: torch.Tensor,
    normals: torch.Tensor,
    spreads: torch.Tensor,
    *,
    query: torch.Tensor,
    candidates: torch.Tensor,
    support: torch.Tensor,
    settings: ConsensusSettings = ConsensusSettings(),
    smoother: Any = None,
    n_near: int | None = None,
    smoother_arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    smooth: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Snap (clean data) or smooth (heavy noise) the normals of the ``query`` points.

    With a learned ``smoother`` (:class:`fapc.models.consensus_net.ConsensusNet`), every query
    whose noise level is at least ``gamma x spacing`` (where snapping does not apply) takes its
    normal instead of the fixed smoothing; ``n_near``: how many of the candidates (the first)
    are the near scale's (default: all but half); ``smoother_arrays``: ``points``,
    ``normals`` and ``spreads`` already in the smoother's dtype (its features are gathered from
    them; a caller that runs many batches makes them once). ``smooth=False``: snap only (the
    passes after the first, see :attr:`ConsensusSettings.snap_passes`).

    Args:
        points: ``(N, 3)``.
        normals: ``(N, 3)`` unit normals, read at ``query`` and ``candidates``.
        spreads: ``(N,)`` from :func:`spread`, read at ``query`` and ``candidates``.
        query: ``(Q,)`` indices.
        candidates: ``(Q, C)`` indices whose normals are tried or averaged (the patch's
            points).
        support: ``(Q, S)`` the query's nearest points, nearest first (``S > spacing_rank``);
            they score the snapping candidates.

    Returns:
        ``normals (Q, 3)`` (the query's own where neither step applies), ``snapped (Q,)``
        bool and the smoothing weight ``t (Q,)`` in [0, 1].
    """
    check_inputs(points, normals, query, candidates, support, settings)
    s = settings
    own = normals[query]  # (Q, 3)
    eps, spacing = noise_level(points, spreads, query=query, candidates=candidates,
                               support=support, settings=s)  # (Q,) each
    out = own.clone()
    # the gates first (cheap); the work only where a step applies (a few % of queries
    # snap on clean data; smoothing is all or nothing per cloud, mostly)
    snap_at = ((eps < s.gamma * spacing) & (spreads[query] > s.rho * eps)).nonzero().squeeze(1)
    snapped = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    if len(snap_at):
        out[snap_at], snapped[snap_at] = _snap(points, normals, own[snap_at], eps[snap_at],
                                               query[snap_at], candidates[snap_at],
                                               support[snap_at], s)
    if not smooth:
        return out, snapped, torch.zeros_like(eps)
    if smoother is not None:
        from fapc.models.consensus_net import net_inputs

        t = learned_gate(eps, spacing, s).to(points.dtype)  # (Q,) 1 where the learned step runs
        at = t.nonzero().squeeze(1)
        if len(at):
            src = smoother_arrays or (points, normals, spreads)
            inputs = net_inputs(*src, own=own[at], eps=eps[at],
                                spacing=spacing[at], query=query[at], candidates=candidates[at],
                                n_near=candidates.shape[1] // 2 if n_near is None else n_near,
                                dtype=next(smoother.parameters()).dtype,  # the weights' dtype
                                face_sin2=smoother.config.face_width)
            out[at] = smoother(*inputs).to(out.dtype)
        return out, snapped, t
    t = ((eps / spacing - s.smooth_from) / (s.smooth_full - s.smooth_from)).clamp(0, 1)
    smooth_at = (t > 0).nonzero().squeeze(1)
    if len(smooth_at):
        out[smooth_at] = _smooth(normals, own[smooth_at], t[smooth_at], candidates[smooth_at])
    return out, snapped, t


def _snap(points: torch.Tensor, normals: torch.Tensor, own: torch.Tensor, eps: torch.Tensor,
          query: torch.Tensor, candidates: torch.Tensor, support: torch.Tensor,
          s: ConsensusSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, 3)`` normals, ``(M,)`` snapped: the candidate plane through the query that
    the most support points lie on, where it beats the query's own by the margin."""
    rel = rows(points, support) - points[query].unsqueeze(1)  # (M, S, 3)
    cand = torch.cat([own.unsqueeze(1), rows(normals, candidates)], 1)  # (M, 1 + C, 3)
    r = rel @ cand.transpose(1, 2)  # (M, S, 1 + C): distances to each candidate plane
    width = (s.tau * eps).square().clamp_min(torch.finfo(r.dtype).tiny)[:, None, None]
    score = torch.exp(-0.5 * r.square() / width).sum(1)  # (M, 1 + C)
    best_score, best = score.max(1)
    take = best_score > (1 + s.margin) * score[:, 0]  # (M,)
    chosen = cand[torch.arange(len(cand), device=cand.device), best]  # (M, 3)
    return torch.where(take.unsqueeze(1), chosen, own), take


def _smooth(normals: torch.Tensor, own: torch.Tensor, t: torch.Tensor,
            candidates: torch.Tensor) -> torch.Tensor:
    """``(M, 3)``: top eigenvector of ``(1 - t) n n^T + t mean_j n_j n_j^T``."""
    nj = rows(normals, candidates)  # (M, C, 3)
    mean = nj.transpose(1, 2) @ nj / candidates.shape[1]  # (M, 3, 3)
    w = t[:, None, None]
    m = (1 - w) * own.unsqueeze(2) * own.unsqueeze(1) + w * mean
    return sym3_eigh(m)[1][..., 2]
