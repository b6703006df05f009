"""The one in-memory point-cloud type every reader returns and every writer takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class PointCloud:
    """Points with optional normals and any number of named per-point attributes.

    Attributes:
        points: ``(N, 3)`` float32 or float64; the precision of the file is kept.
        normals: ``(N, 3)`` or ``None``.
        attributes: name -> ``(N,)`` or ``(N, C)`` array, in file order (colours,
            intensity, labels, custom properties...). Writers keep their dtypes.
        faces: ``(F, 3)`` int triangle indices when the file was a mesh, else ``None``.
        viewpoint: sensor position ``(3,)`` when the file records one (PCD VIEWPOINT).
        metadata: file-level facts a writer of the same format reuses, by format (``"las"``:
            point format, scale, offset and variable-length records, see
            :mod:`fapc.io.las`); other writers ignore it.
    """

    points: np.ndarray
    normals: np.ndarray | None = None
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    faces: np.ndarray | None = None
    viewpoint: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pts = np.asarray(self.points)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), got {pts.shape}")
        if pts.dtype not in (np.float32, np.float64):
            pts = pts.astype(np.float64)
        self.points = pts
        n = len(pts)
        if self.normals is not None:
            nrm = np.asarray(self.normals)
            if nrm.shape != (n, 3):
                raise ValueError(f"normals must have shape ({n}, 3), got {nrm.shape}")
            self.normals = nrm
        for name, arr in self.attributes.items():
            arr = np.asarray(arr)
            if arr.ndim not in (1, 2) or len(arr) != n:
                raise ValueError(f"attribute {name!r} must have {n} rows, got shape {arr.shape}")
            self.attributes[name] = arr

    def __len__(self) -> int:
        return len(self.points)

    def subset(self, mask_or_index: np.ndarray) -> PointCloud:
        """The cloud restricted to ``mask_or_index`` (boolean mask or indices); faces dropped."""
        sel = np.asarray(mask_or_index)
        return PointCloud(
            points=self.points[sel],
            normals=None if self.normals is None else self.normals[sel],
            attributes={k: v[sel] for k, v in self.attributes.items()},
            viewpoint=self.viewpoint,
            metadata=self.metadata,
        )
