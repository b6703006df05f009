"""Orientation: MST propagation over several components, viewpoint and outward modes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sphere_points

from fapc.orient import orient, orient_mst, parse_orient


def _scrambled(n=4000, seed=0, center=(0.0, 0.0, 0.0)):
    pts = sphere_points(n, seed=seed) + np.array(center)
    gt = pts - np.array(center)
    rng = np.random.default_rng(seed)
    flips = rng.choice([-1.0, 1.0], size=(n, 1))
    return pts, gt, gt * flips


def test_mst_orients_two_components_outward():
    a, ga, na = _scrambled(3000, 0, (0, 0, 0))
    b, gb, nb = _scrambled(3000, 1, (10, 0, 0))
    pts, gt, scrambled = np.vstack([a, b]), np.vstack([ga, gb]), np.vstack([na, nb])
    out = orient_mst(pts, scrambled)
    agree = (out * gt).sum(1) > 0
    assert agree.mean() > 0.999  # both spheres outward, not just consistent
    # the scrambled input really was inconsistent: the test can fail
    assert 0.3 < ((scrambled * gt).sum(1) > 0).mean() < 0.7


def test_viewpoint_and_outward():
    pts, gt, scrambled = _scrambled()
    out = orient(pts, scrambled, "viewpoint", viewpoint=np.zeros(3))
    assert ((out * gt).sum(1) < 0).all()  # the centre sees the inside
    out = orient(pts, scrambled, "outward")
    assert ((out * gt).sum(1) > 0).all()


def test_parse_orient():
    assert parse_orient("mst") == ("mst", None)
    mode, vp = parse_orient("viewpoint:1,2,3")
    assert mode == "viewpoint" and vp.tolist() == [1, 2, 3]
    for bad in ("sideways", "viewpoint:1,2", "mst:1,2,3"):
        with pytest.raises(ValueError):
            parse_orient(bad)
