"""The face choice at creases (:mod:`fapc.crease`): it puts points a few noise widths from a
sharp edge back on their own face, leaves smooth surfaces and the edge itself alone, opens its
gate only under light noise, moves with the cloud, and refuses bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg
from scipy.spatial import cKDTree

from fapc.crease import (
    CreaseSettings,
    cloud_sigma,
    crease_faces,
    local_planes,
    quadric_residual,
)
from fapc.models.fits import spd_solve
from fapc.testing import random_rotation

SIGMA = 0.02  # noise, in units of the grid spacing of the samples below (spacing 0.1)


def crease_cloud(seed: int, *, sigma: float = SIGMA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 90-degree edge along the y axis: face A ``z = 0, x > 0`` (normal +z) and face B
    ``x = 0, z > 0`` (normal +x), jittered grid samples (spacing about 0.1), Gaussian noise
    ``sigma``. Returns ``points (N, 3)``, true ``normals (N, 3)`` and ``dist (N,)``, each
    clean sample's distance to the edge."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.arange(0.0, 1.2, 0.1), np.arange(-0.6, 0.61, 0.1))
    u, v = u.ravel() + rng.uniform(0.0, 0.1, u.size), v.ravel() + rng.uniform(-0.05, 0.05, v.size)
    a = np.stack([u, v, np.zeros_like(u)], 1)
    b = np.stack([np.zeros_like(u), v, u], 1)
    pts = np.concatenate([a, b])
    nrm = np.concatenate([np.tile([0.0, 0.0, 1.0], (len(a), 1)), np.tile([1.0, 0.0, 0.0], (len(b), 1))])
    dist = np.concatenate([u, u])
    return pts + rng.normal(scale=sigma, size=pts.shape), nrm, dist


def run_step(pts: np.ndarray, own: np.ndarray, query: np.ndarray, *, sigma: float,
             settings: CreaseSettings = CreaseSettings()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`crease_faces` at ``query`` with every point's plane, as the pipeline runs it."""
    p = torch.from_numpy(pts)
    tree = cKDTree(pts)
    _, near = tree.query(pts, k=settings.plane_k)
    centres, normals, _ = local_planes(p, torch.from_numpy(near))
    _, support = tree.query(pts[query], k=settings.k)
    out, changed = crease_faces(p, torch.from_numpy(own[query]), centres, normals,
                                support=torch.from_numpy(support), sigma=sigma,
                                settings=settings)
    return out.numpy(), changed.numpy()


def test_local_planes_fit_exact_planes() -> None:
    rng = np.random.default_rng(0)
    n = np.array([1.0, 2.0, 2.0]) / 3
    basis = np.linalg.svd(n[None])[2][1:]  # (2, 3) the plane's directions
    pts = rng.normal(size=(50, 2)) @ basis + 0.7 * n
    near = cKDTree(pts).query(pts, k=10)[1]
    c, nrm, res = local_planes(torch.from_numpy(pts), torch.from_numpy(near))
    assert angle_deg(nrm.numpy(), np.tile(n, (50, 1))).max() < 1e-4
    assert res.abs().max().item() < 1e-6
    assert np.allclose(c.numpy() @ n, 0.7)


def test_the_quadric_test() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(200, 6, 6, generator=g, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(200, 6, 1, generator=g, dtype=torch.float64)
    # the project's Cholesky (fapc.models.fits), which the quadric test solves with
    assert torch.allclose(spd_solve(a, b[..., 0]), torch.linalg.solve(a, b)[..., 0], atol=1e-10)
    # a gently curved patch (unit size) fits a quadric height field to well under 1 % of its
    # size; a 90-degree edge does not; the figure moves with no rotation
    uv = torch.rand(4, 48, 2, generator=g, dtype=torch.float64) - 0.5
    u, v = uv.unbind(-1)
    curved = torch.stack([u, v, 0.3 * (u * u - 0.3 * u * v + 0.6 * v * v) + 0.1 * u], -1)
    rot = random_rotation(g)
    assert quadric_residual(curved @ rot.T).max().item() < 1e-3
    assert torch.allclose(quadric_residual(curved @ rot.T), quadric_residual(curved))
    edge = torch.stack([u, v, u.abs()], -1)
    assert quadric_residual(edge @ rot.T).min().item() > 0.02


def test_points_off_the_edge_take_their_own_face() -> None:
    pts, nrm, dist = crease_cloud(1)
    # the failure the step is for: points 3-6 noise widths from the edge carrying the other
    # face's normal (as they do after a network whose patch straddles the edge)
    wrong = nrm[:, ::-1].copy()
    band = (dist > 3 * SIGMA) & (dist < 6 * SIGMA) & (np.abs(pts[:, 1]) < 0.45)
    near_edge = (dist < 0.5 * SIGMA) & (np.abs(pts[:, 1]) < 0.45)
    assert band.sum() >= 10 and near_edge.sum() >= 2
    own = np.where(band[:, None], wrong, nrm)
    query = np.nonzero(band | near_edge)[0]
    out, changed = run_step(pts, own, query, sigma=SIGMA)
    err = angle_deg(out, nrm[query])
    on_band = band[query]
    assert changed[on_band].mean() > 0.6
    assert np.median(err[on_band]) < 5  # was 90
    assert not changed[~on_band].any()  # on the edge itself the data cannot tell: left alone
    # signs follow the normal the point had
    assert ((out * own[query]).sum(1) >= 0).all()


def test_smooth_surfaces_and_flat_faces_are_left_alone() -> None:
    rng = np.random.default_rng(2)
    d = rng.normal(size=(20000, 3))
    sphere = d / np.linalg.norm(d, axis=1, keepdims=True)
    sigma = 0.15 * 0.04  # the sphere's spacing is about 0.04
    pts = sphere + rng.normal(scale=sigma, size=sphere.shape)
    query = rng.choice(len(pts), 500, replace=False)
    out, changed = run_step(pts, sphere, query, sigma=sigma)
    assert not changed.any()
    assert np.allclose(out, sphere[query])
    plane, pn, _ = crease_cloud(3)
    keep = plane[:, 0] > 0.35  # face A alone, far from the edge
    q = np.arange(keep.sum())
    _, changed = run_step(plane[keep], pn[keep], q, sigma=SIGMA)
    assert not changed.any()


def test_gate_opens_only_under_light_noise() -> None:
    rng = np.random.default_rng(4)
    xy = rng.uniform(-1, 1, size=(20000, 2))
    flat = np.c_[xy, np.zeros(len(xy))]
    tree = cKDTree(flat)
    d, _ = tree.query(flat, k=9)
    h = float(np.median(d[:, 8]))
    s = CreaseSettings()
    sigmas = {}
    for rel in (0.0, 0.15, 1.0):
        pts = flat + rng.normal(scale=rel * h, size=flat.shape) * [0, 0, 1]
        dd, near = cKDTree(pts).query(pts, k=s.plane_k)
        _, _, res = local_planes(torch.from_numpy(pts), torch.from_numpy(near))
        sigmas[rel] = cloud_sigma(res, torch.from_numpy(dd[:, s.spacing_rank]), s)
    assert sigmas[0.0] is None  # noiseless: the snapping's job
    assert sigmas[1.0] is None  # noise as large as the spacing: the smoothing's
    assert sigmas[0.15] == pytest.approx(0.15 * h, rel=0.25)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivariant_under_rigid_motions_and_permutations(seed: int) -> None:
    pts, nrm, dist = crease_cloud(10 + seed)
    own = np.where(((dist > 3 * SIGMA) & (dist < 6 * SIGMA))[:, None], nrm[:, ::-1], nrm)
    query = np.nonzero(dist < 0.4)[0]
    out, changed = run_step(pts, own, query, sigma=SIGMA)
    assert changed.any()
    g = torch.Generator().manual_seed(seed)
    rot = random_rotation(g).numpy()
    if seed % 2:
        rot = rot @ np.diag([1.0, 1.0, -1.0])  # a reflection
    perm = np.random.default_rng(seed).permutation(len(pts))
    inv = np.argsort(perm)
    moved = (pts @ rot.T + np.array([3.0, -2.0, 5.0]))[perm]
    out2, changed2 = run_step(moved, (own @ rot.T)[perm], inv[query], sigma=SIGMA)
    assert np.array_equal(changed, changed2)
    assert angle_deg(out2, out @ rot.T).max() < 1e-4


def test_refuses_bad_inputs() -> None:
    p = torch.zeros(40, 3, dtype=torch.float64)
    n = torch.zeros(40, 3, dtype=torch.float64)
    sup = torch.zeros(5, 48, dtype=torch.long)
    with pytest.raises(ValueError, match="sigma"):
        crease_faces(p, n[:5], p, n, support=sup, sigma=0.0)
    with pytest.raises(ValueError, match="one row per query"):
        crease_faces(p, n[:4], p, n, support=sup, sigma=0.1)
    with pytest.raises(ValueError, match="shape"):
        crease_faces(p[:, :2], n[:5], p, n, support=sup, sigma=0.1)
    with pytest.raises(ValueError, match="near"):
        local_planes(p, sup[:, :2])
    with pytest.raises(ValueError, match="residual"):
        cloud_sigma(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="plane_k"):
        CreaseSettings(plane_k=2)


def test_pipeline_puts_edge_points_on_their_faces() -> None:
    """In ``estimate_normals(crease=True)`` on a lightly noisy cube the step changes some normals near the
    edges and, on those, cuts the error; a run over some queries gives them what the whole
    cloud's run does (the noise figure is the whole cloud's)."""
    from fapc.datasets import make_cloud, procedural_shapes
    from fapc.normals import estimate_normals

    cube = procedural_shapes(["cube"])[0]
    pts, nrm = make_cloud(cube, n=12_000, noise=0.005 / cube.diagonal, seed=3)
    runs = {}
    for on in (False, True):
        runs[on] = estimate_normals(pts, method="fa", device="cpu", crease=on).normals
    before, after = angle_deg(runs[False], nrm), angle_deg(runs[True], nrm)
    changed = np.abs(before - after) > 1e-3
    assert changed.sum() >= 20
    assert after[changed].mean() < 0.7 * before[changed].mean()
    q = np.nonzero(changed)[0][::3]
    part = estimate_normals(pts, method="fa", device="cpu", query_index=q, crease=True).normals
    assert angle_deg(part, runs[True][q]).max() < 1e-3


def test_cli_crease_flag_reaches_the_step(tmp_path) -> None:
    """``fapc normals --crease`` gives what ``estimate_normals(crease=True)`` gives."""
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.cloud import PointCloud
    from fapc.datasets import make_cloud, procedural_shapes
    from fapc.io import read_cloud, write_cloud
    from fapc.normals import estimate_normals

    cube = procedural_shapes(["cube"])[0]
    pts, _ = make_cloud(cube, n=8_000, noise=0.004 / cube.diagonal, seed=5)
    write_cloud(tmp_path / "part.ply", PointCloud(pts))
    r = CliRunner().invoke(app, ["normals", str(tmp_path / "part.ply"), "--crease",
                                 "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = read_cloud(tmp_path / "part.normals.ply").normals
    want = estimate_normals(pts, method="fa", device="cpu", crease=True).normals
    plain = estimate_normals(pts, method="fa", device="cpu").normals
    assert angle_deg(got, want).max() < 1e-3
    assert angle_deg(want, plain).max() > 1  # the step did change something here


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("small", [False, True])
def test_device_path_gives_the_cpu_path(device: str, small: bool) -> None:
    """The step through the torch grid kNN (the GPU pipeline, here also on the CPU) gives
    what the scipy pipeline gives; ``small``: a network whose near scale (16) is narrower
    than the step's first look (32), so the step searches its own neighbours."""
    from fapc.models.normal_net import NormalNet, NormalNetConfig
    from fapc.normals import estimate_normals

    model = None
    if small:
        torch.manual_seed(0)
        model = NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4)).eval()
    # a unit cube's faces sampled with numpy alone (the GPU host has no trimesh)
    rng = np.random.default_rng(6)
    face = rng.integers(0, 6, 8_000)
    pts = rng.uniform(-0.5, 0.5, (8_000, 3))
    pts[np.arange(8_000), face % 3] = np.where(face < 3, -0.5, 0.5)
    pts += rng.normal(scale=0.004, size=pts.shape)
    kw = {"method": "fa", "model": model, "crease": True}
    ref = estimate_normals(pts, device="cpu", knn="scipy", **kw).normals
    plain = estimate_normals(pts, device="cpu", knn="scipy", model=model).normals
    got = estimate_normals(pts, device=device, knn="torch", **kw).normals
    assert angle_deg(ref, plain).max() > 1  # the step ran
    err = angle_deg(ref, got)
    assert np.mean(err < 0.1) >= 0.999, np.sort(err)[-10:]
