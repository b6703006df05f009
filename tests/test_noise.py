"""The cloud noise figure (:mod:`fapc.noise`) and the default model's choice of network."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import plane_points, sphere_points
from scipy.spatial import cKDTree
from scipy.stats import special_ortho_group

from fapc.noise import NOISY_FROM, SAMPLES, cloud_noise, noise_sample


def _figure(points: np.ndarray, seed: int = 0) -> float:
    sample = noise_sample(len(points), seed=seed)
    _, near = cKDTree(points).query(points[sample], 16)
    return cloud_noise(points, near, sample)


def test_noise_figure_grows_with_noise_and_ignores_pose_and_scale():
    flat = plane_points(20_000, seed=1)
    assert _figure(flat) < 1e-9  # exactly planar
    rng = np.random.default_rng(2)
    spacing = np.sqrt(4 / 20_000)  # mean spacing of the plane's samples
    figures = []
    for sigma in (0.02, 0.05, 0.1, 0.3):
        noisy = flat + rng.normal(size=flat.shape) * np.array([0, 0, sigma * spacing])
        figures.append(_figure(noisy))
    assert all(a < b for a, b in zip(figures, figures[1:], strict=False)), figures
    assert figures[0] < NOISY_FROM < figures[-1]
    cloud = sphere_points(20_000, seed=3) + rng.normal(scale=0.003, size=(20_000, 3))
    base = _figure(cloud)
    rot = special_ortho_group.rvs(3, random_state=4)
    moved = 250.0 * cloud @ rot.T + np.array([1e5, -3e4, 42.0])  # rotated, scaled, moved
    assert _figure(moved) == pytest.approx(base, rel=1e-6)
    perm = rng.permutation(len(cloud))
    assert _figure(cloud[perm]) == pytest.approx(base, rel=0.1)  # another sample, same figure


def test_noise_figure_validates_shapes_and_samples_deterministically():
    pts = sphere_points(100)
    with pytest.raises(ValueError, match="near"):
        cloud_noise(pts, np.zeros((5, 8), np.int64), np.arange(5))
    with pytest.raises(ValueError, match="points"):
        cloud_noise(pts[:, :2], np.zeros((5, 12), np.int64), np.arange(5))
    a, b = noise_sample(50_000, seed=1), noise_sample(50_000, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == SAMPLES and len(noise_sample(100)) == 100
    assert cloud_noise(torch.zeros(20, 3), torch.zeros(20, 12, dtype=torch.long),
                       torch.arange(20)) == 0.0  # all duplicates: no spacing, no figure


def test_default_model_runs_the_noisy_network_on_noisy_clouds_only():
    from fapc.models.checkpoint import DEFAULT_MODEL, NOISY_MODEL
    from fapc.normals import estimate_normals

    if not NOISY_MODEL.exists():
        pytest.skip("no shipped noisy-cloud network")
    rng = np.random.default_rng(5)
    clean = sphere_points(20_000, seed=6)
    noisy = clean + rng.normal(scale=0.01, size=clean.shape)
    q = np.arange(0, 20_000, 97)
    for cloud, chosen, other in ((clean, DEFAULT_MODEL, NOISY_MODEL),
                                 (noisy, NOISY_MODEL, DEFAULT_MODEL)):
        auto = estimate_normals(cloud, device="cpu", query_index=q).normals
        same = estimate_normals(cloud, device="cpu", query_index=q, model=chosen).normals
        diff = estimate_normals(cloud, device="cpu", query_index=q, model=other).normals
        np.testing.assert_array_equal(auto, same)
        assert not np.array_equal(auto, diff)


def test_the_two_networks_must_build_the_same_patches():
    from fapc.models.checkpoint import load_model
    from fapc.models.normal_net import NormalNet
    from fapc.normals import pick_network
    from fapc.patches import PatchBuilder

    net, _ = load_model(None)
    other_cfg = dataclasses.replace(net.config, k_far=net.config.k_far + 8)
    assert other_cfg.patch != net.config.patch
    builder = PatchBuilder(sphere_points(2000), net.config.patch)
    with pytest.raises(ValueError, match="same patches"):
        pick_network(builder, net, NormalNet(other_cfg))
    assert pick_network(builder, net, net) is net


def test_eval_of_the_default_measures_the_network_each_cloud_gets(tmp_path):
    """``fapc eval`` without ``--model`` scores what ``fapc normals`` runs: the noisy-cloud
    network on the noisy column, the default network on the noiseless one."""
    import json

    import trimesh
    from typer.testing import CliRunner

    from fapc.cli import app
    from fapc.models.checkpoint import DEFAULT_MODEL, NOISY_MODEL

    if not NOISY_MODEL.exists():
        pytest.skip("no shipped noisy-cloud network")
    trimesh.creation.capsule(height=1.0, radius=0.3, count=[32, 32]).export(tmp_path / "c.obj")

    def fa(*model: str) -> dict:
        r = CliRunner().invoke(app, ["eval", str(tmp_path / "c.obj"), *model, "--points",
                                     "20000", "--queries", "150", "--columns", "none,0.6%",
                                     "--pca-k", "16", "--json", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["table"]["fa"]

    auto = fa()
    clean, noisy = fa("--model", str(DEFAULT_MODEL)), fa("--model", str(NOISY_MODEL))
    assert auto["none"] == clean["none"] and auto["0.6%"] == noisy["0.6%"]
    assert clean["0.6%"] != noisy["0.6%"]
