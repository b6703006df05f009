"""Batched symmetric 3x3 eigen-decomposition in plain torch (cyclic Jacobi).

Why our own: torch's batched symmetric eigensolver (``eigh``) on CUDA failed with a cuSOLVER internal error on
an H200 (torch 2.11) and its MAGMA path ran 0.4 M matrices/s; elementwise Jacobi runs on any
device and dtype with no library call. Each matrix is scaled by its largest entry first, so
tiny or huge coordinates cost no accuracy; zero, rank-1, rank-2 and repeated-eigenvalue
matrices converge like any other (Jacobi needs no gap between eigenvalues).
"""

from __future__ import annotations

import torch

_PAIRS = ((0, 1), (0, 2), (1, 2))


def default_sweeps(dtype: torch.dtype) -> int:
    """Jacobi converges quadratically: 4 sweeps reach float32 round-off, 6 float64's."""
    return 6 if dtype == torch.float64 else 4


def sym3_eigh(
    mats: torch.Tensor, *, sweeps: int | None = None, chunk: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of symmetric 3x3 matrices.

    Args:
        mats: ``(..., 3, 3)`` symmetric, float32 or float64, any device. Only the upper
            triangle is read.
        sweeps: Jacobi sweeps (3 rotations each); default from :func:`default_sweeps`.
        chunk: matrices processed at a time (keeps the working set in cache on CPU).

    Returns:
        ``values (..., 3)`` ascending and ``vectors (..., 3, 3)`` with the eigenvector of
        ``values[..., j]`` in column ``j``; the columns form a right-handed rotation
        (``det == +1``).
    """
    if mats.shape[-2:] != (3, 3):
        raise ValueError(f"mats must have shape (..., 3, 3), got {tuple(mats.shape)}")
    if mats.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"mats must be float32 or float64, got {mats.dtype}")
    sweeps = default_sweeps(mats.dtype) if sweeps is None else sweeps
    if torch.is_grad_enabled() and mats.requires_grad:
        return _Sym3Eigh.apply(mats, sweeps, chunk)
    return _solve(mats, sweeps, chunk)


class _Sym3Eigh(torch.autograd.Function):
    """Analytic gradient: ``dA = V (diag(dw) + F o (V^T dV)) V^T`` with
    ``F_ij = 1 / (w_j - w_i)``, the gaps clamped away from 0 (degenerate pairs get a large
    but finite gradient instead of NaN)."""

    @staticmethod
    def forward(ctx, mats: torch.Tensor, sweeps: int, chunk: int):  # type: ignore[override]
        w, v = _solve(mats.detach(), sweeps, chunk)
        ctx.save_for_backward(w, v)
        return w, v

    @staticmethod
    def backward(ctx, gw: torch.Tensor | None, gv: torch.Tensor | None):  # type: ignore[override]
        w, v = ctx.saved_tensors
        inner = torch.zeros_like(v)
        if gv is not None:
            diff = w.unsqueeze(-2) - w.unsqueeze(-1)  # (..., i, j) = w_j - w_i
            scale = w.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(
                torch.finfo(w.dtype).tiny)
            rel, floor = (1e-6, 1e-30) if w.dtype == torch.float32 else (1e-12, 1e-200)
            eps = (scale * rel).clamp_min(floor)
            safe = torch.where(diff.abs() < eps, torch.where(diff < 0, -eps, eps), diff)
            f = 1.0 / safe
            f = f - torch.diag_embed(torch.diagonal(f, dim1=-2, dim2=-1))
            inner = f * (v.transpose(-1, -2) @ gv)
        if gw is not None:
            inner = inner + torch.diag_embed(gw)
        ga = v @ inner @ v.transpose(-1, -2)
        return 0.5 * (ga + ga.transpose(-1, -2)), None, None


def _solve(mats: torch.Tensor, sweeps: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = mats.shape[:-2]
    flat = mats.reshape(-1, 3, 3)
    n = flat.shape[0]
    if mats.device.type != "cpu":
        chunk = max(chunk, 1 << 22)
    vals_out = torch.empty(n, 3, dtype=mats.dtype, device=mats.device)
    vecs_out = torch.empty(n, 3, 3, dtype=mats.dtype, device=mats.device)
    for s in range(0, n, chunk):
        v, w = _jacobi(flat[s:s + chunk], sweeps)
        vals_out[s:s + chunk] = v
        vecs_out[s:s + chunk] = w
    return vals_out.reshape(*batch, 3), vecs_out.reshape(*batch, 3, 3)


def _jacobi(m: torch.Tensor, sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m: (M, 3, 3) -> values (M, 3) ascending, vectors (M, 3, 3) columns."""
    scale = m.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(m.dtype).tiny)  # (M,)
    a = [[None] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(i, 3):
            a[i][j] = m[:, i, j] / scale
            a[j][i] = a[i][j]
    one = torch.ones_like(scale)
    zero = torch.zeros_like(scale)
    v = [[one if i == j else zero for j in range(3)] for i in range(3)]  # v[row][col]
    tiny = torch.finfo(m.dtype).tiny
    big = torch.finfo(m.dtype).max ** 0.5 / 4
    for _ in range(sweeps):
        for p, q in _PAIRS:
            r = 3 - p - q
            apq = a[p][q]
            app, aqq = a[p][p], a[q][q]
            nz = apq.abs() > tiny
            apq_safe = torch.where(nz, apq, one)
            # clamped so theta^2 stays finite: autograd through sqrt(inf) would give NaN
            theta = ((aqq - app) / (2 * apq_safe)).clamp(-big, big)
            t = torch.sign(theta) / (theta.abs() + torch.sqrt(theta * theta + 1))
            t = torch.where(nz, torch.where(theta == 0, one, t), zero)
            c = torch.rsqrt(t * t + 1)
            s = t * c
            a[p][p] = app - t * apq
            a[q][q] = aqq + t * apq
            a[p][q] = a[q][p] = zero
            arp, arq = a[r][p], a[r][q]
            a[r][p] = a[p][r] = c * arp - s * arq
            a[r][q] = a[q][r] = s * arp + c * arq
            for k in range(3):
                vkp, vkq = v[k][p], v[k][q]
                v[k][p] = c * vkp - s * vkq
                v[k][q] = s * vkp + c * vkq
    vals = torch.stack([a[0][0], a[1][1], a[2][2]], dim=-1)  # (M, 3)
    vecs = torch.stack([torch.stack(row, dim=-1) for row in v], dim=-2)  # (M, 3, 3)
    vals, order = torch.sort(vals, dim=-1)
    vecs = torch.gather(vecs, -1, order.unsqueeze(-2).expand(-1, 3, 3))
    det = _det3(vecs)
    vecs = torch.cat([vecs[..., :2], vecs[..., 2:] * torch.sign(det + (det == 0)).
                      reshape(-1, 1, 1)], dim=-1)
    return vals * scale.unsqueeze(-1), vecs


def _det3(m: torch.Tensor) -> torch.Tensor:
    """Determinant of ``(..., 3, 3)`` by the rule of Sarrus (elementwise, any device)."""
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))
