"""Meshes (OBJ, STL, OFF, GLB/GLTF through trimesh; PLY with faces through our reader) and
area-uniform surface sampling that records each sample's face normal as ground truth."""

from __future__ import annotations

import os

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FormatError

MESH_EXTENSIONS = (".obj", ".stl", ".off", ".glb", ".gltf")


def read_obj(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of a Wavefront OBJ (``v`` and ``f`` lines; polygons fanned;
    negative indices; materials and textures ignored, so no image library is needed)."""
    path = os.fspath(path)
    verts: list[list[float]] = []
    tris: list[list[int]] = []
    with open(path, encoding="latin-1") as fh:
        for ln, line in enumerate(fh, 1):
            if line.startswith("v "):
                parts = line.split()
                if len(parts) < 4:
                    raise FormatError(f"line {ln}: vertex with fewer than 3 coordinates", path=path)
                try:
                    verts.append([float(parts[1]), float(parts[2]), float(parts[3])])
                except ValueError:
                    raise FormatError(f"line {ln}: non-numeric vertex", path=path) from None
            elif line.startswith("f "):
                try:
                    idx = [int(tok.split("/")[0]) for tok in line.split()[1:]]
                except ValueError:
                    raise FormatError(f"line {ln}: bad face", path=path) from None
                idx = [i - 1 if i > 0 else len(verts) + i for i in idx]
                tris += [[idx[0], idx[j], idx[j + 1]] for j in range(1, len(idx) - 1)]
    v = np.asarray(verts, np.float64).reshape(-1, 3)
    f = np.asarray(tris, np.int64).reshape(-1, 3)
    if len(v) == 0:
        raise FormatError("mesh has no vertices", path=path)
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise FormatError("face indices out of range", path=path)
    return v, f


def load_mesh_trimesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` float64 and triangles ``(F, 3)`` int64 of a mesh file (all
    geometry of a scene concatenated in world coordinates)."""
    path = os.fspath(path)
    if path.lower().endswith(".obj"):
        return read_obj(path)
    try:
        import trimesh
    except ImportError:  # pragma: no cover - trimesh is a dependency
        raise FormatError("reading meshes needs trimesh (pip install trimesh)", path=path) from None
    try:
        m = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises many types on bad files
        raise FormatError(f"cannot read mesh ({type(e).__name__}: {e})".splitlines()[0],
                          path=path) from None
    v = np.asarray(getattr(m, "vertices", np.zeros((0, 3))), np.float64)
    f = np.asarray(getattr(m, "faces", np.zeros((0, 3))), np.int64)
    if len(v) == 0:
        raise FormatError("mesh has no vertices", path=path)
    if ext_is_stl(path):  # STL repeats each vertex per face: merge exact duplicates
        v, inv = np.unique(v, axis=0, return_inverse=True)
        f = inv.reshape(-1)[f] if len(f) else f
    return v, f.reshape(-1, 3)


def ext_is_stl(path: str) -> bool:
    return path.lower().endswith(".stl")


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit face normals ``(F, 3)`` and face areas ``(F,)`` (zero-area faces get a zero normal)."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    cr = np.cross(b - a, c - a)
    norm = np.linalg.norm(cr, axis=1)
    n = np.divide(cr, norm[:, None], out=np.zeros_like(cr), where=norm[:, None] > 0)
    return n, 0.5 * norm


def sample_mesh(
    vertices: np.ndarray, faces: np.ndarray, n: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``n`` points uniformly by area.

    Returns ``points (n, 3)`` float64, ``normals (n, 3)`` (the normal of the face each point
    was drawn from) and ``face_index (n,)``.
    """
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError("sample_mesh needs (F, 3) triangles, F > 0")
    fn, area = face_normals(vertices, faces)
    total = area.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("mesh has zero surface area")
    rng = np.random.default_rng(seed)
    fi = rng.choice(len(faces), size=n, p=area / total)
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    a, b, c = (vertices[faces[fi, i]] for i in range(3))
    pts = a + u[:, None] * (b - a) + v[:, None] * (c - a)
    return pts, fn[fi], fi


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted mean of the adjacent faces' normals at each vertex, ``(V, 3)`` unit
    (zero where a vertex touches no face of positive area). Independent of the faces'
    winding: each face's normal is first turned to agree with the top eigenvector of the
    area-weighted ``sum n n^T`` at the vertex; the sign then follows the faces' majority."""
    import torch

    from fapc.eigen import sym3_eigh

    fn, area = face_normals(vertices, faces)
    outer = area[:, None, None] * fn[:, :, None] * fn[:, None, :]  # (F, 3, 3)
    scatter = np.zeros((len(vertices), 3, 3))
    for i in range(3):
        np.add.at(scatter, faces[:, i], outer)
    axis = sym3_eigh(torch.from_numpy(scatter))[1][..., 2].numpy()  # (V, 3) top eigenvector
    vn = np.zeros((len(vertices), 3))
    lean = np.zeros(len(vertices))  # (V,) which way the faces, as wound, lean along the axis
    for i in range(3):
        along = (fn * axis[faces[:, i]]).sum(1)  # (F,) this face against its vertex's axis
        np.add.at(vn, faces[:, i], (np.sign(along) * area)[:, None] * fn)
        np.add.at(lean, faces[:, i], area * along)
    vn *= np.where(lean < 0, -1.0, 1.0)[:, None]  # the majority's side
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    return np.divide(vn, norm, out=np.zeros_like(vn), where=norm > 0)


def interpolated_normals(vertices: np.ndarray, faces: np.ndarray, face_index: np.ndarray,
                         points: np.ndarray) -> np.ndarray:
    """Smooth ground truth: the vertex normals (:func:`vertex_normals`) of each point's face
    ``face_index (N,)`` blended by the point's barycentric coordinates, ``(N, 3)`` unit. The
    surface the mesh approximates, rather than its facets; a degenerate face keeps its
    vertices' mean. Each vertex normal is turned to the side of the point's face first, so
    the result does not depend on the faces' winding."""
    if points.shape != (len(face_index), 3):
        raise ValueError(f"points must be (N, 3) with N = len(face_index), got {points.shape}")
    vn = vertex_normals(vertices, faces)
    fn, _ = face_normals(vertices, faces)
    own = fn[face_index]  # (N, 3): each blended vertex normal is turned to its face's side
    a, b, c = (vertices[faces[face_index, i]] for i in range(3))  # (N, 3) each
    e0, e1, d = b - a, c - a, points - a
    d00, d01, d11 = (e0 * e0).sum(1), (e0 * e1).sum(1), (e1 * e1).sum(1)
    d20, d21 = (d * e0).sum(1), (d * e1).sum(1)
    den = d00 * d11 - d01 * d01
    ok = den > 1e-300
    safe = np.where(ok, den, 1.0)
    u = np.where(ok, (d11 * d20 - d01 * d21) / safe, 1 / 3)  # weight of b
    v = np.where(ok, (d00 * d21 - d01 * d20) / safe, 1 / 3)  # weight of c
    w = np.stack([1 - u - v, u, v], 1)  # (N, 3)
    out = np.zeros_like(own)
    for i in range(3):
        corner = vn[faces[face_index, i]]  # (N, 3)
        corner = corner * np.where((corner * own).sum(1) < 0, -1.0, 1.0)[:, None]
        out += w[:, i:i + 1] * corner
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def parse_from_mesh(from_mesh: str) -> int | None:
    """``"vertices"`` -> None; ``"sample:N"`` -> N (> 0; ``1e5`` is read too). Any other
    value raises ``ValueError``."""
    if from_mesh == "vertices":
        return None
    if from_mesh.startswith("sample:"):
        try:
            n = int(float(from_mesh.split(":", 1)[1]))
        except (ValueError, OverflowError):
            n = 0
        if n > 0:
            return n
        raise ValueError(f"--from-mesh sample:N needs a whole number N > 0, got {from_mesh!r}")
    raise ValueError(f"--from-mesh takes vertices or sample:N, got {from_mesh!r}")


def mesh_to_cloud(
    vertices: np.ndarray, faces: np.ndarray, *, from_mesh: str, seed: int = 0, path: str = ""
) -> PointCloud:
    """``from_mesh``: ``"vertices"`` (vertex positions, area-weighted vertex normals) or
    ``"sample:N"`` (N area-uniform samples with face normals as ground truth)."""
    try:
        n = parse_from_mesh(from_mesh)
    except ValueError as e:
        raise FormatError(str(e), path=path or None) from None
    if n is None:  # the vertices
        normals = None
        if len(faces):
            fn, area = face_normals(vertices, faces)
            acc = np.zeros_like(vertices)
            for i in range(3):
                np.add.at(acc, faces[:, i], fn * area[:, None])
            nn = np.linalg.norm(acc, axis=1, keepdims=True)
            normals = np.divide(acc, nn, out=np.zeros_like(acc), where=nn > 0)
        return PointCloud(points=vertices, normals=normals, faces=faces if len(faces) else None)
    if not len(faces):
        raise FormatError("cannot sample a file with no faces", path=path or None)
    try:
        pts, nrm, fi = sample_mesh(vertices, faces, n, seed=seed)
    except ValueError as e:
        raise FormatError(str(e), path=path or None) from None
    return PointCloud(points=pts, normals=nrm.astype(np.float32),
                      attributes={"face_index": fi.astype(np.int32)})
