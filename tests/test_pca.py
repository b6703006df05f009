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


def test_distinct_points_first_occurrences_in_order_and_pose_independent():
    from fapc.neighbors import distinct_points

    rng = np.random.default_rng(3)
    pts = rng.normal(size=(200, 3))
    assert distinct_points(pts) is None
    order = rng.integers(0, 200, 500)  # (500,) with repeats
    first, inverse = distinct_points(pts[order])
    assert np.all(np.diff(first) > 0)  # the input's order
    np.testing.assert_array_equal(pts[order][first][inverse], pts[order])
    assert len(first) == len(np.unique(order))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # a rotation or reflection, and a shift
    moved = distinct_points(pts[order] @ q.T + 5.0)
    np.testing.assert_array_equal(moved[0], first)
    np.testing.assert_array_equal(moved[1], inverse)


def test_distinct_points_survives_hash_collisions(monkeypatch):
    import fapc.neighbors as nb

    rng = np.random.default_rng(5)
    pts = rng.normal(size=(300, 3))
    order = rng.integers(0, 300, 700)
    want = nb.distinct_points(pts[order])
    monkeypatch.setattr(nb, "_mix", lambda x: x & np.uint64(7))  # (N,) few hash values
    assert nb.distinct_points(pts) is None  # every hash repeats, no point does
    got = nb.distinct_points(pts[order])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_exact_duplicates_are_estimated_once_for_both_methods():
    pts = sphere_points(2000, seed=4)
    src = np.random.default_rng(4).integers(0, 2000, 6000)
    copies = np.concatenate([pts, pts[src]])  # (8000, 3): on average 3 more of each point
    for method in ("pca", "fa"):
        alone = estimate_normals(pts, method=method, device="cpu")
        res = estimate_normals(copies, method=method, device="cpu")
        # the first 2,000 rows are the distinct points in order: the same run as without copies
        np.testing.assert_array_equal(res.normals[:2000], alone.normals)
        np.testing.assert_array_equal(res.confidence[:2000], alone.confidence)
        np.testing.assert_array_equal(res.normals[2000:], alone.normals[src])
        np.testing.assert_array_equal(res.curvature[2000:], alone.curvature[src])
        qi = np.array([2000, 5, 7999, 5])  # a query subset, with a repeat, copies among them
        sub = estimate_normals(copies, method=method, device="cpu", query_index=qi)
        assert np.all(np.abs((sub.normals * res.normals[qi]).sum(1)) > 1 - 1e-6)
