"""Point-cloud formats: one reader and one writer entry point, chosen by content then extension.

``read_cloud(path)`` returns a :class:`fapc.PointCloud`; ``write_cloud(path, cloud)`` writes
atomically (a temporary file in the same folder, then a rename), so a failure never leaves a
partial output.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FapcError, FormatError
from fapc.io.arrays import read_npy, read_npz, write_npz
from fapc.io.e57 import SIGNATURE as E57_SIGNATURE
from fapc.io.e57 import read_e57
from fapc.io.las import read_las, write_las
from fapc.io.mesh import MESH_EXTENSIONS, load_mesh_trimesh, mesh_to_cloud, sample_mesh
from fapc.io.pcd import read_pcd, write_pcd
from fapc.io.ply import read_ply, write_ply
from fapc.io.text import read_text, write_text

TEXT_EXTENSIONS = (".xyz", ".xyzn", ".pts", ".txt", ".csv", ".asc")
READ_EXTENSIONS = (".ply", ".pcd", ".las", ".laz", ".e57", ".npy", ".npz") + TEXT_EXTENSIONS + \
    MESH_EXTENSIONS
WRITE_EXTENSIONS = (".ply", ".pcd", ".las", ".laz", ".npz", ".xyzn", ".xyz", ".txt", ".csv")

__all__ = [
    "READ_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "read_cloud",
    "sample_mesh",
    "sniff_format",
    "write_cloud",
]


def sniff_format(path: str) -> str:
    """The format of ``path`` from its first bytes, falling back to its extension."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"ply"):
        return ".ply"
    if head.startswith(b"LASF"):
        return ".las"
    if head.startswith(E57_SIGNATURE):
        return ".e57"
    if head.startswith(b"\x93NUMPY"):
        return ".npy"
    if head.startswith(b"PK\x03\x04"):
        return ".npz"
    if head.startswith(b"glTF"):
        return ".glb"
    if head.startswith(b"# .PCD") or head.startswith(b"VERSION") or head.startswith(b"FIELDS"):
        return ".pcd"
    if head.startswith(b"OFF") or head.startswith(b"COFF") or head.startswith(b"NOFF"):
        return ".off"
    return os.path.splitext(path)[1].lower()


def read_cloud(
    path: str | os.PathLike, *, from_mesh: str | None = None, seed: int = 0
) -> PointCloud:
    """Read any supported file into a :class:`PointCloud`.

    Args:
        path: the file; its content decides the format where the extension lies.
        from_mesh: for mesh files: ``"vertices"`` (default) or ``"sample:N"`` (area-uniform
            samples carrying their face normal as ground truth).
        seed: seed for mesh sampling.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FapcError("no such file", path=path)
    if os.path.isdir(path):
        raise FapcError("is a directory", path=path)
    try:
        if os.path.getsize(path) == 0:
            raise FormatError("empty file", path=path)
        fmt = sniff_format(path)
    except PermissionError:
        raise FapcError("permission denied", path=path) from None
    if fmt not in READ_EXTENSIONS:
        raise FormatError(f"unknown format '{fmt or '(no extension)'}'", path=path)
    try:
        if fmt == ".ply":
            cloud = read_ply(path)
            if from_mesh and from_mesh != "vertices":
                if cloud.faces is None:
                    raise FormatError("--from-mesh sample:N needs a PLY with faces", path=path)
                cloud = mesh_to_cloud(cloud.points.astype(np.float64), cloud.faces,
                                      from_mesh=from_mesh, seed=seed, path=path)
        elif fmt == ".pcd":
            cloud = read_pcd(path)
        elif fmt in (".las", ".laz"):
            cloud = read_las(path)
        elif fmt == ".e57":
            cloud = read_e57(path)
        elif fmt == ".npy":
            cloud = read_npy(path)
        elif fmt == ".npz":
            cloud = read_npz(path)
        elif fmt in TEXT_EXTENSIONS:
            cloud = read_text(path)
        else:
            v, f = load_mesh_trimesh(path)
            cloud = mesh_to_cloud(v, f, from_mesh=from_mesh or "vertices", seed=seed, path=path)
    except PermissionError:
        raise FapcError("permission denied", path=path) from None
    except MemoryError:
        raise FormatError("file needs more memory than is available", path=path) from None
    except FapcError:
        raise
    except Exception as e:
        # a guard the format modules missed: still one line, still this file
        msg = f"corrupt or unsupported file ({type(e).__name__}: {e})".splitlines()[0]
        raise FormatError(msg[:300], path=path) from None
    if len(cloud) == 0:
        raise FormatError("no points in the file", path=path)
    return cloud


def writable_extension(path: str | os.PathLike) -> str:
    """The extension of ``path`` (lower case) if we can write that format, else a
    :class:`FapcError` naming the path."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITE_EXTENSIONS:
        raise FapcError(f"cannot write: the extension {ext or '(none)'!r} is not one of "
                        f"{', '.join(WRITE_EXTENSIONS)}", path=path)
    return ext


def write_cloud(path: str | os.PathLike, cloud: PointCloud, *, ascii: bool = False) -> None:
    """Write ``cloud`` to ``path`` (format from the extension), atomically."""
    path = os.fspath(path)
    ext = writable_extension(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fapc-", suffix=ext + ".tmp", dir=folder)
    except OSError as e:
        raise FapcError(f"cannot write output ({e.strerror or e})", path=path) from None
    os.close(fd)
    try:
        if ext == ".ply":
            write_ply(tmp, cloud, ascii=ascii)
        elif ext == ".pcd":
            write_pcd(tmp, cloud, ascii=ascii)
        elif ext in (".las", ".laz"):
            write_las(tmp, cloud, compress=ext == ".laz")
        elif ext == ".npz":
            write_npz(tmp, cloud)
        else:
            write_text(tmp, cloud)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise FapcError(f"cannot write output ({e.strerror or e})", path=path) from None
    except FapcError as e:  # a format's own refusal: name the output, not the temporary file
        _unlink(tmp)
        raise FapcError(e.reason, path=path) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
