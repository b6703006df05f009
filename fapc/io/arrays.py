"""NumPy formats: ``.npy`` (an ``(N, 3)`` or ``(N, 6)`` array) and ``.npz`` (named arrays).

An ``.npz`` holds ``points`` (or ``xyz``/``positions``), optional ``normals``, and every other
per-point array as an attribute. Loading never unpickles (``allow_pickle=False``).
"""

from __future__ import annotations

import os

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FormatError

_POINT_KEYS = ("points", "xyz", "positions", "pos", "vertices")


def _check_points(a: np.ndarray, path: str) -> np.ndarray:
    if a.ndim != 2 or a.shape[1] < 3 or a.dtype.kind not in "iuf":
        raise FormatError(f"expected an (N, 3) numeric array, got {a.dtype} {a.shape}", path=path)
    return a


def read_npy(path: str | os.PathLike) -> PointCloud:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:  # ours to close, whatever numpy raises
            a = np.load(f, allow_pickle=False)
    except Exception as e:  # numpy raises many types on a corrupt header (even TokenError)
        raise FormatError(f"not a readable .npy array ({type(e).__name__})", path=path) from None
    a = _check_points(a, path)
    if a.shape[1] >= 6:
        return PointCloud(points=a[:, :3], normals=a[:, 3:6],
                          attributes={f"scalar_{j}": a[:, 6 + j] for j in range(a.shape[1] - 6)})
    return PointCloud(points=a[:, :3],
                      attributes={f"scalar_{j}": a[:, 3 + j] for j in range(a.shape[1] - 3)})


def read_npz(path: str | os.PathLike) -> PointCloud:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zip and header errors of every kind
        raise FormatError(f"not a readable .npz archive ({type(e).__name__})", path=path) from None
    key = next((k for k in _POINT_KEYS if k in arrays), None)
    if key is None:
        raise FormatError(f"no points array (one of {', '.join(_POINT_KEYS)})", path=path)
    pts = _check_points(arrays.pop(key), path)[:, :3]
    normals = arrays.pop("normals", None)
    if normals is not None and normals.shape != pts.shape:
        raise FormatError(f"normals shape {normals.shape} != points {pts.shape}", path=path)
    attrs = {k: v for k, v in arrays.items() if v.ndim in (1, 2) and len(v) == len(pts)}
    if "viewpoint" in arrays and arrays["viewpoint"].shape == (3,):
        attrs.pop("viewpoint", None)
    faces = arrays.get("faces")
    cloud = PointCloud(points=pts, normals=normals, attributes=attrs,
                       viewpoint=arrays.get("viewpoint") if "viewpoint" in arrays else None)
    if faces is not None and faces.ndim == 2 and faces.shape[1] == 3:
        cloud.attributes.pop("faces", None)
        cloud.faces = faces.astype(np.int64)
    return cloud


def write_npz(path: str | os.PathLike, cloud: PointCloud) -> None:
    arrays: dict[str, np.ndarray] = {"points": cloud.points}
    if cloud.normals is not None:
        arrays["normals"] = cloud.normals
    for k, v in cloud.attributes.items():
        if k in ("points", "normals", "faces", "viewpoint"):
            raise ValueError(f"attribute name {k!r} is reserved in .npz")
        arrays[k] = v
    if cloud.faces is not None:
        arrays["faces"] = cloud.faces
    if cloud.viewpoint is not None:
        arrays["viewpoint"] = np.asarray(cloud.viewpoint)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
