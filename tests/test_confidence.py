"""The FA pipeline's confidence (fapc.confidence): the neighbours' agreement is unoriented
and scale-free, the parts combine within [0, 1], and the confidence that comes out ranks the
normals by their error, the same for a cloud in any pose and for queries or the whole cloud."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import angle_deg
from test_consensus import cube_surface

from fapc.confidence import final_confidence, neighbour_agreement, patch_confidence
from fapc.normals import estimate_normals
from fapc.testing import random_rotation


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_neighbour_agreement_is_one_for_equal_normals_of_either_sign_and_near_zero_for_random():
    gen = torch.Generator().manual_seed(0)
    own = unit(torch.randn(50, 3, generator=gen, dtype=torch.float64))
    signs = torch.where(torch.rand(50, 16, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    same = own.unsqueeze(1) * signs  # (50, 16, 3)
    torch.testing.assert_close(neighbour_agreement(own, same), torch.ones(50, dtype=torch.float64))
    spread = unit(torch.randn(50, 4000, 3, generator=gen, dtype=torch.float64))
    assert neighbour_agreement(own, spread).max() < 0.05
    # a neighbour at 90 degrees pulls the mean of (n . n_j)^2 down by its share
    tilted = same.clone()
    tilted[:, :4] = unit(torch.cross(own, torch.randn(50, 3, generator=gen, dtype=torch.float64),
                                     dim=1)).unsqueeze(1)
    torch.testing.assert_close(neighbour_agreement(own, tilted),
                               torch.full((50,), (12 / 16 - 1 / 3) * 1.5, dtype=torch.float64))


def test_neighbour_agreement_skips_points_without_a_normal_and_checks_shapes():
    own = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    nb = torch.zeros(2, 3, 3)
    nb[0, 0] = torch.tensor([0.0, 0.0, -1.0])  # one neighbour with a normal, two without
    torch.testing.assert_close(neighbour_agreement(own, nb), torch.ones(2))  # row 1: none
    with pytest.raises(ValueError, match="neighbours"):
        neighbour_agreement(own, nb[:1])
    with pytest.raises(ValueError, match="shape"):
        patch_confidence(torch.ones(3), torch.ones(4))


def test_parts_combine_within_zero_and_one_and_rise_with_each_part():
    a = torch.linspace(0, 1, 11)
    grid_a, grid_p = torch.meshgrid(a, a, indexing="ij")
    c = patch_confidence(grid_a, grid_p)  # (11, 11)
    assert c.min() >= 0 and c.max() <= 1
    assert (c.diff(dim=0) >= 0).all() and (c.diff(dim=1) >= 0).all()
    f = final_confidence(c.reshape(-1), torch.full((121,), 0.5))
    assert (f <= c.reshape(-1)).all() and f.max() <= 0.25 + 1e-6


@pytest.fixture(scope="module")
def noisy_cube() -> tuple[np.ndarray, np.ndarray]:
    pts, gt = cube_surface(12000, seed=3)
    return pts + np.random.default_rng(4).normal(scale=0.01, size=pts.shape), gt


def test_confidence_ranks_the_errors_on_a_noisy_cube(noisy_cube):
    pts, gt = noisy_cube
    res = estimate_normals(pts, method="fa", device="cpu")
    err = angle_deg(res.normals, gt)
    conf = res.confidence
    assert conf.min() >= 0 and conf.max() <= 1
    order = np.argsort(conf)
    low, high = err[order[:1200]], err[order[-1200:]]  # the least and most confident 10 %
    assert np.sqrt(np.mean(low ** 2)) > 4 * np.sqrt(np.mean(high ** 2)), (low.mean(), high.mean())
    # the least confident points are the ones near an edge: within 0.05 of two faces' planes
    near_edge = (np.minimum(pts, 1 - pts) < 0.05).sum(1) >= 2
    assert near_edge[order[:1200]].mean() > 3 * near_edge.mean()


def test_confidence_is_the_same_in_any_pose_and_for_queries_alone(noisy_cube):
    pts, _ = noisy_cube
    q = np.random.default_rng(2).choice(len(pts), 300, replace=False)
    base = estimate_normals(pts, method="fa", device="cpu", query_index=q)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):  # the shipped model's frames are SO(3)'s: rotations and translations
        rot = random_rotation(gen, reflect=False).numpy()
        moved = estimate_normals(pts @ rot.T + [3.0, -1.0, 2.0], method="fa", device="cpu",
                                 query_index=q)
        np.testing.assert_allclose(moved.confidence, base.confidence, atol=1e-4)
    for consensus in (True, False):
        whole = estimate_normals(pts, method="fa", device="cpu", consensus=consensus)
        part = estimate_normals(pts, method="fa", device="cpu", consensus=consensus, query_index=q)
        np.testing.assert_allclose(part.confidence, whole.confidence[q], atol=1e-6)
    # the device path's neighbour search (exact grid kNN in torch) gives the same confidence
    grid = estimate_normals(pts, method="fa", device="cpu", knn="torch", query_index=q)
    np.testing.assert_allclose(grid.confidence, base.confidence, atol=1e-4)
