"""Plane vote: on a noiseless cloud, each normal re-fitted from the patch normals whose planes
hold its point.

A last pass of the neighbour consensus (:mod:`fapc.consensus`), after the snapping; by default
only on clouds whose noise figure reads noiseless and whose sampling has no scan lines (the
model's ``clean_vote``, :func:`fapc.near_scale.vote_for_figure`), or where asked for
(``estimate_normals(..., plane_vote=True)``, ``fapc normals --plane-vote``).

On noiseless data a point lies exactly on its face. Every candidate (a point of the query's
patch) whose tangent plane, through the candidate itself, passes within ``k x eps`` of the
query (``eps`` the consensus step's noise level, at its floor of ``0.01 x spacing`` on such
data) is a face the query lies on, so it votes; the query's normal becomes the top eigenvector
of the sum of ``n n^T`` over the voters and itself (unoriented: ``n`` and ``-n`` count
alike; the sign stays the query's). On a flat face this averages the network's small errors
down; at a crease only the query's own face holds it, so a normal that still leans toward the
other face comes back, and a point on the crease line itself, held by both, keeps a blend as
before. The pass runs only at queries with some candidate (or the query itself) whose spread
is below ``floor x spacing`` (:func:`vote_gate`): noisy clouds, scans included, keep every
spread above it and are left as they were.

A scan's lines are not faces: a neighbouring line's tilted plane can pass through the query
by chance, so the default leaves clouds with scan lines alone (on TRAIN's simulated line
scans it lost 0.24 deg; `fapc/weights/EXPERIMENTS.md`, "The plane vote on noiseless clouds").

Built from distances and unoriented normals only: a rotated, reflected, translated or
permuted cloud gives the same result, moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fapc.consensus import ConsensusSettings, check_inputs, noise_level
from fapc.eigen import sym3_eigh
from fapc.gather import rows


@dataclass(frozen=True)
class VoteSettings:
    """Chosen on TRAIN only (`fapc/weights/EXPERIMENTS.md`, "The plane vote on noiseless
    clouds"): the held-out shapes noiseless and the check shapes clean and dense."""

    floor: float = 0.015  # vote where the least spread < floor x spacing (noiseless data)
    k: float = 0.25  # a candidate votes where its plane passes within k x eps of the query

    def __post_init__(self) -> None:
        if self.floor <= 0 or self.k <= 0:
            raise ValueError(f"floor and k must be > 0, got {self.floor}, {self.k}")


def vote_gate(spreads: torch.Tensor, spacing: torch.Tensor, *, query: torch.Tensor,
              candidates: torch.Tensor, settings: VoteSettings = VoteSettings()
              ) -> torch.Tensor:
    """``(Q,)`` bool: where the vote runs, the least ``spreads (N,)`` among the query and its
    ``candidates (Q, C)`` below ``floor x spacing`` (``spacing (Q,)`` from
    :func:`fapc.consensus.noise_level`; never where it is 0, among duplicate points)."""
    least = torch.minimum(rows(spreads, candidates).min(1).values, spreads[query])  # (Q,)
    return (least < settings.floor * spacing) & (spacing > 0)


def plane_vote(
    points: torch.Tensor,
    normals: torch.Tensor,
    spreads: torch.Tensor,
    *,
    query: torch.Tensor,
    candidates: torch.Tensor,
    support: torch.Tensor,
    settings: VoteSettings = VoteSettings(),
    consensus: ConsensusSettings = ConsensusSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each gated query's normal from the candidates whose planes hold it.

    Args:
        points: ``(N, 3)``.
        normals: ``(N, 3)`` unit normals, read at ``query`` and ``candidates``.
        spreads: ``(N,)`` from :func:`fapc.consensus.spread`, read at ``query`` and
            ``candidates`` (the gate and the noise level).
        query: ``(Q,)`` indices.
        candidates: ``(Q, C)`` the query's patch points (the voters).
        support: ``(Q, S)`` the query's nearest points, nearest first
            (``S > consensus.spacing_rank``: the spacing).

    Returns:
        ``normals (Q, 3)`` (signs kept with the query's own; the own normal where the gate is
        shut) and ``voted (Q,)`` bool.
    """
    check_inputs(points, normals, query, candidates, support, consensus)
    own = normals[query]  # (Q, 3)
    eps, spacing = noise_level(points, spreads, query=query, candidates=candidates,
                               support=support, settings=consensus)  # (Q,) each
    voted = vote_gate(spreads, spacing, query=query, candidates=candidates, settings=settings)
    out = own.clone()
    at = voted.nonzero().squeeze(1)
    if len(at):
        q, cand, n0 = query[at], candidates[at], own[at]  # (M,), (M, C), (M, 3)
        nj = rows(normals, cand)  # (M, C, 3)
        dist = ((rows(points, cand) - points[q].unsqueeze(1)) * nj).sum(-1).abs()  # (M, C)
        w = ((dist < settings.k * eps[at, None]) & (cand != q[:, None])).to(nj.dtype)
        m = (nj * w[..., None]).transpose(1, 2) @ nj + n0.unsqueeze(2) * n0.unsqueeze(1)
        v = sym3_eigh(m)[1][..., 2]  # (M, 3) the top eigenvector
        out[at] = torch.where(((v * n0).sum(1) < 0).unsqueeze(1), -v, v)
    return out, voted
