"""Training and evaluation data: meshes sampled on the fly, clouds that carry normals, the
PCPNet layout, and procedural shapes; with noise, density variation and outliers.

Sources:
  - a directory (recursively) or file list of meshes (OBJ, STL, OFF, PLY with faces, ...):
    sampled area-uniformly with seeds; ground truth = the sampled face's normal;
  - clouds with normals in any format the readers take;
  - the PCPNet layout: ``NAME.xyz`` + ``NAME.normals`` (+ ``NAME.pidx``), listed one name per
    line in a ``.txt`` file next to them (or every ``.xyz`` with a ``.normals`` in a folder).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from fapc.errors import FapcError
from fapc.io import READ_EXTENSIONS, read_cloud
from fapc.io.mesh import MESH_EXTENSIONS, face_normals, load_mesh_trimesh, sample_mesh

log = logging.getLogger(__name__)

DENSITIES = ("uniform", "gradient", "stripe")


@dataclass
class Shape:
    """A mesh (``faces`` set) or a cloud with ground-truth normals."""

    name: str
    vertices: np.ndarray  # (V, 3) float64 (mesh vertices or cloud points)
    faces: np.ndarray | None = None  # (F, 3)
    normals: np.ndarray | None = None  # (V, 3) for clouds
    query_index: np.ndarray | None = None  # PCPNet .pidx

    @property
    def is_mesh(self) -> bool:
        return self.faces is not None

    @property
    def diagonal(self) -> float:
        return float(np.linalg.norm(self.vertices.max(0) - self.vertices.min(0)))


def _read_pcpnet(stem: str) -> Shape:
    pts = np.loadtxt(stem + ".xyz", dtype=np.float64, ndmin=2)[:, :3]
    nrm = np.loadtxt(stem + ".normals", dtype=np.float64, ndmin=2)[:, :3]
    if len(pts) != len(nrm):
        raise FapcError(f"{len(pts)} points but {len(nrm)} normals", path=stem + ".normals")
    pidx = None
    if os.path.exists(stem + ".pidx"):
        pidx = np.loadtxt(stem + ".pidx", dtype=np.int64, ndmin=1)
    return Shape(os.path.basename(stem), pts, normals=nrm, query_index=pidx)


def load_shape(path: str) -> Shape:
    """One mesh, cloud with normals, or PCPNet ``.xyz`` with a ``.normals`` beside it."""
    stem, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext == ".xyz" and os.path.exists(stem + ".normals"):
        return _read_pcpnet(stem)
    if ext in MESH_EXTENSIONS:
        v, f = load_mesh_trimesh(path)
        return Shape(os.path.basename(stem), v, faces=f)
    cloud = read_cloud(path)
    if cloud.faces is not None and len(cloud.faces):
        return Shape(os.path.basename(stem), cloud.points.astype(np.float64), faces=cloud.faces)
    if cloud.normals is None:
        raise FapcError("no ground truth: neither faces nor normals", path=path)
    ok = np.isfinite(cloud.points).all(1) & (np.linalg.norm(cloud.normals, axis=1) > 0)
    return Shape(os.path.basename(stem), cloud.points[ok].astype(np.float64),
                 normals=cloud.normals[ok].astype(np.float64))


def discover(paths: list[str] | str) -> list[str]:
    """Files of every data argument: directories (recursive), list files, single files."""
    if isinstance(paths, str):
        paths = [paths]
    found: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    full = os.path.join(root, f)
                    ext = os.path.splitext(f)[1].lower()
                    if ext == ".xyz" and os.path.exists(os.path.splitext(full)[0] + ".normals"):
                        found.append(full)
                    elif ext in READ_EXTENSIONS and ext not in (".xyz", ".txt"):
                        found.append(full)
        elif p.endswith(".txt") and os.path.isfile(p):  # PCPNet list file
            folder = os.path.dirname(p)
            with open(p) as fh:
                names = [ln.strip() for ln in fh if ln.strip()]
            found += [os.path.join(folder, n + ".xyz") for n in names]
        elif os.path.isfile(p):
            found.append(p)
        else:
            raise FapcError("no such file or directory", path=p)
    return found


def load_shapes(paths: list[str] | str) -> list[Shape]:
    """Load every shape under ``paths``; unreadable ones are skipped with a warning."""
    shapes = []
    for f in discover(paths):
        try:
            shapes.append(load_shape(f))
        except FapcError as e:
            log.warning("skipping %s", e)
    return shapes


def procedural_shapes(names: tuple[str, ...] | list[str] | None = None) -> list[Shape]:
    """Primitives with sharp edges and smooth patches (boxes, cylinders, cones, spheres,
    capsules, tori, a box union), built with trimesh; ``names`` picks some (``box``...)."""
    import trimesh

    c = trimesh.creation
    meshes = {
        "box": c.box(extents=(1.0, 0.6, 0.3)),
        "cube": c.box(extents=(1.0, 1.0, 1.0)),
        "cylinder": c.cylinder(radius=0.4, height=1.2, sections=96),
        "cone": c.cone(radius=0.5, height=1.0, sections=96),
        "sphere": c.icosphere(subdivisions=4, radius=0.7),
        "capsule": c.capsule(height=1.0, radius=0.3, count=[48, 48]),
        "torus": c.torus(major_radius=0.6, minor_radius=0.2, major_sections=96,
                         minor_sections=48) if hasattr(c, "torus") else c.icosphere(),
    }
    a = c.box(extents=(1.0, 0.4, 0.4))
    b = c.box(extents=(0.4, 1.0, 0.4))
    meshes["cross"] = trimesh.util.concatenate([a, b])
    out = []
    for name, m in meshes.items():
        if names and name not in names:
            continue
        out.append(Shape(f"proc_{name}", np.asarray(m.vertices, np.float64),
                         faces=np.asarray(m.faces, np.int64)))
    return out


def density_keep(points: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Keep-probabilities ``(N,)`` for PCPNet-style density variation along a random axis."""
    if kind == "uniform":
        return np.ones(len(points))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    t = points @ axis
    t = (t - t.min()) / max(t.max() - t.min(), 1e-12)
    if kind == "gradient":
        return 0.05 + 0.95 * t
    if kind == "stripe":
        return np.where(np.sin(t * 2 * np.pi * 4) > 0.5, 0.1, 1.0)
    raise ValueError(f"density must be one of {DENSITIES}, got {kind!r}")


def make_cloud(
    shape: Shape,
    *,
    n: int = 100_000,
    noise: float = 0.0,
    density: str = "uniform",
    outliers: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A training/evaluation cloud of a shape.

    Args:
        n: points (meshes: area-uniform samples; clouds: at most ``n``, subsampled).
        noise: Gaussian sigma as a fraction of the bounding-box diagonal.
        density: ``uniform``, ``gradient`` or ``stripe``.
        outliers: fraction of uniform points added in the bounding box (normal = 0:
            excluded from losses and metrics).

    Returns:
        ``points (M, 3)`` float64 and ``normals (M, 3)`` (unit, or 0 for outliers).
    """
    rng = np.random.default_rng(seed)
    if shape.is_mesh:
        over = 1 if density == "uniform" else 4
        pts, nrm, _ = sample_mesh(shape.vertices, shape.faces, n * over, seed=seed)
    else:
        pts, nrm = shape.vertices, shape.normals
    if density != "uniform":
        keep = rng.random(len(pts)) < density_keep(pts, density, rng)
        pts, nrm = pts[keep], nrm[keep]
    if len(pts) > n:
        sel = rng.choice(len(pts), n, replace=False)
        pts, nrm = pts[sel], nrm[sel]
    if noise > 0:
        pts = pts + rng.normal(scale=noise * shape.diagonal, size=pts.shape)
    if outliers > 0:
        m = int(outliers * len(pts))
        lo, hi = pts.min(0), pts.max(0)
        pts = np.concatenate([pts, rng.uniform(lo, hi, size=(m, 3))])
        nrm = np.concatenate([nrm, np.zeros((m, 3))])
    return pts, nrm


ANALYTIC = ("torus", "ellipsoid")


def analytic_surface(kind: str, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-uniform points on a smooth closed surface with its exact normals (not a
    mesh's facets): ``torus`` (radii 1 and 0.35) or ``ellipsoid`` (semi-axes 1, 0.7, 0.45).

    Returns ``points (n, 3)`` float64 and unit ``normals (n, 3)`` (outward).
    """
    if kind not in ANALYTIC:
        raise ValueError(f"kind must be one of {ANALYTIC}, got {kind!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    while sum(len(p) for p in parts) < n:  # rejection sampling by the area element
        if kind == "torus":
            big, small = 1.0, 0.35
            u, v = rng.uniform(0, 2 * np.pi, (2, 2 * n))
            keep = rng.random(2 * n) < (big + small * np.cos(v)) / (big + small)
            u, v = u[keep], v[keep]
            nrm = np.stack([np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)], 1)
            ring = big + small * np.cos(v)
            pts = np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], 1)
        else:
            axes = np.array([1.0, 0.7, 0.45])
            d = rng.normal(size=(2 * n, 3))
            d /= np.linalg.norm(d, axis=1, keepdims=True)  # on the unit sphere
            grad = d / axes  # the implicit function's gradient at d * axes
            w = np.linalg.norm(grad, axis=1)
            keep = rng.random(2 * n) < w * axes.min()  # area stretch of the map d -> d * axes
            pts, nrm = d[keep] * axes, grad[keep] / w[keep, None]
        parts.append(np.concatenate([pts, nrm], 1))
    both = np.concatenate(parts)[:n]  # (n, 6)
    return both[:, :3], both[:, 3:]


def simulated_scan(shape: Shape, *, seed: int = 0, lines: int = 300, per_line: int = 700,
                   noise: float = 0.001, distance: float = 2.0, width: float = 1.2
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A one-sided line scan of a mesh, as a laser scanner sees it: a sensor ``distance``
    diagonals from the shape's centre, in a seeded random direction, sweeps ``lines`` x
    ``per_line`` rays over a square field of view ``width`` diagonals wide there; each hit
    moves along its ray by Gaussian noise of ``noise`` diagonals. Needs open3d (ray casting).

    Returns ``points (M, 3)`` float64 (M <= lines * per_line, the rays that hit) and the hit
    faces' normals ``(M, 3)``.
    """
    import open3d as o3d

    if not shape.is_mesh:
        raise ValueError("simulated_scan needs a mesh")
    rng = np.random.default_rng(seed)
    v, f = shape.vertices, shape.faces
    diag = shape.diagonal
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    eye = 0.5 * (v.max(0) + v.min(0)) + distance * diag * d
    fwd = -d
    up0 = np.array([0, 0, 1.0]) if abs(fwd[2]) < 0.9 else np.array([1.0, 0, 0])
    right = np.cross(fwd, up0)
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    half = np.arctan(0.5 * width / distance)
    el, az = np.meshgrid(np.linspace(-half, half, lines), np.linspace(-half, half, per_line),
                         indexing="ij")
    dirs = ((np.cos(el) * np.cos(az))[..., None] * fwd + (np.cos(el) * np.sin(az))[..., None]
            * right + np.sin(el)[..., None] * up).reshape(-1, 3)  # (R, 3)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(v.astype(np.float32)),
                        o3d.core.Tensor(np.asarray(f).astype(np.uint32)))
    rays = np.concatenate([np.broadcast_to(eye, dirs.shape), dirs], 1).astype(np.float32)
    ans = scene.cast_rays(o3d.core.Tensor(rays))
    t = ans["t_hit"].numpy().astype(np.float64)
    hit = np.isfinite(t)
    prim = ans["primitive_ids"].numpy()[hit].astype(np.int64)
    t = t[hit] + rng.normal(scale=noise * diag, size=int(hit.sum()))
    fn, _ = face_normals(v, f)
    return eye + dirs[hit] * t[:, None], fn[prim]
