"""Point backbones: PointNet and DGCNN. Plain networks, NOT equivariant by themselves;
:class:`fapc.models.FrameAveraging` makes them so.

Both take ``points (B, N, 3)`` and an optional ``mask (B, N)`` (True = real point) and return
``(B, out_dim)`` (``per_point=False``) or ``(B, N, out_dim)`` (``per_point=True``).
Both are permutation invariant (global output) or equivariant (per-point output).
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(widths: list[int] | tuple[int, ...], *, last_act: bool = True) -> nn.Sequential:
    """Shared MLP over the last dimension: Linear + LayerNorm-free ReLU stacks."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2 or last_act:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Max over ``dim`` ignoring masked entries; ``x (..., N, C)``, ``mask (..., N)``."""
    if mask is None:
        return x.amax(dim=dim)
    fill = torch.finfo(x.dtype).min
    return x.masked_fill(~mask.unsqueeze(-1), fill).amax(dim=dim)


class PointNet(nn.Module):
    """Shared point MLP, max pool, and a global head (or a segmentation head per point).

    Args:
        in_dim: input features per point (3 for coordinates).
        widths: shared MLP widths, e.g. ``(64, 128, 256)``.
        head: head widths before the output layer.
        out_dim: outputs per set (or per point).
        per_point: segmentation-style output ``(B, N, out_dim)`` from
            ``[point feature, global feature]``.
    """

    def __init__(self, in_dim: int = 3, widths: tuple[int, ...] = (64, 128, 256),
                 head: tuple[int, ...] = (128,), out_dim: int = 3, per_point: bool = False) -> None:
        super().__init__()
        self.per_point = per_point
        self.point_mlp = mlp([in_dim, *widths])
        first = widths[-1] + (widths[0] if per_point else 0)
        self.head = nn.Sequential(mlp([first, *head]), nn.Linear(head[-1] if head else first, out_dim))

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``points (B, N, in_dim)`` -> ``(B, out_dim)`` or ``(B, N, out_dim)``."""
        if self.per_point:
            first = self.point_mlp[:2](points)  # (B, N, w0)
            feat = self.point_mlp[2:](first)  # (B, N, C)
            glob = masked_max(feat, mask, dim=-2)  # (B, C)
            x = torch.cat([first, glob.unsqueeze(-2).expand(*first.shape[:-1], -1)], -1)
            return self.head(x)  # (B, N, out)
        feat = self.point_mlp(points)  # (B, N, C)
        return self.head(masked_max(feat, mask, dim=-2))  # (B, out)


def knn_indices(x: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x (B, N, C)`` -> indices of the ``k`` nearest (in feature space) ``(B, N, k)``."""
    d = torch.cdist(x, x)  # (B, N, N)
    if mask is not None:
        d = d.masked_fill(~mask.unsqueeze(-2), float("inf"))
    return d.topk(min(k, x.shape[1]), dim=-1, largest=False).indices


class EdgeConv(nn.Module):
    """``h_i = max_j MLP([x_i, x_j - x_i])`` over the ``k`` nearest neighbours ``j``."""

    def __init__(self, in_dim: int, out_dim: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.mlp = mlp([2 * in_dim, out_dim])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        idx = knn_indices(x, self.k, mask)  # (B, N, k)
        b, n, k = idx.shape
        nb = torch.gather(x.unsqueeze(1).expand(b, n, n, x.shape[-1]), 2,
                          idx.unsqueeze(-1).expand(b, n, k, x.shape[-1]))  # (B, N, k, C)
        xi = x.unsqueeze(2).expand_as(nb)
        return self.mlp(torch.cat([xi, nb - xi], -1)).amax(dim=2)  # (B, N, out)


class DGCNN(nn.Module):
    """Dynamic graph CNN: EdgeConv layers whose graph is rebuilt in feature space each layer.

    Args:
        k: neighbours per EdgeConv.
        widths: EdgeConv widths, e.g. ``(64, 64, 128)``.
        emb: width of the per-point embedding before pooling.
        head, out_dim, per_point: as for :class:`PointNet`.
    """

    def __init__(self, in_dim: int = 3, k: int = 16, widths: tuple[int, ...] = (64, 64, 128),
                 emb: int = 256, head: tuple[int, ...] = (128,), out_dim: int = 3,
                 per_point: bool = False) -> None:
        super().__init__()
        self.per_point = per_point
        dims = [in_dim, *widths]
        self.convs = nn.ModuleList(EdgeConv(dims[i], dims[i + 1], k) for i in range(len(widths)))
        self.embed = mlp([sum(widths), emb])
        first = emb + (sum(widths) if per_point else 0)
        self.head = nn.Sequential(mlp([first, *head]), nn.Linear(head[-1] if head else first, out_dim))

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats = []
        x = points
        for conv in self.convs:
            x = conv(x, mask)  # (B, N, w)
            feats.append(x)
        cat = torch.cat(feats, -1)  # (B, N, sum(widths))
        glob = masked_max(self.embed(cat), mask, dim=-2)  # (B, emb)
        if self.per_point:
            return self.head(torch.cat([glob.unsqueeze(-2).expand(*cat.shape[:-1], -1), cat], -1))
        return self.head(glob)
