"""Patch building: the two scales, the outer ring, and the torch builder against scipy's."""

from __future__ import annotations

import numpy as np
import torch

from fapc.bench import synthetic_surface
from fapc.patches import PatchBuilder, PatchSpec, TorchPatchBuilder


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
    torch_p, torch_s = TorchPatchBuilder(pts, ringed, device="cpu").patches(torch.from_numpy(q))
    np.testing.assert_allclose(torch_s.numpy(), s1, rtol=1e-5)
    np.testing.assert_allclose(np.sort(np.linalg.norm(torch_p.numpy(), axis=-1)), np.sort(d),
                               atol=1e-4)
