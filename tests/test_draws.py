"""Draws of the far scale (`fapc.fa_run.fa_normals(draws=...)`): each draw is one whole run
with its own far subsample, the near search shared; the normals are averaged as `n n^T`, so
the result is that of separate runs combined, whatever the pose, in tiles or not; the model
chooses how many by the cloud's noise figure; they lower the error under heavy noise and
at the edges of a noiseless cloud."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import plane_points, sphere_points
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from fapc.cli import app
from fapc.fa_run import fa_normals
from fapc.models.checkpoint import load_model
from fapc.models.normal_net import NormalNet
from fapc.normals import estimate_normals
from fapc.patches import PatchBuilder, builder_with_far_index, far_subsample

CPU = torch.device("cpu")


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unoriented angle (degrees) from the cross product (exact near zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=1), np.abs((a * b).sum(1))))


def _with_draws(draws: int, clean: int = 0) -> NormalNet:
    """The shipped weights, averaging ``draws`` draws on heavily noisy clouds and ``clean``
    on noiseless ones."""
    base = load_model(None)[0]
    net = NormalNet(replace(base.config, heavy_draws=draws, clean_draws=clean))
    net.load_state_dict(base.state_dict())
    return net.eval()


def _noisy_sphere(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(n, 3)`` on the unit sphere with Gaussian noise, and the exact normals."""
    gt = sphere_points(n, seed=seed)
    return gt + np.random.default_rng(seed + 1).normal(scale=noise, size=gt.shape), gt


def _combined(runs: list[np.ndarray]) -> np.ndarray:
    """The top eigenvector of the runs' summed ``n n^T``, in float64 numpy."""
    m = sum(n[:, :, None] * n[:, None] for n in (r.astype(np.float64) for r in runs))
    return np.linalg.eigh(m)[1][:, :, -1]


def test_another_far_draw_shares_the_near_search_and_builds_the_same_patches():
    pts, _ = _noisy_sphere(3000, 0.01)
    pts = pts - pts.mean(0)
    spec = load_model(None)[0].config.patch
    base = PatchBuilder(pts, spec, seed=0)
    far = far_subsample(len(pts), spec, 5)
    other = builder_with_far_index(base, far)
    assert other.tree is base.tree and other.near_all is base.near_all  # shared
    fresh = PatchBuilder(pts, spec, seed=5)
    q = np.arange(0, 3000, 7)
    for a, b in zip(other.patches(q), fresh.patches(q), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(base.patches(q)[2], fresh.patches(q)[2])  # another draw
    with pytest.raises(ValueError, match="far_index"):
        builder_with_far_index(base, far[:5])


def test_draws_are_separate_runs_combined_as_n_nT():
    pts, _ = _noisy_sphere(3000, 0.03, seed=3)
    pts = pts - pts.mean(0)
    net = load_model(None)[0]
    runs = [fa_normals(pts, net, device=CPU, seed=s)[0] for s in (0, 1)]
    got, conf, curv = fa_normals(pts, net, device=CPU, draws=2)
    assert _angle(got, _combined(runs)).max() < 1e-3
    assert _angle(runs[0], runs[1]).max() > 0.1  # the draws do differ
    one = fa_normals(pts, net, device=CPU)
    np.testing.assert_array_equal(fa_normals(pts, net, device=CPU, draws=1)[0], one[0])
    assert conf.shape == curv.shape == (len(pts),) and 0 <= conf.min() and conf.max() <= 1
    # at query points (the consensus step's hops each draw's own)
    q = np.arange(0, 3000, 97)
    at = fa_normals(pts, net, device=CPU, draws=2, query_index=q)[0]
    assert _angle(at, got[q]).max() < 1e-3
    with pytest.raises(ValueError, match="draws"):
        fa_normals(pts, net, device=CPU, draws=0)
    with pytest.raises(ValueError, match="far_index"):
        fa_normals(pts, net, device=CPU, draws=2, far_index=np.arange(500))


def test_draws_lower_the_error_under_heavy_noise():
    pts, gt = _noisy_sphere(12_000, 0.03, seed=4)  # about half the point spacing
    # without the plane vote, which on a cube's right-angled edges leaves one draw nearly
    # exact (its draws, each snapped to a face, can only disagree)
    one = estimate_normals(pts, device="cpu", draws=1, plane_vote=False).normals
    four = estimate_normals(pts, device="cpu", draws=4, plane_vote=False).normals
    rmse = [float(np.sqrt(np.mean(_angle(n, gt) ** 2))) for n in (one, four)]
    assert rmse[1] < rmse[0] - 0.05, rmse


def test_draws_lower_the_error_at_the_edges_of_a_noiseless_cube():
    from test_consensus import cube_surface

    pts, gt = cube_surface(12_000, seed=11)  # sampled faces, exact normals: reads noiseless
    # without the plane vote, which on a cube's right-angled edges leaves one draw nearly
    # exact (its draws, each snapped to a face, can only disagree)
    one = estimate_normals(pts, device="cpu", draws=1, plane_vote=False).normals
    four = estimate_normals(pts, device="cpu", draws=4, plane_vote=False).normals
    rmse = [float(np.sqrt(np.mean(_angle(n, gt) ** 2))) for n in (one, four)]
    assert rmse[1] < rmse[0] - 0.1, rmse


def test_draws_do_not_depend_on_the_pose_and_agree_in_tiles():
    pts, _ = _noisy_sphere(3000, 0.03, seed=6)
    base = estimate_normals(pts, device="cpu", draws=2).normals
    rot = Rotation.random(random_state=7).as_matrix()
    moved = estimate_normals(pts @ rot.T + np.array([40.0, -3.0, 7.0]), device="cpu",
                             draws=2).normals
    assert np.median(_angle(moved, base @ rot.T)) < 1e-3
    assert np.mean(_angle(moved, base @ rot.T) < 0.01) > 0.999
    tiled = estimate_normals(pts, device="cpu", draws=2, tile_points=1000).normals
    assert np.mean(_angle(tiled, base) < 1e-3) > 0.999


def test_the_model_chooses_its_draws_on_heavily_noisy_and_noiseless_clouds_not_light_ones():
    from fapc.near_scale import choices_for
    from fapc.noise import noise_figure

    net = _with_draws(2)
    clean = plane_points(4000, seed=8)
    rng = np.random.default_rng(9)
    light = clean + np.column_stack([np.zeros((4000, 2)), rng.normal(scale=0.003, size=4000)])
    heavy = clean + np.column_stack([np.zeros((4000, 2)), rng.normal(scale=0.04, size=4000)])
    assert [noise_figure(p).level for p in (clean, light, heavy)] == ["none", "light", "heavy"]
    assert [choices_for(p, net).draws for p in (clean, light, heavy)] == [1, 1, 2]
    assert choices_for(heavy, _with_draws(0)).draws == 1  # off in the model
    both = _with_draws(2, clean=3)
    assert [choices_for(p, both).draws for p in (clean, light, heavy)] == [3, 1, 2]
    only = NormalNet(replace(both.config, clean_k_near=0, edge_k_near=0, light_whiteness=0.0,
                             heavy_draws=0))  # the clean draws alone still take the figure
    assert [choices_for(p, only).draws for p in (clean, heavy)] == [3, 1]
    rot = Rotation.random(random_state=9).as_matrix()
    assert choices_for(heavy @ rot.T - 20.0, net).draws == 2  # distances only
    assert choices_for(clean @ rot.T + 5.0, both).draws == 3
    # None (the default) follows the model; a number overrides it
    auto = estimate_normals(heavy, model=net, device="cpu").normals
    forced = estimate_normals(heavy, model=net, device="cpu", draws=2).normals
    single = estimate_normals(heavy, model=net, device="cpu", draws=1).normals
    np.testing.assert_array_equal(auto, forced)
    assert _angle(auto, single).max() > 0.01
    with pytest.raises(ValueError, match="draws"):
        estimate_normals(heavy, device="cpu", draws=0)


def test_cli_draws(tmp_path):
    from fapc.cloud import PointCloud
    from fapc.io import read_cloud, write_cloud

    pts, _ = _noisy_sphere(2000, 0.03, seed=10)
    src = tmp_path / "s.ply"
    write_cloud(src, PointCloud(points=pts.astype(np.float32)))
    r = CliRunner().invoke(app, ["normals", str(src), "--draws", "2", "-o", str(tmp_path / "o.ply")])
    assert r.exit_code == 0, r.output
    want = estimate_normals(read_cloud(src).points, device="cpu", draws=2).normals
    assert _angle(read_cloud(tmp_path / "o.ply").normals, want).max() < 1e-3
    r = CliRunner().invoke(app, ["normals", str(src), "--draws", "0", "-o", str(tmp_path / "x.ply")])
    assert r.exit_code == 2 and "--draws" in r.output
    assert not (tmp_path / "x.ply").exists()
    r = CliRunner().invoke(app, ["normals", str(src), "--method", "pca", "--draws", "2",
                                 "-o", str(tmp_path / "p.ply")])
    assert r.exit_code == 0 and "--draws: only with --method fa" in r.stderr


def test_fapc_bench_times_the_draws_fapc_normals_runs(tmp_path):
    from fapc.cloud import PointCloud
    from fapc.io import read_cloud, write_cloud
    from fapc.profile import profile_file

    pts, _ = _noisy_sphere(3000, 0.04, seed=11)  # reads heavy: the shipped model's draws
    write_cloud(tmp_path / "h.ply", PointCloud(points=pts.astype(np.float32)))
    profile_file(str(tmp_path / "h.ply"), out_path=str(tmp_path / "p.ply"))
    want = estimate_normals(read_cloud(tmp_path / "h.ply").points, device="cpu").normals
    one = estimate_normals(read_cloud(tmp_path / "h.ply").points, device="cpu", draws=1).normals
    got = read_cloud(tmp_path / "p.ply").normals
    assert _angle(got, want).max() < 1e-3 and _angle(got, one).max() > 0.01
