"""Large clouds in tiles (`fapc.tiles`): the tiles partition the cloud whatever its pose, the
halo holds every point near a tile, and tiled normals are those of one run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg, sphere_points
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from fapc.cli import app
from fapc.cloud import PointCloud
from fapc.io import read_cloud, write_cloud
from fapc.normals import estimate_normals
from fapc.tiles import halo, plan_tiles


def _bumpy(n: int, seed: int = 0) -> np.ndarray:
    """A noisy bumpy sphere with a flat cut: curvature, an edge and noise, ``(n, 3)``."""
    rng = np.random.default_rng(seed)
    p = sphere_points(n, seed=seed)
    p *= (1 + 0.1 * np.sin(4 * p[:, :1]) * np.cos(3 * p[:, 1:2]))
    p[:, 2] = np.minimum(p[:, 2], 0.6)
    return p + rng.normal(scale=0.004, size=p.shape)


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unoriented angle (degrees) from the cross product: exact near zero, where arccos of a
    float32 dot product is off by up to 0.03 deg."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=1), np.abs((a * b).sum(1))))


def _sets(tiles) -> set[frozenset]:
    return {frozenset(t.own.tolist()) for t in tiles}


def test_tiles_partition_the_cloud():
    pts = _bumpy(5000)
    tiles = plan_tiles(pts, tile_points=700)
    own = np.concatenate([t.own for t in tiles])
    assert len(tiles) == 8  # 5000 -> 2500 -> 1250 -> 625 points each
    np.testing.assert_array_equal(np.sort(own), np.arange(len(pts)))  # each point once
    assert all(len(t.own) <= 700 for t in tiles)
    assert plan_tiles(pts, tile_points=len(pts))[0].own.tolist() == list(range(len(pts)))
    with pytest.raises(ValueError, match="tile_points"):
        plan_tiles(pts, tile_points=0)
    with pytest.raises(ValueError, match="shape"):
        plan_tiles(pts[:, :2], tile_points=10)


def test_tiles_do_not_depend_on_the_pose():
    pts = _bumpy(4000, seed=1)
    base = _sets(plan_tiles(pts, tile_points=600))
    rng = np.random.default_rng(2)
    for i in range(4):
        rot = Rotation.random(random_state=10 + i).as_matrix()
        if i % 2:
            rot = rot @ np.diag([1.0, 1.0, -1.0])  # a reflection
        moved = pts @ rot.T + rng.normal(scale=100.0, size=3)
        assert _sets(plan_tiles(moved, tile_points=600)) == base
    perm = rng.permutation(len(pts))  # the same sets, named by the new order
    back = {frozenset(perm[list(s)].tolist()) for s in _sets(plan_tiles(pts[perm], tile_points=600))}
    assert back == base


def test_halo_holds_every_point_within_the_margin():
    pts = _bumpy(3000, seed=3)
    margin = 0.15
    for tile in plan_tiles(pts, tile_points=800):
        ring = halo(pts, tile, margin)
        assert np.isin(tile.own, ring).all()
        near = cKDTree(pts[tile.own]).query(pts, k=1)[0] <= margin
        assert np.isin(np.flatnonzero(near), ring).all()
        assert len(ring) < len(pts)  # and it is a halo, not the cloud


def test_tiled_normals_are_those_of_one_run():
    pts = _bumpy(24000, seed=4)
    whole = estimate_normals(pts, device="cpu", tile_points=None)
    tiled = estimate_normals(pts, device="cpu", tile_points=6000)
    np.testing.assert_allclose(tiled.normals, whole.normals, atol=1e-6)
    np.testing.assert_allclose(tiled.confidence, whole.confidence, atol=1e-6)
    np.testing.assert_allclose(tiled.curvature, whole.curvature, atol=1e-6)
    # with a query subset (a tile's queries only), and NaN rows left out as in one run
    holed = pts.copy()
    holed[::997] = np.nan
    q = np.random.default_rng(5).choice(len(pts), 3000, replace=False)
    one = estimate_normals(holed, device="cpu", tile_points=None, query_index=q)
    part = estimate_normals(holed, device="cpu", tile_points=6000, query_index=q)
    np.testing.assert_array_equal(part.valid, one.valid)
    np.testing.assert_allclose(part.normals, one.normals, atol=1e-6)
    # a plain fit would not do: it must differ from PCA somewhere, or the test proves little
    pca = estimate_normals(pts, method="pca", k=30)
    assert angle_deg(pca.normals, whole.normals).max() > 5


def test_tiled_normals_are_equivariant():
    # rotations and translations: the shipped model's frames are SO(3)'s 4 elements, so a
    # mirrored cloud is not expected to give mirrored normals (see fapc.models.normal_net)
    pts = _bumpy(16000, seed=6)
    base = estimate_normals(pts, device="cpu", tile_points=5000).normals
    for seed in (7, 8):
        rot = Rotation.random(random_state=seed).as_matrix()
        moved = estimate_normals(pts @ rot.T + [3.0, -7.0, 50.0 * seed], device="cpu",
                                 tile_points=5000).normals
        err = _angle(moved, base @ rot.T)
        assert err.max() < 0.01, err.max()


def test_tiled_progress_counts_the_queries():
    pts = _bumpy(12000, seed=8)
    calls: list[tuple[int, int]] = []
    estimate_normals(pts, device="cpu", tile_points=4000, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (12000, 12000)
    assert all(t == 12000 for _, t in calls) and len(calls) > 4


def test_cli_tile_points(tmp_path):
    pts = _bumpy(9000, seed=9)
    write_cloud(tmp_path / "c.ply", PointCloud(points=pts))
    runner = CliRunner()
    for name, flag in (("one.ply", "0"), ("tiled.ply", "3000")):
        r = runner.invoke(app, ["normals", str(tmp_path / "c.ply"), "--tile-points", flag,
                                "-o", str(tmp_path / name)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    one, tiled = read_cloud(tmp_path / "one.ply"), read_cloud(tmp_path / "tiled.ply")
    np.testing.assert_allclose(tiled.normals, one.normals, atol=1e-6)
    for bad in ("-1", "10"):
        r = runner.invoke(app, ["normals", str(tmp_path / "c.ply"), "--tile-points", bad])
        assert r.exit_code == 2 and "--tile-points" in r.output
    with pytest.raises(ValueError, match="tile_points"):
        estimate_normals(pts, tile_points=10)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_tiles_on_the_device_path(device: str):
    # the torch-kNN path (the one CUDA takes; here also on the CPU): each tile's share of the
    # far subsample reaches TorchPatchBuilder too
    pts = _bumpy(8000, seed=10)
    whole = estimate_normals(pts, device=device, knn="torch", tile_points=None)
    tiled = estimate_normals(pts, device=device, knn="torch", tile_points=3000)
    err = _angle(tiled.normals, whole.normals)
    assert np.mean(err < 1e-3) >= 0.999, np.sort(err)[-5:]


def test_tiles_with_the_optional_steps():
    # the light smoothing adds a consensus hop and the crease step reads 48 neighbours: the
    # halo covers both
    pts = _bumpy(12000, seed=11)
    pts += np.random.default_rng(12).normal(scale=0.002, size=pts.shape)
    opts = {"device": "cpu", "light_smoothing": True, "crease": True}
    whole = estimate_normals(pts, tile_points=None, **opts)
    tiled = estimate_normals(pts, tile_points=4000, **opts)
    np.testing.assert_allclose(tiled.normals, whole.normals, atol=1e-6)
    plain = estimate_normals(pts, device="cpu", tile_points=None)
    assert _angle(whole.normals, plain.normals).max() > 0.5  # the steps ran


def test_tiles_where_the_density_falls_with_range():
    """A terrestrial scan's density falls as 1/range^2 (here 300-fold from 2 m to 40 m); each
    tile's halo, set by that tile's sparser points, still covers what its answers read."""
    rng = np.random.default_rng(13)
    az, el = rng.uniform(-np.pi, np.pi, 24000), rng.uniform(-0.6, -0.02, 24000)
    rays = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], 1)
    pts = rays * (-1.5 / rays[:, 2:])  # onto the ground, 1.5 m below the scanner
    pts = pts[np.linalg.norm(pts[:, :2], axis=1) < 40]
    pts[:, 2] += 0.05 * np.sin(pts[:, 0]) * np.cos(0.7 * pts[:, 1])
    pts += rng.normal(scale=0.003, size=pts.shape)
    whole = estimate_normals(pts, device="cpu", tile_points=None).normals
    tiled = estimate_normals(pts, device="cpu", tile_points=5000).normals
    assert _angle(tiled, whole).max() < 1e-3
