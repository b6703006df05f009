"""The Bayes bound (:mod:`fapc.bound`): against the exact posterior on a cube, below every PCA,
equivariant, and strict about its inputs (no benchmark data is read)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg
from scipy.special import ndtr

from fapc.bound import bayes_normals, bayes_rmse, dense_sample_size
from fapc.datasets import Shape, make_cloud, procedural_shapes
from fapc.evaluate import pca_method
from fapc.io.mesh import sample_mesh
from fapc.testing import random_rotation

FACES = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)


def cube() -> Shape:
    """The axis-aligned unit cube centred at the origin (the procedural ``cube``)."""
    return procedural_shapes(["cube"])[0]


def cube_posterior(x: np.ndarray, sigma: float) -> np.ndarray:
    """The closed-form posterior ``(Q, 6)`` over the cube's faces: each face's likelihood is
    the Gaussian across it times the box integral of the Gaussian along it."""
    logp = []
    for axis in range(3):
        others = [b for b in range(3) if b != axis]
        box = np.prod([ndtr((0.5 - x[:, b]) / sigma) - ndtr((-0.5 - x[:, b]) / sigma)
                       for b in others], axis=0)
        for side in (0.5, -0.5):
            logp.append(-0.5 * ((x[:, axis] - side) / sigma) ** 2 + np.log(box))
    lp = np.stack(logp, 1)
    p = np.exp(lp - lp.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def expected_loss(n: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Expected squared unoriented angle (rad^2) of directions ``n (Q, 3)`` under ``post``."""
    return (post * np.arccos(np.clip(np.abs(n @ FACES.T), 0, 1)) ** 2).sum(1)


def test_reaches_the_exact_posteriors_least_expected_loss_on_a_cube():
    shape = cube()
    sigma = 0.012 * shape.diagonal
    pts, nrm = make_cloud(shape, n=20_000, noise=0.012, seed=1)
    q = np.random.default_rng(2).choice(len(pts), 600, replace=False)
    dense, dn, _ = sample_mesh(shape.vertices, shape.faces, dense_sample_size(shape, sigma),
                               seed=3)
    est = bayes_normals(pts[q], surface_points=dense, surface_normals=dn, sigma=sigma)
    post = cube_posterior(pts[q], sigma)
    grid = np.random.default_rng(0).normal(size=(40_000, 3))  # every direction, ~1 deg apart
    grid /= np.linalg.norm(grid, axis=1, keepdims=True)
    least = (post @ (np.arccos(np.clip(np.abs(grid @ FACES.T), 0, 1)) ** 2).T).min(1)
    gap = np.degrees(np.sqrt(expected_loss(est, post))) - np.degrees(np.sqrt(least))
    # the dense sample's own noise (a spacing of sigma / 2.5) moves a few near-even blends
    assert np.mean(gap) < 0.2 and np.percentile(gap, 95) < 0.5 and gap.max() < 6.0
    # its RMSE is the least of any estimator's; far below the noise's own scale of error
    rm = float(np.sqrt(np.mean(angle_deg(est, nrm[q]) ** 2)))
    expected = float(np.degrees(np.sqrt(np.mean(least))))
    assert rm > 5.0 and abs(rm - expected) < 0.25 * expected


def test_is_below_pca_at_every_k_and_exact_inside_the_faces():
    shape = cube()
    pts, nrm = make_cloud(shape, n=30_000, noise=0.006, seed=5)
    q = np.random.default_rng(6).choice(len(pts), 1000, replace=False)
    bound = bayes_rmse(shape, pts, nrm, q, sigma=0.006 * shape.diagonal)
    for k in (16, 32, 64, 128, 256):
        pca = float(np.sqrt(np.mean(angle_deg(pca_method(k)(pts, q), nrm[q]) ** 2)))
        assert bound < pca - 1.0, (k, bound, pca)
    # farther than 5 sigma from every edge the posterior sees one face: exactly its normal
    sigma = 0.006 * shape.diagonal
    inner = q[np.sort(np.abs(pts[q]), 1)[:, 1] < 0.5 - 5 * sigma]
    assert len(inner) > 500
    dense, dn = make_cloud(shape, n=200_000, seed=7)
    est = bayes_normals(pts[inner], surface_points=dense, surface_normals=dn, sigma=sigma)
    assert np.max(angle_deg(est, nrm[inner])) < 1e-6


@pytest.mark.parametrize("reflect", [False, True])
def test_equivariant_under_rotation_reflection_translation_and_permutation(reflect):
    shape = cube()
    gen = torch.Generator().manual_seed(11 + reflect)
    rot = random_rotation(gen, reflect=reflect).numpy()
    shift = np.array([0.3, -1.2, 2.5])
    pts, nrm = make_cloud(shape, n=5000, noise=0.01, seed=8)
    dense, dn = make_cloud(shape, n=60_000, seed=9)
    sigma = 0.01 * shape.diagonal
    base = bayes_normals(pts[:300], surface_points=dense, surface_normals=dn, sigma=sigma)
    perm = np.random.default_rng(10).permutation(len(dense))
    moved = bayes_normals(pts[:300] @ rot.T + shift, surface_points=dense[perm] @ rot.T + shift,
                          surface_normals=dn[perm] @ rot.T, sigma=sigma)
    # Along a right-angled edge the expected loss has two minima of equal value (the blend of
    # n1 with n2 and of n1 with -n2): the direction may differ there, the error may not.
    err, err_moved = angle_deg(base, nrm[:300]), angle_deg(moved, nrm[:300] @ rot.T)
    np.testing.assert_allclose(err_moved, err, atol=1e-4)  # degrees
    assert np.mean(angle_deg(moved, base @ rot.T) < 1e-6) > 0.8


def test_refuses_bad_inputs():
    good = np.zeros((4, 3))
    with pytest.raises(ValueError, match="points must be"):
        bayes_normals(np.zeros((4, 2)), surface_points=good, surface_normals=good, sigma=0.1)
    with pytest.raises(ValueError, match="surface_points must be"):
        bayes_normals(good, surface_points=np.zeros((0, 3)), surface_normals=np.zeros((0, 3)),
                      sigma=0.1)
    with pytest.raises(ValueError, match="must match"):
        bayes_normals(good, surface_points=good, surface_normals=np.zeros((3, 3)), sigma=0.1)
    with pytest.raises(ValueError, match="sigma must be positive"):
        bayes_normals(good, surface_points=good, surface_normals=good, sigma=0.0)
    with pytest.raises(ValueError, match="needs a mesh"):
        dense_sample_size(Shape("cloud", good, normals=good), 0.1)


def test_bench_bound_section_reads_the_test_meshes_and_skips_without_data(tmp_path, monkeypatch,
                                                                         capsys):
    import json

    import fapc.bench_data
    from fapc.bench import main

    shape = cube()
    (tmp_path / "libigl").mkdir()
    with open(tmp_path / "libigl" / "cube.obj", "w") as f:
        f.writelines(f"v {x} {y} {z}\n" for x, y, z in shape.vertices)
        f.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in shape.faces)
    monkeypatch.setattr(fapc.bench_data, "TEST_MESHES", ["libigl/cube.obj"])
    out = tmp_path / "bound.json"
    assert main(["bound", "--data", str(tmp_path), "--queries", "400", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())["bound"]
    cols = rep["columns"]
    assert list(cols) == ["0.125%", "0.6%", "1.2%"] and 0 < cols["0.125%"] < cols["0.6%"] < cols["1.2%"]
    assert [r["mesh"] for r in rep["rows"]] == ["libigl/cube.obj"] * 3
    assert "libigl/cube.obj" in capsys.readouterr().out
    monkeypatch.setattr(fapc.bench_data, "find_root", lambda root=None: None)
    assert main(["bound", "--json", str(out)]) == 0
    assert "bound" not in json.loads(out.read_text())
    assert "not found" in capsys.readouterr().out
