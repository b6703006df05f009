"""Patch building: the two scales, the outer ring, the wide summary, and the torch builder
against scipy's."""

from __future__ import annotations

import numpy as np
import torch

from fapc.bench import synthetic_surface
from fapc.patches import PatchBuilder, PatchSpec, TorchPatchBuilder, summary_of


def test_patch_rows_are_near_then_far_then_ring_with_the_inner_scale():
    pts = synthetic_surface(4000, seed=5, noise=1e-3)
    pts = pts - pts.mean(0)
    q = np.arange(0, 4000, 37)
    inner = PatchSpec(12, 10, 4)
    ringed = PatchSpec(12, 10, 4, k_ext=6)
    p0, s0, nb0 = PatchBuilder(pts, inner).patches(q)
    p1, s1, nb1 = PatchBuilder(pts, ringed).patches(q)
    assert p1.shape == (len(q), 28, 3)
    np.testing.assert_array_equal(nb1[:, :22], nb0)  # the ring leaves the inner patch alone
    np.testing.assert_allclose(s1, s0)
    np.testing.assert_allclose(p1[:, :22], p0)
    # unit RMS radius over the rows the network sees; the ring lies beyond the far rows
    np.testing.assert_allclose(np.sqrt((p1[:, :22] ** 2).sum(-1).mean(-1)), 1, rtol=1e-5)
    d = np.linalg.norm(p1, axis=-1)
    assert (d[:, 22:].min(1) >= d[:, 12:22].max(1) - 1e-6).all()
    np.testing.assert_allclose(p1 * s1[:, None, None], pts[nb1] - pts[q][:, None], atol=1e-5)
    torch_p, torch_s, torch_nb = TorchPatchBuilder(pts, ringed, device="cpu").patches(
        torch.from_numpy(q))
    np.testing.assert_allclose(torch_s.numpy(), s1, rtol=1e-5)
    np.testing.assert_allclose(np.sort(np.linalg.norm(torch_p.numpy(), axis=-1)), np.sort(d),
                               atol=1e-4)
    # the same neighbour sets (ties aside), near rows then far rows
    assert torch_nb.shape == nb1.shape
    same = [set(a[:12]) == set(b[:12]) and set(a[12:]) == set(b[12:])
            for a, b in zip(torch_nb.numpy(), nb1, strict=True)]
    assert np.mean(same) > 0.95


def test_wide_summary_carries_the_weighted_moments_of_its_cells_raw_points():
    rng = np.random.default_rng(3)
    pts = synthetic_surface(6000, seed=4, noise=5e-3)
    pts = pts - pts.mean(0)
    q = rng.choice(len(pts), 40, replace=False)
    spec = PatchSpec(12, 10, 4, 1, wide_stride=8, k_wide=16)
    builder = PatchBuilder(pts, spec)
    p, s, nb = builder.patches(q)
    assert p.shape == (40, 28, 3) and nb.shape == (40, 22)
    # the network's rows are as without the summary
    p0, s0, _ = PatchBuilder(pts, PatchSpec(12, 10, 4, 1)).patches(q)
    np.testing.assert_allclose(p[:, :22], p0)
    np.testing.assert_allclose(s, s0)
    # brute force: every point of the query's 16 cells, weighted by its cell's distance
    _, owner = builder.wide_tree.query(pts, k=1)
    for j, qi in enumerate(q):
        _, cells = builder.wide_tree.query(pts[qi], k=16)
        r = np.linalg.norm(builder.wide_centres[cells] - pts[qi], axis=1)
        weight_of = dict(zip(cells, np.exp(-2 * (r / r.max()) ** 2), strict=True))
        inside = np.flatnonzero(np.isin(owner, cells))
        w = np.array([weight_of[o] for o in owner[inside]])
        d = pts[inside] - pts[qi]
        mean = w @ d / w.sum()
        cov = (w[:, None] * (d - mean)).T @ (d - mean) / w.sum()
        pseudo = p[j, 22:].astype(np.float64) * s[j]  # (6, 3), equal weights
        np.testing.assert_allclose(pseudo.mean(0), mean, atol=1e-5 * s[j])
        dp = pseudo - pseudo.mean(0)
        np.testing.assert_allclose(dp.T @ dp / 6, cov, atol=1e-5 * s[j] ** 2)
    torch_p, torch_s, _ = TorchPatchBuilder(pts, spec, device="cpu").patches(torch.from_numpy(q))
    np.testing.assert_allclose(torch_s.numpy(), s, rtol=1e-5)
    # the same pseudo-points up to the order (and signs) of the axes
    np.testing.assert_allclose(np.sort(np.linalg.norm(torch_p.numpy()[:, 22:], axis=-1), 1),
                               np.sort(np.linalg.norm(p[:, 22:], axis=-1), 1), atol=1e-4)


def test_summary_of_points_has_their_mean_and_covariance():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(5, 40, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [2.0, 1.0, 0.1], dtype=torch.float64) + 0.5
    rows = summary_of(pts)
    assert rows.shape == (5, 6, 3)
    torch.testing.assert_close(rows.mean(1), pts.mean(1))
    d, e = pts - pts.mean(1, keepdim=True), rows - rows.mean(1, keepdim=True)
    torch.testing.assert_close(e.transpose(1, 2) @ e / 6, d.transpose(1, 2) @ d / 40)
