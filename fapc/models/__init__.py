"""Backbones (plain, not equivariant), frame-averaging wrappers, and the normal model."""

from fapc.models.backbones import DGCNN, PointNet
from fapc.models.fa import FrameAveraging

__all__ = ["DGCNN", "FrameAveraging", "PointNet"]
