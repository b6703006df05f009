"""The exact planes (:mod:`fapc.exact`): on a cloud sampled without noise from a mesh each
normal becomes its facet's; noisy clouds and smooth surfaces are left alone; the result
moves with the cloud; float32 coordinates are covered by their rounding; it reaches the
pipeline, the tiles and the CLI (the model's choice, on noiseless clouds without scan lines
only, shares the plane vote's gate test in ``test_plane_vote``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import angle_deg
from scipy.spatial import cKDTree
from test_light_smoothing import cube_surface
from test_plane_vote import near_edge, rmse, tilt

from fapc.exact import ExactSettings, coordinate_resolution, exact_planes, facet_planes
from fapc.models.checkpoint import load_model
from fapc.models.normal_net import NormalNet
from fapc.normals import estimate_normals
from fapc.testing import random_rotation


def planes(pts: np.ndarray, nrm: np.ndarray, *, resolution: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray]:
    """The step at every point (support: the 48 nearest, the point first)."""
    _, idx = cKDTree(pts).query(pts, k=48)
    p = torch.from_numpy(pts)
    out, changed = exact_planes(p, torch.from_numpy(nrm), query=torch.arange(len(p)),
                                support=torch.from_numpy(idx), resolution=resolution)
    return out.numpy(), changed.numpy()


def sphere(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, v.copy()


def test_each_point_takes_its_facets_normal() -> None:
    pts, gt = cube_surface(20000, seed=1)
    bent = tilt(gt, pts, within=0.02, deg=40.0, seed=2)  # wrong at the edges, jittered on faces
    out, changed = planes(pts, bent)
    assert changed.mean() > 0.97
    on_line = near_edge(pts, 1e-6)  # on the crease line both faces hold the point
    assert angle_deg(out[~on_line], gt[~on_line]).max() < 1e-6
    assert rmse(angle_deg(bent, gt)) > 5
    # with a least change: the normals 40 deg off come back, those 0.05 deg off stay
    _, idx = cKDTree(pts).query(pts, k=48)
    kept, kept_changed = exact_planes(torch.from_numpy(pts), torch.from_numpy(bent),
                                      query=torch.arange(len(pts)),
                                      support=torch.from_numpy(idx),
                                      settings=ExactSettings(min_change=10.0))
    off = angle_deg(bent, gt) > 10.0
    np.testing.assert_array_equal(kept_changed.numpy(), changed & off)
    np.testing.assert_array_equal(kept.numpy()[~off], bent[~off])
    edge = off & ~on_line
    assert angle_deg(kept.numpy()[edge], gt[edge]).max() < 1e-6


def test_a_point_without_planes_of_its_own_takes_the_facet_that_holds_it() -> None:
    """The hop: where a query's own planes find nothing, the planes of its support points'
    facets that hold it give its normal (the other face's, at an edge, do not hold it)."""
    pts, gt = cube_surface(20000, seed=21)
    _, idx = cKDTree(pts).query(pts, k=48)
    p, sup, every = torch.from_numpy(pts), torch.from_numpy(idx), torch.arange(len(pts))
    planes, counts = facet_planes(p, query=every, support=sup)
    assert (counts > 0).float().mean() > 0.99
    q = torch.from_numpy(np.flatnonzero(near_edge(pts, 0.01)))  # near an edge
    blind = counts.clone()
    blind[q] = 0  # as if their own planes found nothing
    bent = torch.from_numpy(tilt(gt, pts, within=0.02, deg=40.0, seed=22))
    out, changed = exact_planes(p, bent[q], query=q, support=sup[q], planes=planes,
                                counts=blind)
    assert changed.float().mean() > 0.95
    on_line = near_edge(pts[q.numpy()], 1e-6)
    err = angle_deg(out.numpy()[~on_line], gt[q.numpy()][~on_line])
    assert err.max() < 1e-6, err.max()
    alone, alone_changed = exact_planes(p, bent[q], query=q, support=sup[q])
    assert torch.equal(alone_changed, counts[q] > 0)  # without the tables: its own planes


def test_noisy_clouds_and_smooth_surfaces_are_left_alone() -> None:
    """A fourth point within 1e-6 spacings of some plane through a query happens by chance
    at several percent of these queries; a fifth, or a fourth within 1e-9, hardly ever."""
    pts, gt = cube_surface(20000, seed=3)
    noisy = pts + 0.0005 * np.random.default_rng(4).normal(size=pts.shape)
    bent = tilt(gt, pts, within=0.02, deg=30.0, seed=5)
    out, changed = planes(noisy, bent)
    assert changed.mean() < 0.002
    np.testing.assert_array_equal(out[~changed], bent[~changed])
    ball, n = sphere(20000, seed=6)  # an analytic surface: no four points coplanar
    out, changed = planes(ball, n)
    assert changed.mean() < 0.002
    loose = ExactSettings(min_inliers=4)  # a fourth point within 1e-6 spacings is enough
    _, idx = cKDTree(ball).query(ball, k=48)
    _, chance = exact_planes(torch.from_numpy(ball), torch.from_numpy(n),
                             query=torch.arange(len(ball)), support=torch.from_numpy(idx),
                             settings=loose)
    assert chance.float().mean() > 0.02


@pytest.mark.parametrize("seed", [0, 1])
def test_the_result_moves_with_the_cloud(seed: int) -> None:
    """float64, seeded rotations (and, for seed 1, a reflection), translations and
    permutations."""
    pts, gt = cube_surface(8000, seed=seed)
    bent = tilt(gt, pts, within=0.03, deg=25.0, seed=7 + seed)
    out, changed = planes(pts, bent)
    r = random_rotation(torch.Generator().manual_seed(11 + seed), reflect=bool(seed)).numpy()
    perm = np.random.default_rng(seed + 2).permutation(len(pts))
    moved, moved_changed = planes(pts[perm] @ r.T + [3.0, -1.0, 2.0], bent[perm] @ r.T)
    np.testing.assert_array_equal(moved_changed, changed[perm])
    expect = out[perm] @ r.T
    sign = np.sign((moved * expect).sum(1, keepdims=True))
    assert np.abs(moved - sign * expect).max() < 1e-9
    assert changed.mean() > 0.9


def test_float32_coordinates_are_covered_by_their_rounding() -> None:
    pts, gt = cube_surface(20000, seed=8)
    r = random_rotation(torch.Generator().manual_seed(3)).numpy()  # faces off the axes
    world = ((pts * 40.0) @ r.T + [250.0, -90.0, 12.0]).astype(np.float32).astype(np.float64)
    bent = tilt(gt, pts, within=0.02, deg=30.0, seed=9) @ r.T
    res = coordinate_resolution(world)
    assert 0 < res < 1e-4 and coordinate_resolution(world.astype(np.float32)) == res
    assert coordinate_resolution(world + 1e-9) == 0.0  # not float32: taken as exact
    strict, _ = planes(world, bent)
    out, changed = planes(world, bent, resolution=res)
    assert changed.mean() > 0.95
    on_line, truth = near_edge(pts, 1e-3), gt @ r.T
    assert rmse(angle_deg(out[~on_line], truth[~on_line])) < 0.01
    # without it the rounding breaks the facets' planes: chance planes take over
    assert rmse(angle_deg(strict[~on_line], truth[~on_line])) > 0.3


def test_refuses_bad_inputs() -> None:
    p = torch.zeros(40, 3, dtype=torch.float64)
    q = torch.arange(5)
    sup = torch.zeros(5, 48, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        exact_planes(p[:, :2], p[:5], query=q, support=sup)
    with pytest.raises(ValueError, match="normals"):
        exact_planes(p, p[:4], query=q, support=sup)
    with pytest.raises(ValueError, match="support"):
        exact_planes(p, p[:5], query=q, support=sup[:, :20])
    with pytest.raises(ValueError, match="resolution"):
        exact_planes(p, p[:5], query=q, support=sup, resolution=-1.0)
    with pytest.raises(ValueError, match="pair_k"):
        ExactSettings(pair_k=60)
    with pytest.raises(ValueError, match="tol"):
        ExactSettings(tol_tight=1e-3)
    with pytest.raises(ValueError, match="min_change"):
        ExactSettings(min_change=90.0)


def _copy(base: NormalNet, on: bool, *, min_change: float = 0.0) -> NormalNet:
    net = NormalNet(replace(base.config, clean_exact=on, exact_min_change=min_change))
    net.load_state_dict(base.state_dict())
    return net.eval()


def test_the_pipeline_gains_on_a_noiseless_cube_and_queries_agree() -> None:
    pts, gt = cube_surface(6000, seed=6)
    one = {"device": "cpu", "draws": 1}
    on = estimate_normals(pts, exact_planes=True, **one).normals
    off = estimate_normals(pts, exact_planes=False, **one).normals
    e_on, e_off = rmse(angle_deg(on, gt)), rmse(angle_deg(off, gt))
    assert e_on < 0.5 * e_off and e_on < 0.5, (e_off, e_on)
    q = np.random.default_rng(8).choice(len(pts), 300, replace=False)
    part = estimate_normals(pts, query_index=q, exact_planes=True, **one).normals
    assert angle_deg(part, on[q]).max() < 1e-4
    # the model's own choice: a noiseless cloud without scan lines, where the model sets it
    base = load_model(None)[0]
    np.testing.assert_array_equal(
        estimate_normals(pts, model=_copy(base, True), **one).normals, on)
    np.testing.assert_array_equal(
        estimate_normals(pts, model=_copy(base, False), **one).normals, off)
    # a model's least change applies to its own choice only; forced, every change is made
    least = _copy(base, True, min_change=15.0)
    small = estimate_normals(pts, model=least, **one).normals
    moved = angle_deg(on, off) > 15.0
    assert 0 < moved.sum() < len(pts)
    np.testing.assert_array_equal(small[~moved], off[~moved])
    assert angle_deg(small[moved], on[moved]).max() < 1e-4
    np.testing.assert_array_equal(
        estimate_normals(pts, model=least, exact_planes=True, **one).normals, on)
    # float32 input: the same planes, within the rounding
    f32 = estimate_normals(pts.astype(np.float32), exact_planes=True, **one).normals
    assert rmse(angle_deg(f32, gt)) < 0.5
    # the CUDA path's neighbour search (torch), here on the CPU
    torch_knn = estimate_normals(pts, exact_planes=True, knn="torch", **one).normals
    assert rmse(angle_deg(torch_knn, gt)) < 0.5


def test_tiles_agree_with_one_run() -> None:
    pts, _ = cube_surface(8000, seed=12)
    one = {"device": "cpu", "draws": 1, "exact_planes": True}
    whole = estimate_normals(pts, tile_points=None, **one).normals
    tiled = estimate_normals(pts, tile_points=3000, **one).normals
    assert angle_deg(tiled, whole).max() < 1e-3


def test_cli_flags(tmp_path) -> None:
    """``fapc normals --exact-planes`` gives what ``estimate_normals(exact_planes=True)``
    gives on a float32 PLY; ``--no-exact-planes`` what it gives without."""
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.io import PointCloud, read_cloud, write_cloud

    pts, gt = cube_surface(3000, seed=13)
    pts = pts.astype(np.float32)
    write_cloud(tmp_path / "c.ply", PointCloud(pts))
    runner = CliRunner()
    for flag, on in (("--exact-planes", True), ("--no-exact-planes", False)):
        out = tmp_path / f"{on}.ply"
        r = runner.invoke(app, ["normals", str(tmp_path / "c.ply"), "-o", str(out),
                                "--device", "cpu", flag])
        assert r.exit_code == 0, r.output
        want = estimate_normals(pts.astype(np.float64), device="cpu", exact_planes=on).normals
        assert angle_deg(read_cloud(out).normals, want).max() < 1e-3
    got_on = read_cloud(tmp_path / "True.ply").normals
    got_off = read_cloud(tmp_path / "False.ply").normals
    assert rmse(angle_deg(got_on, gt)) < rmse(angle_deg(got_off, gt))
