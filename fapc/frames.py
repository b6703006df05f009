"""Frame averaging (Puny et al., ICLR 2022): frames of point sets, pure torch.

A frame of a point set ``X`` is a set of group elements ``g = (R, t)`` built from ``X`` itself
so that transforming ``X`` transforms the set: ``F(Q X + b) = (Q, b) F(X)``. Here ``t`` is the
centroid (E(3), SE(3)), the origin (O(3), SO(3)) or a given centre (a query point for a local
patch), and the rotations are ``R = V diag(s)`` for the eigenvectors ``V = [v1 v2 v3]`` of the
covariance (ascending eigenvalues) and every sign vector ``s``: 8 elements for O(3)/E(3), the
4 with ``det R = +1`` for SO(3)/SE(3).

Conventions: points are rows; a frame maps world to local coordinates by
``local = (x - t) @ R`` and local vectors back by ``world = local @ R.T``.

Degenerate frames: when two eigenvalues are (near) equal the eigenvectors in their plane are
not determined by ``X``, and a small perturbation can turn the frame by a finite angle. The
averaged output is then only approximately invariant. :func:`frame_stability` measures it
(the smallest eigenvalue gap relative to the largest eigenvalue); see the README's "Frame
stability" section for what the normal model does about it and how much its output moves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fapc.eigen import sym3_eigh

GROUPS = ("O3", "SO3", "E3", "SE3")


def _check_group(group: str) -> str:
    g = group.upper().replace("(", "").replace(")", "")
    if g not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    return g


def has_reflections(group: str) -> bool:
    return _check_group(group) in ("O3", "E3")


def has_translations(group: str) -> bool:
    return _check_group(group) in ("E3", "SE3")


def sign_flips(group: str, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The sign vectors ``s`` of the frame: ``(8, 3)`` with reflections, else the ``(4, 3)``
    with product +1 (so ``det(V diag(s)) = det V = +1``)."""
    return _sign_flips(_check_group(group), dtype, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _sign_flips(g: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cached per device: made once, never during a CUDA graph's capture (a host-to-device copy)
    rows = [[a, b, c] for a in (1, -1) for b in (1, -1) for c in (1, -1)]
    if g in ("SO3", "SE3"):
        rows = [r for r in rows if r[0] * r[1] * r[2] > 0]
    return torch.tensor(rows, dtype=dtype, device=device)


@dataclass
class Frames:
    """The frame of each of ``B`` point sets.

    Attributes:
        rotations: ``(B, F, 3, 3)``; columns are the frame axes.
        translation: ``(B, 3)``.
        eigenvalues: ``(B, 3)`` ascending (of the covariance, divided by the point count).
        stability: ``(B,)`` in [0, 1]; near 0 where eigenvalues (nearly) coincide.
    """

    rotations: torch.Tensor
    translation: torch.Tensor
    eigenvalues: torch.Tensor
    stability: torch.Tensor

    @property
    def size(self) -> int:
        return self.rotations.shape[1]


def _weights(points: torch.Tensor, mask: torch.Tensor | None,
             weights: torch.Tensor | None) -> torch.Tensor | None:
    """Combined ``(B, N)`` weights, or ``None`` when every point counts once."""
    if mask is None and weights is None:
        return None
    w = torch.ones(points.shape[:-1], dtype=points.dtype, device=points.device)
    if mask is not None:
        if mask.shape != points.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(points.shape[:-1])}, got {tuple(mask.shape)}")
        w = w * mask.to(points.dtype)
    if weights is not None:
        if weights.shape != points.shape[:-1]:
            raise ValueError(f"weights must have shape {tuple(points.shape[:-1])}, "
                             f"got {tuple(weights.shape)}")
        w = w * weights
    return w


def centroid(points: torch.Tensor, *, mask: torch.Tensor | None = None,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """``points (B, N, 3)`` -> (weighted, masked) centroid ``(B, 3)``."""
    w = _weights(points, mask, weights)  # (B, N) or None
    if w is None:
        return points.mean(-2)
    return (points * w.unsqueeze(-1)).sum(-2) / w.sum(-1, keepdim=True).clamp_min(
        torch.finfo(points.dtype).tiny)


def covariance(points: torch.Tensor, center: torch.Tensor, *, mask: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """``points (B, N, 3)``, ``center (B, 3)`` -> ``(B, 3, 3)`` = sum w (x-c)(x-c)^T / sum w."""
    w = _weights(points, mask, weights)
    d = points - center.unsqueeze(-2)  # (B, N, 3)
    if w is None:
        return torch.einsum("bni,bnj->bij", d, d) / points.shape[-2]
    cov = torch.einsum("bni,bnj->bij", d * w.unsqueeze(-1), d)
    return cov / w.sum(-1).clamp_min(torch.finfo(points.dtype).tiny)[:, None, None]


def frame_stability(eigenvalues: torch.Tensor) -> torch.Tensor:
    """``(B, 3)`` ascending -> ``(B,)``: ``min(l2 - l1, l3 - l2) / l3`` (0 when degenerate)."""
    gap = torch.minimum(eigenvalues[..., 1] - eigenvalues[..., 0],
                        eigenvalues[..., 2] - eigenvalues[..., 1])
    top = eigenvalues[..., 2].abs().clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    return (gap / top).clamp(0, 1)


def compute_frames(
    points: torch.Tensor,
    *,
    group: str = "E3",
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
) -> Frames:
    """The frames of ``points (B, N, 3)`` (``mask (B, N)`` for ragged sets).

    Args:
        group: ``O3``/``SO3`` (about the origin or ``center``), ``E3``/``SE3`` (about the
            centroid, or ``center`` when given).
        weights: optional ``(B, N)`` non-negative weights for the covariance.
        center: ``(B, 3)`` fixed translation (e.g. the query point of a local patch).
    """
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
    g = _check_group(group)
    if center is None:
        center = (centroid(points, mask=mask, weights=weights) if g in ("E3", "SE3")
                  else torch.zeros(points.shape[0], 3, dtype=points.dtype, device=points.device))
    elif center.shape != (points.shape[0], 3):
        raise ValueError(f"center must have shape ({points.shape[0]}, 3), got {tuple(center.shape)}")
    cov = covariance(points, center, mask=mask, weights=weights)  # (B, 3, 3)
    vals, vecs = sym3_eigh(cov)  # (B, 3), (B, 3, 3) with det +1
    signs = sign_flips(g, dtype=points.dtype, device=points.device)  # (F, 3)
    rot = vecs.unsqueeze(1) * signs[None, :, None, :]  # (B, F, 3, 3): column j times s_j
    return Frames(rot, center, vals, frame_stability(vals))


def local_frames(patches: torch.Tensor, *, group: str = "SO3",
                 center: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> Frames:
    """Frames of local neighbourhoods ``patches (M, K, 3)``; ``center (M, 3)`` defaults to the
    patch centroid (E3/SE3) or the origin of the patch coordinates (O3/SO3: pass patches
    already centred on their query point)."""
    return compute_frames(patches, group=group, center=center, weights=weights)


def to_frames(points: torch.Tensor, frames: Frames) -> torch.Tensor:
    """``points (B, N, 3)`` -> local coordinates in every frame element ``(B, F, N, 3)``."""
    return (points - frames.translation.unsqueeze(-2)).unsqueeze(1) @ frames.rotations


def vectors_to_world(local: torch.Tensor, frames: Frames) -> torch.Tensor:
    """Local vectors ``(B, F, ..., 3)`` -> world ``(B, F, ..., 3)`` (``v @ R^T``)."""
    b, f = local.shape[:2]
    rot = frames.rotations  # (B, F, 3, 3)
    flat = local.reshape(b, f, -1, 3)  # (B, F, P, 3)
    return (flat @ rot.transpose(-1, -2)).reshape(local.shape)
