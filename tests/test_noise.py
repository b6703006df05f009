"""The noise figure (:mod:`fapc.noise`, ``fapc info --noise``): noiseless, light and heavy
noise told apart, sigma near the truth under light noise, unchanged by rigid motions and
permutations, proportional to scale, and bad inputs refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fapc.crease import CreaseSettings
from fapc.errors import FapcError
from fapc.noise import noise_figure
from fapc.testing import random_rotation

SPACING = 0.01  # of the grid below


def noisy_plane(sigma: float, *, n: int = 150, seed: int = 0) -> np.ndarray:
    """A jittered grid of ``n x n`` points (spacing 0.01) in the plane z = 0, Gaussian noise
    ``sigma`` along z."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.arange(n) * SPACING, np.arange(n) * SPACING)
    pts = np.stack([u.ravel(), v.ravel(), np.zeros(u.size)], 1)
    pts[:, :2] += rng.uniform(-0.3, 0.3, (len(pts), 2)) * SPACING
    pts[:, 2] = rng.normal(scale=sigma, size=len(pts)) if sigma else 0.0
    return pts


def test_noiseless_light_and_heavy_are_told_apart() -> None:
    assert noise_figure(noisy_plane(0.0)).level == "none"
    assert noise_figure(noisy_plane(0.05 * SPACING)).level == "light"
    assert noise_figure(noisy_plane(0.15 * SPACING)).level == "light"
    assert noise_figure(noisy_plane(1.0 * SPACING)).level == "heavy"


@pytest.mark.parametrize("rel", [0.05, 0.1, 0.15])
def test_sigma_is_near_the_truth_under_light_noise(rel: float) -> None:
    fig = noise_figure(noisy_plane(rel * SPACING, seed=3))
    assert fig.sigma == pytest.approx(rel * SPACING, rel=0.25)
    # the spacing is the distance to the 9th nearest point: about 1.7 grid steps here
    assert 1.2 * SPACING < fig.spacing < 2.2 * SPACING
    assert fig.ratio == pytest.approx(fig.sigma * CreaseSettings().calib / fig.spacing)


def test_heavy_noise_sigma_is_a_lower_bound() -> None:
    fig = noise_figure(noisy_plane(2.0 * SPACING))
    assert fig.level == "heavy" and fig.sigma < 2.0 * SPACING


def test_moves_with_the_cloud_and_scales_with_it() -> None:
    pts = noisy_plane(0.1 * SPACING, n=100, seed=5)
    ref = noise_figure(pts, sample=3000)
    rot = random_rotation(torch.Generator().manual_seed(2)).numpy()
    perm = np.random.default_rng(4).permutation(len(pts))
    moved = noise_figure(pts @ rot.T + [1e6, -2e6, 300.0], sample=len(pts))
    full = noise_figure(pts, sample=len(pts))
    assert moved.level == full.level and moved.ratio == pytest.approx(full.ratio, rel=1e-6)
    # a permutation changes which points a sample takes, not what they measure
    assert noise_figure(pts[perm], sample=len(pts)).ratio == pytest.approx(full.ratio, rel=1e-9)
    scaled = noise_figure(7.0 * pts, sample=3000)
    assert scaled.ratio == pytest.approx(ref.ratio, rel=1e-9)
    assert scaled.sigma == pytest.approx(7.0 * ref.sigma, rel=1e-9)
    assert ref.points == 3000 and full.points == len(pts)


def test_non_finite_points_are_ignored_and_bad_inputs_refused() -> None:
    pts = noisy_plane(0.1 * SPACING, n=60)
    with_nan = np.concatenate([pts, np.full((5, 3), np.nan)])
    assert noise_figure(with_nan).ratio == pytest.approx(noise_figure(pts).ratio, rel=1e-12)
    with pytest.raises(FapcError, match="finite points"):
        noise_figure(np.concatenate([pts[:4], np.full((50, 3), np.inf)]))
    with pytest.raises(ValueError, match="shape"):
        noise_figure(pts[:, :2])
    with pytest.raises(ValueError, match="sample"):
        noise_figure(pts, sample=0)


def test_cli_info_noise(tmp_path) -> None:
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.cloud import PointCloud
    from fapc.io import write_cloud

    write_cloud(tmp_path / "plane.ply", PointCloud(noisy_plane(0.1 * SPACING, n=80)))
    write_cloud(tmp_path / "few.ply", PointCloud(noisy_plane(0.0, n=2)))
    runner = CliRunner()
    r = runner.invoke(app, ["info", str(tmp_path / "plane.ply"), "--json"])
    assert r.exit_code == 0 and "noise" not in json.loads(r.stdout)  # only when asked
    r = runner.invoke(app, ["info", str(tmp_path / "plane.ply"), str(tmp_path / "few.ply"),
                            "--noise", "--json"])
    assert r.exit_code == 1  # the 4-point file fails, the other is still measured
    (line,) = r.stdout.strip().splitlines()
    got = json.loads(line)["noise"]
    assert got["level"] == "light" and got["sigma"] == pytest.approx(0.001, rel=0.25)
    assert json.loads(line)["fa_near_scale"] == 32  # noisy: the trained near scale
    from fapc.models.checkpoint import load_model

    edge = load_model(None)[0].config.edge_k_near  # light noise: the shipped edge scale
    assert json.loads(line)["fa_edge_near_scale"] == edge
    assert got["whiteness"] > 1.0  # white noise; the table gives it too
    assert json.loads(line)["fa_light_smoothing"] == (
        load_model(None)[0].config.light_whiteness > 0)
    table = runner.invoke(app, ["info", str(tmp_path / "plane.ply"), "--noise"]).stdout
    assert "whiteness" in table and "light smoothing" in table
    assert "few.ply" in r.stderr and "finite points" in r.stderr
    assert "Traceback" not in r.stderr
    # noiseless, no scan lines: the clean near scale
    write_cloud(tmp_path / "clean.ply", PointCloud(noisy_plane(0.0, n=80)))
    r = runner.invoke(app, ["info", str(tmp_path / "clean.ply"), "--noise", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["fa_near_scale"] == 16
    assert json.loads(r.stdout)["fa_edge_near_scale"] == 0  # no second run without noise
    assert json.loads(line)["fa_draws"] == 1  # light: one run
    assert json.loads(r.stdout)["fa_draws"] == max(1, load_model(None)[0].config.clean_draws)
    # the plane vote: the model's choice on noiseless clouds without scan lines only
    assert json.loads(r.stdout)["fa_plane_vote"] == load_model(None)[0].config.clean_vote
    assert json.loads(line)["fa_plane_vote"] is False
    # the exact planes: the same gate
    assert json.loads(r.stdout)["fa_exact_planes"] == load_model(None)[0].config.clean_exact
    assert json.loads(line)["fa_exact_planes"] is False
    write_cloud(tmp_path / "heavy.ply", PointCloud(noisy_plane(2.0 * SPACING, n=80)))
    r = runner.invoke(app, ["info", str(tmp_path / "heavy.ply"), "--noise", "--json"])
    heavy = json.loads(r.stdout)
    assert heavy["noise"]["level"] == "heavy"
    assert heavy["fa_draws"] == max(1, load_model(None)[0].config.heavy_draws)
    from fapc.models.checkpoint import HEAVY_CONSENSUS_MODEL

    assert heavy["fa_smoothing_weights"] == (
        "heavy-noise" if HEAVY_CONSENSUS_MODEL.exists() else "default")
    assert json.loads(line)["fa_smoothing_weights"] == "default"  # light: as before
    assert heavy["fa_plane_vote"] is False and heavy["fa_exact_planes"] is False
    table = runner.invoke(app, ["info", str(tmp_path / "heavy.ply"), "--noise"]).stdout
    assert "draws" in table and "plane vote" in table and "exact planes" in table


def scan_lines(sigma: float, *, lines: int = 60, step: float = 0.002, gap: float = 0.02,
               seed: int = 0) -> np.ndarray:
    """Points along parallel scan lines in the plane z = 0 (``step`` apart along a line,
    ``gap`` between lines, so each point's nearest points lie on its own line), noise
    ``sigma`` along z."""
    rng = np.random.default_rng(seed)
    u = np.arange(0.0, 1.0, step)
    pts = np.concatenate([np.stack([u, np.full_like(u, i * gap), np.zeros_like(u)], 1)
                          for i in range(lines)])
    pts[:, 2] = rng.normal(scale=sigma, size=len(pts))
    return pts


def test_scan_lines_are_left_out_not_read_as_noiseless() -> None:
    """Along scan lines a 10-point neighbourhood is a line: any plane through it fits, so
    taken as patches they would read as noiseless; the figure leaves them out and measures
    the rest, or says it cannot tell."""
    only_lines = noise_figure(scan_lines(0.0005))
    assert only_lines.level == "unknown" and only_lines.lines > 0.95
    assert np.isnan(only_lines.ratio)
    assert only_lines.to_dict()["ratio"] is None  # JSON has no NaN
    # the same lines with a patch of the surface densely sampled between them
    rng = np.random.default_rng(3)
    patch = np.concatenate([rng.uniform(0, 1, (30000, 2)) * [1.0, 0.5], np.zeros((30000, 1))], 1)
    patch[:, 2] = rng.normal(scale=0.0005, size=len(patch))
    mixed = noise_figure(np.concatenate([scan_lines(0.0005) + [0, 0.6, 0], patch]))
    assert 0.2 < mixed.lines < 0.8
    assert mixed.level == "light"
    assert mixed.sigma == pytest.approx(0.0005, rel=0.3)


def rippled_plane(amplitude: float, wavelength: float, *, n: int = 150) -> np.ndarray:
    """The grid of :func:`noisy_plane`, noiseless, with relief ``amplitude sin(2 pi x / wl)
    sin(2 pi y / wl)`` along z: detail, not noise."""
    pts = noisy_plane(0.0, n=n, seed=6)
    w = 2 * np.pi / wavelength
    pts[:, 2] = amplitude * np.sin(w * pts[:, 0]) * np.sin(w * pts[:, 1])
    return pts


def test_whiteness_tells_noise_from_relief_that_reads_as_light_noise() -> None:
    noisy = noise_figure(noisy_plane(0.05 * SPACING, seed=7))
    relief = noise_figure(rippled_plane(0.2 * SPACING, 6 * SPACING))
    assert noisy.level == relief.level == "light"  # the level alone cannot tell them apart
    assert noisy.whiteness > 1.1 and relief.whiteness < 0.7
    # distances only: the same under a rigid motion, a permutation and a change of scale
    # (2,500 points: every one is sampled, as whiteness takes at most 3,000)
    pts = noisy_plane(0.05 * SPACING, n=50, seed=8)
    full = noise_figure(pts, sample=len(pts))
    rot = random_rotation(torch.Generator().manual_seed(3)).numpy()
    perm = np.random.default_rng(5).permutation(len(pts))
    for other in (pts @ rot.T + [1e5, -3e5, 20.0], pts[perm], 5.0 * pts):
        assert noise_figure(other, sample=len(pts)).whiteness == pytest.approx(
            full.whiteness, rel=1e-6)
