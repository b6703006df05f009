"""The PCA baseline: accuracy on exact surfaces and float64 centring of georeferenced clouds."""

from __future__ import annotations

import numpy as np
from conftest import angle_deg, plane_points, sphere_points

from fapc import estimate_normals
from fapc.cloud import PointCloud


def test_pca_noiseless_sphere_and_plane_under_half_a_degree():
    pts = sphere_points(50_000, seed=1)
    res = estimate_normals(pts, method="pca", k=30)
    err = angle_deg(res.normals, pts)
    rmse = np.sqrt(np.mean(err**2))
    assert rmse < 0.5 and np.percentile(err, 95) < 0.5, (rmse, np.percentile(err, 95))
    plane = plane_points(20_000, seed=2)
    res = estimate_normals(plane, method="pca", k=30)
    assert angle_deg(res.normals, np.tile([0, 0, 1.0], (len(plane), 1))).max() < 0.5
    assert res.confidence.min() > 0.5 and res.curvature.max() < 1e-6


def test_georeferenced_cloud_gets_the_same_normals():
    rng = np.random.default_rng(5)
    pts = sphere_points(20_000, seed=5) * 10 + rng.normal(scale=0.05, size=(20_000, 3))
    shifted = pts + np.array([5e5, 4e6, 100.0])
    a = estimate_normals(pts, method="pca", k=30).normals
    b = estimate_normals(shifted, method="pca", k=30).normals
    assert np.median(angle_deg(a, b)) < 0.01
    # float32 coordinates at that offset would have lost the shape: the test can fail
    c = estimate_normals(shifted.astype(np.float32).astype(np.float64), method="pca", k=30).normals
    assert np.median(angle_deg(a, c)) > 0.01


def test_accepts_pointcloud_and_open3d_and_confidence_range():
    import open3d as o3d  # the install step must make open3d importable

    pts = sphere_points(2000, seed=0)
    r1 = estimate_normals(PointCloud(points=pts), method="pca", k=20)
    r2 = estimate_normals(o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts)), method="pca",
                          k=20)
    np.testing.assert_allclose(np.abs((r1.normals * r2.normals).sum(1)), 1, atol=1e-5)
    assert (r1.confidence >= 0).all() and (r1.confidence <= 1).all()


def test_georeferenced_cloud_same_normals_with_the_fa_network():
    import torch

    from fapc.models.normal_net import NormalNet, NormalNetConfig

    torch.manual_seed(0)
    model = NormalNet(NormalNetConfig(k_near=16, k_far=16, far_stride=4)).eval()
    rng = np.random.default_rng(6)
    pts = sphere_points(8000, seed=6) * 10 + rng.normal(scale=0.05, size=(8000, 3))
    a = estimate_normals(pts, method="fa", model=model, device="cpu").normals
    b = estimate_normals(pts + np.array([5e5, 4e6, 100.0]), method="fa", model=model,
                         device="cpu").normals
    assert np.median(angle_deg(a, b)) < 0.01
