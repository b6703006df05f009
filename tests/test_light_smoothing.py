"""The optional light smoothing (:mod:`fapc.light`): under light noise it refits each normal
from its neighbours' normals without leaning on curved surfaces and without crossing a
crease, leaves noiseless and heavily noisy clouds alone, moves with the cloud, and reaches
the pipeline, the CLI and the GPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg
from scipy.spatial import cKDTree

from fapc.consensus import ConsensusSettings, spread
from fapc.datasets import analytic_surface
from fapc.light import LightSettings, light_smoothing, linear_refit, tangent_axes
from fapc.normals import estimate_normals
from fapc.testing import random_rotation


def rmse(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(err ** 2)))


def jitter(normals: np.ndarray, deg: float, seed: int) -> np.ndarray:
    """Unit normals each tilted by a Gaussian of about ``deg`` degrees."""
    n = normals + np.radians(deg) * np.random.default_rng(seed).normal(size=normals.shape)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def smooth(pts: np.ndarray, nrm: np.ndarray, *, spreads_from: np.ndarray | None = None,
           support: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The step at every point as the pipeline runs it (candidates: the 64 nearest; support:
    the 32 nearest, or the ``support`` rows given): normals and the gate. ``spreads_from``:
    the normals whose spreads set the noise level (default ``nrm``)."""
    _, idx = cKDTree(pts).query(pts, k=64)
    p, n, idx = torch.from_numpy(pts), torch.from_numpy(nrm), torch.from_numpy(idx)
    every = torch.arange(len(p))
    sn = n if spreads_from is None else torch.from_numpy(spreads_from)
    spreads = spread(p, sn, every, idx[:, :ConsensusSettings.spread_k])
    sup = idx[:, :32] if support is None else torch.from_numpy(support)
    out, gate = light_smoothing(p, n, spreads, query=every, candidates=idx, support=sup)
    return out.numpy(), gate.numpy()


def noisy_torus(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The analytic torus with Gaussian noise of ``noise`` diagonals, and its exact normals."""
    pts, nrm = analytic_surface("torus", n, seed=seed)
    diag = float(np.linalg.norm(pts.max(0) - pts.min(0)))
    return pts + np.random.default_rng(seed + 1).normal(scale=noise * diag, size=pts.shape), nrm


def cube_surface(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A unit cube's faces, sampled with numpy alone, and their normals."""
    rng = np.random.default_rng(seed)
    face = rng.integers(0, 6, n)
    pts = rng.uniform(-0.5, 0.5, (n, 3))
    pts[np.arange(n), face % 3] = np.where(face < 3, -0.5, 0.5)
    return pts, np.eye(3)[face % 3]


def test_light_noise_is_averaged_out() -> None:
    pts, gt = noisy_torus(20000, 0.0003)
    noisy = jitter(gt, 3.0, seed=2)
    out, gate = smooth(pts, noisy)
    assert gate.mean() > 0.95
    before, after = rmse(angle_deg(noisy, gt)), rmse(angle_deg(out, gt))
    assert after < 0.4 * before, (before, after)


def test_a_one_sided_neighbourhood_on_a_curved_surface_does_not_lean() -> None:
    """Exact normals on a unit sphere, each point's support its nearest points on the side of
    growing x only: a plain mean of their normals leans by degrees toward that side; the
    linear fit returns the point's own normal."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=(20000, 3))
    gt = v / np.linalg.norm(v, axis=1, keepdims=True)
    pts = gt + 0.0005 * rng.normal(size=gt.shape)  # light noise opens the gate
    _, idx = cKDTree(pts).query(pts, k=200)
    behind = pts[idx, 0] < pts[:, :1]  # (N, 200)
    order = np.argsort(behind, axis=1, kind="stable")  # nearest first, those behind last
    support = np.take_along_axis(idx, order, 1)[:, :32]  # the point itself, then x >= its x
    out, gate = smooth(pts, gt, spreads_from=jitter(gt, 2.0, seed=3), support=support)
    assert gate.mean() > 0.5
    mean = gt[support].mean(1)
    assert np.median(angle_deg(mean, gt)) > 2.0  # the plain mean leans
    assert np.median(angle_deg(out[gate], gt[gate])) < 0.3


def test_a_crease_is_not_smoothed_across() -> None:
    pts, gt = cube_surface(30000, seed=1)
    pts = pts + 0.0003 * np.random.default_rng(2).normal(size=pts.shape)
    noisy = jitter(gt, 2.0, seed=4)
    out, gate = smooth(pts, noisy)
    edge = np.sort(np.abs(pts), axis=1)[:, 1] > 0.47  # within about 2 spacings of an edge
    assert edge.sum() > 1000 and gate[edge].mean() > 0.9
    assert rmse(angle_deg(out[edge], gt[edge])) < rmse(angle_deg(noisy[edge], gt[edge]))
    assert angle_deg(out[edge], gt[edge]).max() < 10.0


def test_noiseless_and_heavily_noisy_clouds_are_left_alone_and_right_normals_stay() -> None:
    pts, gt = cube_surface(20000, seed=3)
    out, gate = smooth(pts, gt)  # noiseless faces: the noise level sits at its floor
    assert not gate.any()
    np.testing.assert_array_equal(out, gt)
    pts, gt = analytic_surface("torus", 20000, seed=0)
    out, gate = smooth(pts, gt)  # curvature alone opens the gate here; a linear fit of a
    assert gate.mean() > 0.5  # curved surface's normals is off by its second-order terms only
    assert rmse(angle_deg(out, gt)) < 0.2 and angle_deg(out, gt).max() < 0.5
    heavy, _ = noisy_torus(20000, 0.006)
    noisy = jitter(gt, 20.0, seed=6)
    out, gate = smooth(heavy, noisy)
    assert gate.mean() < 0.01
    np.testing.assert_array_equal(out[~gate], noisy[~gate])


@pytest.mark.parametrize("seed", [0, 1])
def test_the_result_moves_with_the_cloud(seed: int) -> None:
    """float64, seeded rotations (and, for seed 1, a reflection), translations and
    permutations."""
    pts, gt = noisy_torus(8000, 0.0004, seed=seed)
    noisy = jitter(gt, 3.0, seed=7 + seed)
    out, gate = smooth(pts, noisy)
    assert gate.mean() > 0.9
    r = random_rotation(torch.Generator().manual_seed(11 + seed), reflect=bool(seed)).numpy()
    perm = np.random.default_rng(seed + 2).permutation(len(pts))
    moved, moved_gate = smooth(pts[perm] @ r.T + [3.0, -1.0, 2.0], noisy[perm] @ r.T)
    np.testing.assert_array_equal(moved_gate, gate[perm])
    expect = out[perm] @ r.T
    sign = np.sign((moved * expect).sum(1, keepdims=True))
    assert np.abs(moved - sign * expect).max() < 1e-9


def test_the_fit_does_not_depend_on_the_tangent_axes() -> None:
    """Turning the tangent axes in the plane (here: the other branch of
    :func:`tangent_axes`, through a rotated copy) leaves the refit as it was."""
    pts, gt = noisy_torus(4000, 0.0004, seed=3)
    noisy = jitter(gt, 3.0, seed=9)
    _, idx = cKDTree(pts).query(pts, k=32)
    p, n, sup = torch.from_numpy(pts), torch.from_numpy(noisy), torch.from_numpy(idx)
    q = torch.arange(len(p))
    b1, b2 = tangent_axes(n)
    assert (b1 * n).sum(-1).abs().max() < 1e-12 and (b2 * n).sum(-1).abs().max() < 1e-12
    assert ((b1 * b2).sum(-1).abs().max() < 1e-12) and (b2.norm(dim=-1) - 1).abs().max() < 1e-12
    a = linear_refit(p, n, q, sup).numpy()
    r = random_rotation(torch.Generator().manual_seed(4)).double()
    b = (linear_refit(p @ r.T, n @ r.T, q, sup) @ r).numpy()
    assert np.abs(a - b).max() < 1e-9
    assert angle_deg(a, noisy).max() > 1  # it did refit


def test_refuses_bad_inputs() -> None:
    p = torch.zeros(40, 3, dtype=torch.float64)
    sp = torch.zeros(40, dtype=torch.float64)
    q = torch.arange(5)
    cand, sup = torch.zeros(5, 64, dtype=torch.long), torch.zeros(5, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        light_smoothing(p[:, :2], p[:, :2], sp, query=q, candidates=cand, support=sup)
    with pytest.raises(ValueError, match="one row per query"):
        light_smoothing(p, p, sp, query=q, candidates=cand[:4], support=sup)
    with pytest.raises(ValueError, match="more than"):
        light_smoothing(p, p, sp, query=q, candidates=cand, support=sup[:, :5])
    with pytest.raises(ValueError, match="light_from"):
        LightSettings(light_from=0.2)


def test_the_pipeline_gains_on_a_lightly_noisy_torus_and_queries_agree() -> None:
    pts, gt = noisy_torus(30000, 0.0003, seed=3)
    on = estimate_normals(pts, device="cpu", light_smoothing=True).normals
    off = estimate_normals(pts, device="cpu", light_smoothing=False).normals
    e_on, e_off = rmse(angle_deg(on, gt)), rmse(angle_deg(off, gt))
    assert e_on < 0.6 * e_off, (e_off, e_on)
    q = np.random.default_rng(8).choice(len(pts), 300, replace=False)
    part = estimate_normals(pts, device="cpu", query_index=q, light_smoothing=True).normals
    assert angle_deg(part, on[q]).max() < 1e-4
    # the shipped model's own choice here: a lightly noisy cloud whose scatter is noise
    np.testing.assert_array_equal(estimate_normals(pts, device="cpu").normals, on)
    # nothing without the consensus step
    none = estimate_normals(pts, device="cpu", consensus=False, light_smoothing=True).normals
    np.testing.assert_array_equal(
        none, estimate_normals(pts, device="cpu", consensus=False).normals)


def test_progress_counts_the_extra_pass() -> None:
    pts, _ = noisy_torus(3000, 0.0003, seed=4)
    calls: list[tuple[int, int]] = []
    estimate_normals(pts, device="cpu", batch_size=500, light_smoothing=True,
                     progress=lambda d, t: calls.append((d, t)))
    passes = ConsensusSettings.snap_passes + 1
    assert {t for _, t in calls} == {(1 + passes) * len(pts)}
    assert calls[-1][0] == (1 + passes) * len(pts)


def test_cli_flag_reaches_the_step(tmp_path) -> None:
    """``fapc normals --light-smoothing`` gives what ``estimate_normals(light_smoothing=True)``
    gives."""
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.cloud import PointCloud
    from fapc.io import read_cloud, write_cloud

    pts, _ = noisy_torus(8000, 0.0003, seed=5)
    write_cloud(tmp_path / "torus.ply", PointCloud(pts))
    r = CliRunner().invoke(app, ["normals", str(tmp_path / "torus.ply"), "--light-smoothing",
                                 "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = read_cloud(tmp_path / "torus.normals.ply").normals
    want = estimate_normals(pts, device="cpu", light_smoothing=True).normals
    plain = estimate_normals(pts, device="cpu", light_smoothing=False).normals
    assert angle_deg(got, want).max() < 1e-3
    assert angle_deg(want, plain).max() > 0.5  # the step did change something here
    r = CliRunner().invoke(app, ["normals", str(tmp_path / "torus.ply"), "--no-light-smoothing",
                                 "--device", "cpu", "--overwrite"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert angle_deg(read_cloud(tmp_path / "torus.normals.ply").normals, plain).max() < 1e-3


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_device_path_gives_the_cpu_path(device: str) -> None:
    """The step through the torch grid kNN (the GPU pipeline, here also on the CPU) gives
    what the scipy pipeline gives (numpy data only: the GPU host has no trimesh)."""
    pts, _ = cube_surface(8000, seed=6)
    pts = pts + np.random.default_rng(7).normal(scale=0.0015, size=pts.shape)
    ref = estimate_normals(pts, device="cpu", knn="scipy", light_smoothing=True).normals
    plain = estimate_normals(pts, device="cpu", knn="scipy", light_smoothing=False).normals
    got = estimate_normals(pts, device=device, knn="torch", light_smoothing=True).normals
    assert angle_deg(ref, plain).max() > 0.5  # the step ran
    err = angle_deg(ref, got)
    assert np.mean(err < 0.1) >= 0.999, np.sort(err)[-10:]


def test_the_evaluators_estimator_passes_the_options_on() -> None:
    """``fapc eval``, ``python -m fapc.validate`` and ``python -m fapc.bench accuracy`` score
    the pipeline through :func:`fapc.evaluate.model_method`: with the options it is the
    pipeline with them."""
    from fapc.evaluate import model_method
    from fapc.models.checkpoint import load_model

    pts, _ = noisy_torus(6000, 0.0003, seed=6)
    q = np.arange(0, len(pts), 7)
    net = load_model(None)[0]
    est = model_method(net, device="cpu", light_smoothing=True, crease=True)(pts, q)
    want = estimate_normals(pts, device="cpu", query_index=q, light_smoothing=True,
                            crease=True).normals
    plain = model_method(net, device="cpu", light_smoothing=False)(pts, q)
    np.testing.assert_array_equal(est, want)
    assert angle_deg(est, plain).max() > 0.5


@pytest.mark.parametrize("crease", [False, True])
def test_fapc_bench_times_the_pipeline_with_the_options(tmp_path, crease: bool) -> None:
    """``fapc bench --light-smoothing [--crease]`` (:func:`fapc.profile.profile_file`) times
    the pipeline those options run: the normals it writes are the pipeline's."""
    from fapc.cloud import PointCloud
    from fapc.io import read_cloud, write_cloud
    from fapc.profile import profile_file

    pts, _ = noisy_torus(6000, 0.0003, seed=7)
    pts = pts.astype(np.float32).astype(np.float64)  # as the file holds them
    write_cloud(tmp_path / "t.ply", PointCloud(pts.astype(np.float32)))
    res = profile_file(str(tmp_path / "t.ply"), device="cpu", light_smoothing=True,
                       crease=crease, out_path=str(tmp_path / "o.ply"))
    assert res["stages_s"]["consensus"] > 0 and res["points"] == len(pts)
    got = read_cloud(tmp_path / "o.ply").normals
    want = estimate_normals(pts, device="cpu", light_smoothing=True, crease=crease).normals
    plain = estimate_normals(pts, device="cpu", light_smoothing=False).normals
    assert angle_deg(got, want).max() < 1e-3
    assert angle_deg(want, plain).max() > 0.5


def test_cli_says_when_the_options_cannot_apply(tmp_path) -> None:
    """With ``--method pca`` or ``--no-consensus`` the optional steps do not run: the CLI
    warns once and still writes the normals."""
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.cloud import PointCloud
    from fapc.io import write_cloud

    pts, _ = noisy_torus(3000, 0.0003, seed=8)
    write_cloud(tmp_path / "t.ply", PointCloud(pts))
    runner = CliRunner()
    for extra in (["--method", "pca"], ["--no-consensus"]):
        r = runner.invoke(app, ["normals", str(tmp_path / "t.ply"), "--light-smoothing",
                                "--crease", "--overwrite", "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        assert "--crease, --light-smoothing: only with --method fa" in r.stderr
        assert (tmp_path / "t.normals.ply").exists()
    r = runner.invoke(app, ["normals", str(tmp_path / "t.ply"), "--light-smoothing",
                            "--overwrite", "--device", "cpu"])
    assert r.exit_code == 0 and "only with" not in r.stderr
