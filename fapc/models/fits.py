"""Weighted fits of a patch, pure tensor maths used by :mod:`fapc.models.normal_net`: the
weighted PCA of a patch (one product of homogeneous points gives mean and covariance), the
points' distances to a fitted plane, and the normal of a weighted quadratic height field
(a jet), solved by an unrolled Cholesky factorisation that runs on any device and is
differentiable. Every function takes batched patches ``(B, K, 3)`` centred on the query."""

from __future__ import annotations

import torch

from fapc.eigen import sym3_eigh


def homogeneous(patches: torch.Tensor) -> torch.Tensor:
    """``(B, K, 3) -> (B, K, 4)``: each point with a 1 appended."""
    return torch.cat([patches, torch.ones_like(patches[..., :1])], -1)


def moment_fit(aug: torch.Tensor, weights: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted PCA of homogeneous points ``aug (B, K, 4)`` with ``weights (B, K)``:
    eigenvalues ``(B, 3)`` ascending, eigenvectors ``(B, 3, 3)`` of the weighted covariance,
    and the weighted mean ``(B, 1, 3)``.

    One product gives the weighted moments ``sum w [p 1]^T [p 1]`` (B, 4, 4), hence the mean
    and the covariance, in one pass over the points instead of three. Patches are centred
    on the query and of unit radius, so ``E[p p^T] - m m^T`` loses nothing that matters to
    the eigenvectors (their error is the rounding over the eigenvalue gap)."""
    mom = (aug * weights.unsqueeze(-1)).transpose(1, 2) @ aug  # (B, 4, 4)
    total = mom[:, 3:, 3:].clamp_min(1e-30)  # (B, 1, 1)
    mean = mom[:, 3:, :3] / total  # (B, 1, 3)
    cov = mom[:, :3, :3] / total - mean.transpose(1, 2) * mean  # (B, 3, 3)
    vals, vecs = sym3_eigh(cov)
    return vals, vecs, mean


def plane_residuals(aug: torch.Tensor, normal: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Signed distances ``(B, K)`` of homogeneous points ``aug (B, K, 4)`` to the planes
    through ``mean (B, 1, 3)`` with unit ``normal (B, 3)``."""
    offset = -(mean.squeeze(1) * normal).sum(-1, keepdim=True)  # (B, 1)
    return (aug @ torch.cat([normal, offset], -1).unsqueeze(-1)).squeeze(-1)


def spd_solve(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``m x = b`` for symmetric positive-definite ``m (B, n, n)``, ``b (B, n)`` by an
    unrolled Cholesky factorisation in plain torch (any device, differentiable)."""
    n = m.shape[-1]
    low: list[list[torch.Tensor | None]] = [[None] * n for _ in range(n)]
    for j in range(n):
        s = m[:, j, j] - sum((low[j][k] ** 2 for k in range(j)), torch.zeros_like(m[:, 0, 0]))
        low[j][j] = s.clamp_min(1e-12).sqrt()
        for i in range(j + 1, n):
            s = m[:, i, j] - sum((low[i][k] * low[j][k] for k in range(j)),
                                 torch.zeros_like(m[:, 0, 0]))
            low[i][j] = s / low[j][j]
    y: list[torch.Tensor] = []
    for i in range(n):  # L y = b
        s = b[:, i] - sum((low[i][k] * y[k] for k in range(i)), torch.zeros_like(b[:, 0]))
        y.append(s / low[i][i])
    x: list[torch.Tensor | None] = [None] * n
    for i in reversed(range(n)):  # L^T x = y
        s = y[i] - sum((low[k][i] * x[k] for k in range(i + 1, n)), torch.zeros_like(b[:, 0]))
        x[i] = s / low[i][i]
    return torch.stack(x, -1)  # type: ignore[arg-type]


def jet_normal(patches: torch.Tensor, weights: torch.Tensor, axes: torch.Tensor,
               *, ridge: float = 1e-3) -> torch.Tensor:
    """Normal at the query (the origin) of a weighted quadratic height field.

    ``patches (B, K, 3)``, ``weights (B, K)``, ``axes (B, 3, 3)`` (columns: height axis first,
    then two tangent axes, e.g. the eigenvectors of the weighted covariance). Fits
    ``h = c0 + c1 u + c2 v + c3 u^2 + c4 u v + c5 v^2`` by weighted least squares (a small
    ridge on the quadratic part: the Frobenius norm of its matrix, ``c3^2 + c4^2 / 2 + c5^2``)
    and returns the unit normal ``(B, 3)`` at ``u = v = 0``. A full quadratic is closed under
    rotations and reflections of ``(u, v)``, and so is that ridge, so the normal does not
    depend on how the tangent axes turn (they are arbitrary where the two tangent eigenvalues
    meet): it is as equivariant as the height axis.
    """
    local = patches @ axes  # (B, K, 3): h, u, v
    h, u, v = local.unbind(-1)
    cols = torch.stack([torch.ones_like(u), u, v, u * u, u * v, v * v, h], -1)  # (B, K, 7)
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    mom = (cols * w.unsqueeze(-1)).transpose(1, 2) @ cols  # (B, 7, 7): normal equations + rhs
    # (6,): 1e-6 on the affine terms, ridge on curvature; filled on the device by kernels
    # (an element assignment would copy from the host, which a CUDA graph cannot capture)
    reg = mom.new_full((6,), ridge)
    reg[:3].fill_(1e-6)
    reg[4:5].fill_(ridge / 2)
    m = mom[:, :6, :6] + torch.diag_embed(reg.expand(mom.shape[0], 6))
    c = spd_solve(m, mom[:, :6, 6])  # (B, 6)
    n_local = torch.stack([torch.ones_like(c[:, 0]), -c[:, 1], -c[:, 2]], -1)  # (h, u, v)
    n = (axes @ n_local.unsqueeze(-1)).squeeze(-1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
