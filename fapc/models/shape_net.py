"""Whole-shape mode (the frame-averaging paper's setting): one FA-PointNet or FA-DGCNN over
a whole cloud of e.g. 512 points, predicting every point's normal at once.

The cloud is centred and scaled to unit RMS radius (invariants), put into its E(3) frame
elements, and the per-point vector outputs are averaged as unoriented axes
(:class:`fapc.models.FrameAveraging` with ``output="axis"``). Large clouds are processed as
seeded random subsets of ``points`` points (chosen by index, never by coordinates, so a
rotated cloud gets the same subsets).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from fapc.models.backbones import DGCNN, PointNet
from fapc.models.fa import FrameAveraging


@dataclass
class ShapeNetConfig:
    kind: str = "shape"
    backbone: str = "pointnet"
    points: int = 512
    group: str = "E3"
    widths: tuple[int, ...] = (64, 128, 256)
    head: tuple[int, ...] = (128,)
    k: int = 16
    fa: bool = True
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShapeNetConfig:
        from fapc.models.normal_net import config_from_json

        return config_from_json(cls, text)


class ShapeNormalNet(nn.Module):
    """``points (B, N, 3)`` -> ``normal (B, N, 3)``, ``confidence (B, N)``."""

    def __init__(self, config: ShapeNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ShapeNetConfig()
        if c.backbone == "pointnet":
            bb: nn.Module = PointNet(widths=c.widths, head=c.head, out_dim=3, per_point=True)
        elif c.backbone == "dgcnn":
            bb = DGCNN(k=c.k, widths=c.widths, emb=c.widths[-1], head=c.head, out_dim=3,
                       per_point=True)
        else:
            raise ValueError(f"backbone must be pointnet or dgcnn, got {c.backbone!r}")
        self.net = FrameAveraging(bb, group=c.group, output="axis") if c.fa else bb
        self.use_bf16 = False

    def forward(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
        x = points - points.mean(1, keepdim=True)
        x = x / x.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-12)[:, None, None]
        out = self.net(x)  # (B, N, 3)
        if self.config.fa:
            agree = self.net.last_agreement  # (B, N) in [1/3, 1]
            conf = ((3 * agree - 1) / 2).clamp(0, 1)
        else:
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            conf = torch.ones(out.shape[:-1], dtype=out.dtype, device=out.device)
        return {"normal": out, "confidence": conf,
                "curvature": torch.zeros_like(conf)}


def shape_normals(points: np.ndarray, model: ShapeNormalNet, *, device: torch.device,
                  query_index: np.ndarray | None = None, seed: int = 0,
                  batch: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normals of ``points (N, 3)`` (at ``query_index``) from seeded random subsets of
    ``model.config.points`` points; the last subset is topped up with other points."""
    m = model.config.points
    qi = np.arange(len(points)) if query_index is None else np.asarray(query_index)
    rng = np.random.default_rng(seed)
    order = qi[rng.permutation(len(qi))]
    pad = (-len(order)) % m
    if pad:
        extra = rng.choice(len(points), size=pad, replace=len(points) < pad)
        order = np.concatenate([order, extra])
    groups = order.reshape(-1, m)
    normals = np.zeros((len(points), 3), np.float32)
    conf = np.zeros(len(points), np.float32)
    with torch.inference_mode():
        for s in range(0, len(groups), batch):
            g = groups[s:s + batch]
            x = torch.as_tensor(points[g], dtype=torch.float32, device=device)
            out = model(x)
            real = np.ones(g.shape, bool)
            if s + batch >= len(groups) and pad:
                real.reshape(-1)[-pad:] = False  # padding points: their results are dropped
            normals[g[real]] = out["normal"].float().cpu().numpy()[real]
            conf[g[real]] = out["confidence"].float().cpu().numpy()[real]
    return normals[qi], conf[qi], np.zeros(len(qi), np.float32)
