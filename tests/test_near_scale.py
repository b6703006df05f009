"""``k`` for the FA network: the near scale of its patch (``estimate_normals(k=...)``,
``fapc normals --k``), with the same weights and the same equivariance."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import angle_deg, sphere_points
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from fapc.cli import app
from fapc.cloud import PointCloud
from fapc.io import read_cloud, write_cloud
from fapc.models.checkpoint import cached_model, load_model
from fapc.near_scale import FA_K_RANGE, near_scale_for, with_near_scale
from fapc.normals import estimate_normals


def _noisy_sphere(n: int, seed: int, noise: float) -> np.ndarray:
    return sphere_points(n, seed=seed) + np.random.default_rng(seed + 1).normal(
        scale=noise, size=(n, 3))


def test_k_sets_the_near_scale_and_leaves_the_shipped_model_alone():
    pts = _noisy_sphere(3000, seed=0, noise=0.01)
    # an explicit k, the shipped model's own k_near: the default without its choices of scale
    default = estimate_normals(pts, device="cpu", model=_with_clean_scale(0)).normals
    own = estimate_normals(pts, device="cpu", k=32, light_smoothing=False).normals
    np.testing.assert_array_equal(own, default)
    k16 = estimate_normals(pts, device="cpu", k=16, light_smoothing=False).normals
    assert angle_deg(k16, default).max() > 0.01  # a different patch, different normals
    net16 = _with_clean_scale(0).with_near_scale(16)  # no choice of scale left to it
    assert net16.config.k_near == 16 and net16.config.k_far == 32
    np.testing.assert_array_equal(estimate_normals(pts, device="cpu", model=net16).normals, k16)
    assert cached_model(None, "cpu")[0].config.k_near == 32  # the cached model is not changed


def test_a_larger_near_scale_averages_more_noise_on_a_smooth_surface():
    pts = _noisy_sphere(6000, seed=2, noise=0.02)  # noise ~ 0.4 point spacings
    gt = pts / np.linalg.norm(pts, axis=1, keepdims=True)

    def rmse(k: int) -> float:
        n = estimate_normals(pts, device="cpu", k=k).normals
        return float(np.sqrt(np.mean(angle_deg(n, gt) ** 2)))

    assert rmse(96) < rmse(12)


def test_near_scale_keeps_the_normals_equivariant():
    pts = _noisy_sphere(4000, seed=4, noise=0.005) * [1.0, 0.8, 0.6]
    base = estimate_normals(pts, device="cpu", k=48).normals
    # rotations and translations (the far scale's subsample is seeded by point index, so a
    # permuted cloud gets another subsample: not covered here)
    for seed in (5, 6):
        rot = Rotation.random(random_state=seed).as_matrix()
        moved = estimate_normals(pts @ rot.T + [4.0, -2.0, 9.0 * seed], device="cpu",
                                 k=48).normals
        # float32 patches: the default k moves this cloud's normals by up to 0.015 deg too
        assert angle_deg(moved, base @ rot.T).max() < 0.05


@pytest.mark.parametrize("k", [FA_K_RANGE[0] - 1, FA_K_RANGE[1] + 1])
def test_near_scale_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="near scale"):
        estimate_normals(sphere_points(500), device="cpu", k=k)
    with pytest.raises(ValueError, match="at least 3"):
        estimate_normals(sphere_points(500), method="pca", k=2)


def test_a_whole_shape_model_has_no_near_scale():
    from fapc.models.shape_net import ShapeNetConfig, ShapeNormalNet

    with pytest.raises(ValueError, match="no near scale|has none"):
        with_near_scale(ShapeNormalNet(ShapeNetConfig(widths=(8, 8, 8), head=(8,))), 16)


def test_cli_k_for_fa(tmp_path):
    pts = _noisy_sphere(2500, seed=7, noise=0.01)
    write_cloud(tmp_path / "s.ply", PointCloud(points=pts))
    runner = CliRunner()
    r = runner.invoke(app, ["normals", str(tmp_path / "s.ply"), "-o", str(tmp_path / "o.ply"),
                            "--k", "200"], catch_exceptions=False)
    assert r.exit_code == 2 and "--k" in r.stderr and "8..128" in r.stderr
    assert not (tmp_path / "o.ply").exists()
    r = runner.invoke(app, ["normals", str(tmp_path / "s.ply"), "-o", str(tmp_path / "o.ply"),
                            "--k", "20", "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = read_cloud(tmp_path / "o.ply").normals
    want = estimate_normals(pts, device="cpu", k=20).normals
    assert angle_deg(got, want).max() < 1e-3
    assert angle_deg(got, estimate_normals(pts, device="cpu").normals).max() > 0.01


def _with_clean_scale(k: int):
    from dataclasses import replace

    from fapc.models.normal_net import NormalNet

    base = load_model(None)[0]
    # no edge scale, no light smoothing, no draws and no plane vote of its own choosing
    net = NormalNet(replace(base.config, clean_k_near=k, edge_k_near=0, light_whiteness=0.0,
                            heavy_draws=0, clean_draws=0, clean_vote=False))
    net.load_state_dict(base.state_dict())
    return net.eval()


def test_a_noiseless_cloud_runs_at_the_clean_near_scale_a_noisy_one_at_the_trained_one():
    from test_consensus import cube_surface

    net = _with_clean_scale(16)
    clean, _ = cube_surface(6000, seed=11)
    noisy = clean + np.random.default_rng(12).normal(scale=0.004, size=clean.shape)
    assert near_scale_for(clean, net) == 16 and near_scale_for(noisy, net) == 32
    for pts, k in ((clean, 16), (noisy, 32)):
        got = estimate_normals(pts, device="cpu", model=net).normals
        # (the shipped model would choose the light smoothing on the noisy cube: not this one)
        np.testing.assert_array_equal(got, estimate_normals(pts, device="cpu", k=k, draws=1,
                                                            light_smoothing=False,
                                                            plane_vote=False).normals)
    # an explicit k wins over the choice
    np.testing.assert_array_equal(estimate_normals(clean, device="cpu", model=net, k=32).normals,
                                  estimate_normals(clean, device="cpu",
                                                   model=_with_clean_scale(0)).normals)


def test_the_choice_does_not_depend_on_the_pose_and_a_large_cloud_is_judged_on_a_block(
        monkeypatch):
    from test_consensus import cube_surface

    import fapc.near_scale as ns

    net = _with_clean_scale(20)
    clean, _ = cube_surface(20000, seed=13)
    noisy = clean + np.random.default_rng(14).normal(scale=0.003, size=clean.shape)
    rot = Rotation.random(random_state=15).as_matrix()
    for pts, k in ((clean, 20), (noisy, 32)):
        assert near_scale_for(pts @ rot.T + 100.0, net) == k
        monkeypatch.setattr(ns, "FIGURE_POINTS", 5000)  # a block of 5,000 of the 20,000
        assert near_scale_for(pts @ rot.T, net) == k
        monkeypatch.undo()
    # a model with no clean scale never looks at the noise
    monkeypatch.setattr("fapc.noise.noise_figure", lambda *a, **k: pytest.fail("looked"))
    assert near_scale_for(clean, _with_clean_scale(0)) == 32


def test_a_noiseless_cloud_sampled_along_scan_lines_keeps_the_trained_scale():
    from fapc.noise import noise_figure

    # a noiseless wavy sheet scanned in 80 lines of 400 points, the lines farther apart with
    # range (as a scanner's): where they are far apart, nearest points lie along one line
    u, v = np.meshgrid(np.linspace(0, 1, 400), np.linspace(0, 1, 80) ** 2)
    lines = np.column_stack([u.ravel(), v.ravel(), 0.05 * np.sin(6 * u.ravel())])
    rng = np.random.default_rng(16)
    uniform = rng.uniform(0, 1, (16000, 2))
    uniform = np.column_stack([uniform, 0.05 * np.sin(6 * uniform[:, 0])])
    net = _with_clean_scale(16)
    assert noise_figure(lines).level == noise_figure(uniform).level == "none"
    assert near_scale_for(uniform, net) == 16
    assert near_scale_for(lines, net) == 32


def test_the_shipped_model_runs_noiseless_clouds_at_its_clean_scale():
    # the choice only: whether it gains is the benchmark's to say (on TRAIN's held-out meshes
    # and on TEST it does; on a plain cube or a thin slab of 20,000 points it does not)
    from test_consensus import slab_surface

    from fapc.near_scale import near_scales_for

    shipped = load_model(None)[0]
    assert shipped.config.clean_k_near == 16 and shipped.config.edge_k_near == 20
    pts, _ = slab_surface(8000, 0.05)
    noisy = pts + np.random.default_rng(17).normal(scale=0.003, size=pts.shape)
    np.testing.assert_array_equal(estimate_normals(pts, device="cpu").normals,
                                  estimate_normals(pts, device="cpu", k=16).normals)
    assert near_scales_for(pts, shipped) == (16, 0)
    assert near_scales_for(noisy, shipped) == (32, 20)  # light noise: the edge scale too


def test_fapc_bench_times_the_near_scale_fapc_normals_runs(tmp_path):
    from test_consensus import cube_surface

    from fapc.profile import profile_file

    pts, _ = cube_surface(5000, seed=18)  # noiseless: the clean near scale
    pts = pts.astype(np.float32).astype(np.float64)  # as the file holds them
    write_cloud(tmp_path / "c.ply", PointCloud(pts.astype(np.float32)))
    profile_file(str(tmp_path / "c.ply"), device="cpu", out_path=str(tmp_path / "o.ply"))
    got = read_cloud(tmp_path / "o.ply").normals
    assert angle_deg(got, estimate_normals(pts, device="cpu").normals).max() < 1e-3
    assert angle_deg(got, estimate_normals(pts, device="cpu", k=32).normals).max() > 0.01
    # lightly noisy: the shipped edge scale's second run at the cube's edges, as fapc normals
    light, _ = _lightly_noisy_cube(6000, seed=19)
    light = light.astype(np.float32).astype(np.float64)
    write_cloud(tmp_path / "l.ply", PointCloud(light.astype(np.float32)))
    profile_file(str(tmp_path / "l.ply"), device="cpu", out_path=str(tmp_path / "lo.ply"))
    got = read_cloud(tmp_path / "lo.ply").normals
    assert angle_deg(got, estimate_normals(light, device="cpu").normals).max() < 1e-3
    assert angle_deg(got, estimate_normals(light, device="cpu", k=32).normals).max() > 1.0


def test_the_device_path_runs_the_clean_near_scale_as_the_cpu_path_does():
    # knn="torch" (the CUDA path's exact grid search, here on the CPU) at a near scale of 16,
    # smaller than the 32 nearest points the confidence reads: its own search serves those
    from test_consensus import cube_surface

    pts, _ = cube_surface(6000, seed=19)
    want = estimate_normals(pts, device="cpu", knn="scipy")
    got = estimate_normals(pts, device="cpu", knn="torch")
    assert angle_deg(got.normals, want.normals).max() < 0.1  # float32 rounding of the searches
    np.testing.assert_allclose(got.confidence, want.confidence, atol=1e-3)
    assert angle_deg(want.normals, estimate_normals(pts, device="cpu", k=32).normals).max() > 0.01


def _with_edge_scale(k: int, curvature: float = 0.04):
    from dataclasses import replace

    from fapc.models.normal_net import NormalNet

    base = load_model(None)[0]
    net = NormalNet(replace(base.config, edge_k_near=k, edge_curvature=curvature))
    net.load_state_dict(base.state_dict())
    return net.eval()


def _lightly_noisy_cube(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from test_consensus import cube_surface

    pts, gt = cube_surface(n, seed=seed)
    return pts + np.random.default_rng(seed + 1).normal(scale=0.002, size=pts.shape), gt


def test_edge_scale_is_chosen_for_lightly_noisy_clouds_only():
    from test_consensus import cube_surface

    from fapc.near_scale import near_scales_for
    from fapc.noise import noise_figure

    net = _with_edge_scale(20)
    light, _ = _lightly_noisy_cube(8000, seed=21)
    clean, _ = cube_surface(8000, seed=21)
    heavy = clean + np.random.default_rng(22).normal(scale=0.03, size=clean.shape)
    assert [noise_figure(p).level for p in (clean, light, heavy)] == ["none", "light", "heavy"]
    assert near_scales_for(light, net) == (32, 20)
    assert near_scales_for(clean, net)[1] == 0 and near_scales_for(heavy, net)[1] == 0
    assert near_scales_for(light, _with_edge_scale(0)) == (32, 0)  # off in the model
    rot = Rotation.random(random_state=23).as_matrix()
    assert near_scales_for(light @ rot.T + 50.0, net) == (32, 20)  # distances only


def test_edge_scale_reruns_the_curved_fits_only_before_the_consensus_step():
    import torch

    from fapc.fa_run import fa_normals
    from fapc.patches import PatchBuilder, builder_for_near_scale
    from fapc.runtime import run_network

    net = _with_edge_scale(20)
    pts, _ = _lightly_noisy_cube(6000, seed=24)
    pts = pts - pts.mean(0)
    cpu = torch.device("cpu")
    n32, _, curv = fa_normals(pts, net, device=cpu, consensus=False)
    got, _, curv2 = fa_normals(pts, net, device=cpu, consensus=False, edge_scale=20)
    curved = curv > net.config.edge_curvature
    assert 0.02 < curved.mean() < 0.5  # the cube's edges and corners
    np.testing.assert_array_equal(got[~curved], n32[~curved])  # flat faces untouched
    np.testing.assert_array_equal(curv2, curv)  # curvature stays the first run's
    # the curved points get the network's normals at near scale 20 (its near points; the far
    # points as the first run smoothed them)
    small = net.with_near_scale(20)
    builder = builder_for_near_scale(PatchBuilder(pts, net.config.patch), small.config.patch)
    idx = np.flatnonzero(curved)
    with torch.inference_mode():
        want = run_network(small, torch.as_tensor(builder.patches(idx)[0]))["normal"].numpy()
    assert angle_deg(got[curved], want).max() < 0.05  # float32 arccos: ~0.03 deg floor
    assert angle_deg(got[curved], n32[curved]).max() > 1.0
    # a larger edge scale than the far smoothing's table holds: a builder of its own
    for knn in ("scipy", "torch"):
        big, _, _ = fa_normals(pts, net, device=cpu, consensus=False, edge_scale=48, knn=knn)
        ref, _, c = fa_normals(pts, net, device=cpu, consensus=False, knn=knn)
        bent = c > net.config.edge_curvature  # this search's own curved points
        np.testing.assert_array_equal(big[~bent], ref[~bent])
        assert angle_deg(big[bent], ref[bent]).max() > 1.0


def test_edge_scale_gains_at_the_edges_of_a_lightly_noisy_cube_and_keeps_equivariance():
    net = _with_edge_scale(20)
    pts, gt = _lightly_noisy_cube(12000, seed=25)

    def rmse(n: np.ndarray) -> float:
        return float(np.sqrt(np.mean(angle_deg(n, gt) ** 2)))

    on = estimate_normals(pts, device="cpu", model=net).normals
    off = estimate_normals(pts, device="cpu", model=_with_edge_scale(0)).normals
    assert rmse(on) < rmse(off)
    # an explicit k turns the step off
    np.testing.assert_array_equal(estimate_normals(pts, device="cpu", model=net, k=32).normals,
                                  off)
    rot = Rotation.random(random_state=26).as_matrix()
    moved = estimate_normals(pts @ rot.T + [3.0, -1.0, 7.0], device="cpu", model=net).normals
    assert np.percentile(angle_deg(moved, on @ rot.T), 99) < 0.05


def test_a_shared_builder_gives_the_patches_of_a_smaller_near_scale():
    from dataclasses import replace

    from fapc.patches import PatchBuilder, PatchSpec, builder_for_near_scale

    pts = _noisy_sphere(3000, seed=27, noise=0.01)
    q = np.arange(0, 3000, 7)
    for spec in (PatchSpec(k_near=32, k_far=32, far_stride=6),
                 PatchSpec(k_near=32, k_far=32, far_stride=8, far_smooth=2)):
        big = PatchBuilder(pts, spec)
        small_spec = replace(spec, k_near=20)
        shared = builder_for_near_scale(big, small_spec)
        fresh = PatchBuilder(pts, small_spec)
        a, sa, na = shared.patches(q)
        b, sb, nb = fresh.patches(q)
        np.testing.assert_array_equal(na[:, :20], nb[:, :20])  # the same near neighbours
        np.testing.assert_array_equal(na[:, 20:], nb[:, 20:])  # the same far ones
        if not spec.far_smooth:
            np.testing.assert_array_equal(a, b)
        assert big.spec.k_near == 32 and big.patches(q)[0].shape[1] == spec.size  # untouched
        # larger than a far-smoothing builder's table holds: not shared
        assert (builder_for_near_scale(big, replace(spec, k_near=40)) is None) == bool(
            spec.far_smooth)
    with pytest.raises(ValueError, match="more than the near scale"):
        builder_for_near_scale(big, replace(spec, k_far=16))


def test_the_device_path_runs_the_edge_scale_as_the_cpu_path_does():
    # knn="torch" (the CUDA path's grid search and its far smoothing table, here on the CPU)
    pts, _ = _lightly_noisy_cube(6000, seed=28)
    want = estimate_normals(pts, device="cpu", knn="scipy").normals
    got = estimate_normals(pts, device="cpu", knn="torch").normals
    assert angle_deg(got, want).max() < 0.1  # float32 rounding of the searches
    assert angle_deg(want, estimate_normals(pts, device="cpu", k=32).normals).max() > 1.0


def _with_light_gate(whiteness: float):
    from dataclasses import replace

    from fapc.models.normal_net import NormalNet

    base = load_model(None)[0]
    net = NormalNet(replace(base.config, light_whiteness=whiteness))
    net.load_state_dict(base.state_dict())
    return net.eval()


def test_light_smoothing_by_default_where_the_scatter_is_noise_not_relief():
    from test_noise import SPACING, noisy_plane, rippled_plane

    from fapc.near_scale import choices_for

    net = _with_light_gate(0.9)
    noisy = noisy_plane(0.05 * SPACING, n=80, seed=9)  # both read as light noise
    relief = rippled_plane(0.2 * SPACING, 6 * SPACING, n=80)
    assert choices_for(noisy, net)[2] and not choices_for(relief, net)[2]
    assert not choices_for(noisy, _with_light_gate(0.0))[2]  # off in the model
    rot = Rotation.random(random_state=24).as_matrix()
    assert choices_for(noisy @ rot.T + 30.0, net)[2]  # distances only
    # None (the default) follows the model's choice; True and False override it
    for pts, chosen in ((noisy, True), (relief, False)):
        auto = estimate_normals(pts, model=net, device="cpu").normals
        on = estimate_normals(pts, model=net, device="cpu", light_smoothing=True).normals
        off = estimate_normals(pts, model=net, device="cpu", light_smoothing=False).normals
        assert angle_deg(on, off).max() > 0.01  # the step does something on both
        np.testing.assert_array_equal(auto, on if chosen else off)
