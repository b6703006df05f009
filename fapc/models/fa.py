"""``FrameAveraging``: turns any point backbone into an exactly E(3)/O(3)/SE(3)/SO(3)
invariant or equivariant network by averaging over the frame of each input.

``<phi>(X) = mean_g  g . phi(g^-1 . X)`` over the frame elements ``g`` of ``X``.

Outputs:
  - ``invariant``: the backbone's output as is (scalars per set or per point).
  - ``equivariant``: the backbone's last dimension is a local 3-vector, rotated back to the
    world frame before averaging.
  - ``axis``: an unoriented direction (a normal): the per-frame vectors are normalised and
    averaged as ``n n^T`` (``n`` and ``-n`` count the same, so nothing cancels); the result is
    the top eigenvector of the mean, and its eigenvalue (in [1/3, 1]) measures how well the
    frame elements agree.
"""

from __future__ import annotations

import torch
from torch import nn

from fapc.eigen import sym3_eigh
from fapc.frames import Frames, compute_frames, to_frames, vectors_to_world

OUTPUTS = ("invariant", "equivariant", "axis")


def average_axes(vectors: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Unoriented average of ``vectors (..., F, ..., 3)`` over ``dim``.

    Returns the unit top eigenvector of ``mean(n n^T)`` ``(..., 3)`` and its eigenvalue
    (agreement: 1 when all frame outputs are parallel, 1/3 for an isotropic spread).
    """
    n = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    outer = (n.unsqueeze(-1) * n.unsqueeze(-2)).mean(dim=dim)  # (..., 3, 3)
    vals, vecs = sym3_eigh(outer)
    return vecs[..., 2], vals[..., 2]


class FrameAveraging(nn.Module):
    """Frame-averaged wrapper of ``backbone``.

    Args:
        backbone: maps ``(B', N, 3)`` (and an optional ``mask (B', N)``) to ``(B', *S)``;
            for ``equivariant``/``axis`` outputs the last dimension of ``S`` is 3.
        group: ``O3``, ``SO3``, ``E3`` or ``SE3``.
        output: ``invariant``, ``equivariant`` or ``axis``.
        stochastic: in training mode, use one random frame element per set (cheaper);
            evaluation mode always averages over all elements.
    """

    def __init__(self, backbone: nn.Module, *, group: str = "E3", output: str = "invariant",
                 stochastic: bool = False) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.backbone = backbone
        self.group = group
        self.output = output
        self.stochastic = stochastic
        self.last_agreement: torch.Tensor | None = None

    def per_frame(self, points: torch.Tensor, *, mask: torch.Tensor | None = None,
                  center: torch.Tensor | None = None) -> tuple[torch.Tensor, Frames]:
        """Backbone outputs in every frame element: ``(B, F, *S)`` (in world coordinates for
        vector outputs) and the frames."""
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
        b, n, _ = points.shape
        frames = compute_frames(points, group=self.group, mask=mask, center=center)
        if self.training and self.stochastic:
            pick = torch.randint(frames.size, (b,), device=points.device)
            frames = Frames(frames.rotations[torch.arange(b), pick].unsqueeze(1),
                            frames.translation, frames.eigenvalues, frames.stability)
        f = frames.size
        local = to_frames(points, frames).reshape(b * f, n, 3)  # (B*F, N, 3)
        m = None if mask is None else mask.unsqueeze(1).expand(b, f, n).reshape(b * f, n)
        out = self.backbone(local, m) if m is not None else self.backbone(local)
        out = out.reshape(b, f, *out.shape[1:])  # (B, F, *S)
        if self.output != "invariant":
            out = vectors_to_world(out, frames)
        return out, frames

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None,
                center: torch.Tensor | None = None) -> torch.Tensor:
        """``points (B, N, 3)`` -> ``(B, *S)`` averaged over the frame (``axis``: unit
        vectors; their agreement is kept in ``self.last_agreement``)."""
        out, _ = self.per_frame(points, mask=mask, center=center)
        if self.output == "axis":
            axis, agreement = average_axes(out, dim=1)
            self.last_agreement = agreement
            return axis
        return out.mean(dim=1)
