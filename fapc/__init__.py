"""fapc: point-cloud geometry with Euclidean-equivariant frame-averaging networks.

The public Python API:

- :func:`fapc.read_cloud`, :func:`fapc.write_cloud` and :class:`fapc.PointCloud` (formats),
- :func:`fapc.estimate_normals` (normals, confidence and curvature as numpy arrays).
"""

from __future__ import annotations

__version__ = "0.1.0"

from fapc.cloud import PointCloud
from fapc.errors import FapcError
from fapc.io import read_cloud, write_cloud

__all__ = [
    "FapcError",
    "PointCloud",
    "__version__",
    "estimate_normals",
    "read_cloud",
    "write_cloud",
]


def __getattr__(name: str):  # lazy: importing fapc does not import torch
    if name == "estimate_normals":
        from fapc.normals import estimate_normals

        return estimate_normals
    raise AttributeError(f"module 'fapc' has no attribute {name!r}")
