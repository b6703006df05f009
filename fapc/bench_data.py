"""The TEST split of ``../shared/data`` (see its BENCHMARK.md) as evaluation clouds, for
``make bench``. Never used for training or for choosing anything.

Columns: the four PCPNet noise levels and the two density variants of the TEST meshes,
PCPNet's armadillo100k with its ``.pidx`` (``pcpnet``), the pre-release PCPNet clouds
(``pcpnet-pre``), and real and simulated scans (``scans``: the Stanford bunny's raw range
scans registered with ``bun.conf``, ground truth from ``bun_zipper.ply``; the three
points2surf ABC scans, ground truth from their meshes).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from scipy.spatial import cKDTree

from fapc.datasets import Shape, load_shape
from fapc.evaluate import EvalCloud, build_clouds
from fapc.io import read_cloud
from fapc.io.mesh import sample_mesh

log = logging.getLogger(__name__)

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                            "shared", "data")

TEST_MESHES = [
    "libigl/armadillo.obj", "libigl/bunny.off", "libigl/fandisk.off", "libigl/fertility.off",
    "libigl/lion.off", "libigl/screwdriver.off", "libigl/decimated-max.obj",
    "trimesh/fandisk.obj", "trimesh/featuretype.STL", "trimesh/idler_riser.STL",
    "trimesh/busted.STL", "trimesh/angle_block.STL",
]
BUNNY_SCANS = ["bun000", "bun045", "bun090", "bun180", "bun270", "bun315", "chin", "ear_back",
               "top2", "top3"]


def find_root(root: str | None = None) -> str | None:
    """``root``, ``$FAPC_DATA``, or ``../shared/data`` beside the checkout; None if absent."""
    for cand in (root, os.environ.get("FAPC_DATA"), DEFAULT_ROOT, "../shared/data"):
        if cand and os.path.isdir(os.path.join(cand, "libigl")):
            return os.path.abspath(cand)
    return None


def nearest_face_normals(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                         *, samples: int = 1_000_000, seed: int = 0) -> np.ndarray:
    """Ground truth for scans: the normal of the nearest face, approximated by the face of
    the nearest of ``samples`` dense area-uniform samples of the mesh."""
    pts, nrm, _ = sample_mesh(vertices, faces, samples, seed=seed)
    _, idx = cKDTree(pts).query(points, k=1, workers=-1)
    return nrm[idx]


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def bunny_scans(root: str) -> list[Shape]:
    """The 10 raw range scans, registered (``p_world = R(q)^-1 p + t`` per ``bun.conf``)."""
    base = os.path.join(root, "stanford_bunny")
    conf = {}
    with open(os.path.join(base, "data", "bun.conf")) as f:
        for line in f:
            tok = line.split()
            if tok and tok[0] == "bmesh":
                conf[tok[1][:-4]] = np.array([float(v) for v in tok[2:9]])
    mesh = read_cloud(os.path.join(base, "reconstruction", "bun_zipper.ply"))
    v, fcs = mesh.points.astype(np.float64), mesh.faces
    out = []
    for name in BUNNY_SCANS:
        scan = read_cloud(os.path.join(base, "data", f"{name}.ply")).points.astype(np.float64)
        t, q = conf[name][:3], conf[name][3:]
        rot = _quat_to_matrix(q)
        world = scan @ rot + t  # R^-1 p = R^T p, as rows: p @ R
        out.append(Shape(f"bunny_{name}", world, normals=nearest_face_normals(world, v, fcs)))
    return out


def p2s_scans(root: str) -> list[Shape]:
    base = os.path.join(root, "abc", "points2surf_abc_minimal")
    out = []
    for f in sorted(os.listdir(os.path.join(base, "04_pts"))):
        stem = f.split(".")[0]
        pts = np.load(os.path.join(base, "04_pts", f)).astype(np.float64)
        mesh = read_cloud(os.path.join(base, "03_meshes", stem + ".ply"))
        gt = nearest_face_normals(pts, mesh.points.astype(np.float64), mesh.faces)
        out.append(Shape(f"p2s_{stem[:8]}", pts, normals=gt))
    return out


def test_clouds(root: str, *, columns: tuple[str, ...] = ("none", "0.125%", "0.6%", "1.2%", "stripe",
                                                        "gradient"),
                queries: int = 5000, points: int = 100_000, scans: bool = True,
                pcpnet: bool = True, seed: int = 0) -> list[EvalCloud]:
    """Every TEST cloud of the benchmark, column by column."""
    meshes = [load_shape(os.path.join(root, m)) for m in TEST_MESHES]
    clouds = build_clouds(meshes, columns=columns, points=points, queries=queries, seed=seed)
    if pcpnet:
        arm = load_shape(os.path.join(root, "pcpnet", "armadillo100k.xyz"))
        for c in build_clouds([arm], queries=queries, seed=seed):
            c.column = "pcpnet"
            clouds.append(c)
    if scans:
        for c in build_clouds(bunny_scans(root) + p2s_scans(root), queries=queries, seed=seed):
            c.column = "scans"
            clouds.append(c)
    return clouds
