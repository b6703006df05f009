"""A cloud's noise figure: how far its points scatter across the surface, in point spacings
(``fapc info --noise``, :func:`noise_figure`).

It is the figure the optional face choice at creases (:mod:`fapc.crease`) gates on, measured
on a seeded sample of the points: each sampled point's own plane (a PCA fit to its
``plane_k`` nearest points), the ``quantile`` of those planes' RMS residuals (face interiors
set it; the few points at edges do not), and the median distance to the ``(spacing_rank +
1)``-th nearest point. Neighbourhoods that are lines, not patches (their middle PCA
eigenvalue below ``LINE`` times the largest: the scan lines of a LiDAR sweep, whose nearest
points lie along one line), fit any plane through that line and would read as noiseless; they
are left out (their share is reported), and where nearly all are lines the level is
``unknown``. (The crease step's own gate takes every neighbourhood, lines too, so on such
scan-line data it may stay closed where this figure says ``light``.) The residual over the
spacing sorts clouds into three levels, which tell a user which of ``fapc normals``'s options
are made for the cloud:

- ``none`` (below ``gate_lo``): noiseless, as sampled meshes are; the default handles it.
- ``light`` (up to ``gate_hi``): as most scanners give; ``--light-smoothing`` (smooth
  surfaces) and ``--crease`` (sharp edges) are made for it. Detail as fine as the point
  spacing (a finely sculpted mesh), and curved surfaces sampled coarsely, read as light
  noise too.
- ``heavy`` (above): the residual of a small plane fit stops growing with the noise once the
  noise nears the spacing, so ``sigma`` is then a lower bound; the default's learned smoothing
  is made for it.

``whiteness`` (:func:`residual_whiteness`) tells noise from relief that reads as light noise:
it compares each point's residual to a quadric fit with its nearest neighbour's, which white
noise leaves unrelated and relief leaves alike.

``sigma``, the residual over a calibration factor (the residual of a ``plane_k``-point fit is
biased low), estimates the noise's standard deviation across the surface; in the light range
it is within about 25 % of the truth on a noisy plane (``tests/test_noise.py``). Built from
distances only: it moves with the cloud under rotations, translations and permutations, and
scales with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fapc.crease import CreaseSettings, quadric_heights, residual_scale
from fapc.eigen import sym3_eigh
from fapc.errors import FapcError
from fapc.pca import patch_covariance

LEVELS = ("none", "light", "heavy", "unknown")
LINE = 0.05  # a neighbourhood is a line where its middle eigenvalue < LINE x its largest
MIN_PATCHES = 100  # fewer neighbourhoods that are patches, not lines: level "unknown"


@dataclass(frozen=True)
class NoiseFigure:
    """``sigma``: the noise's estimated standard deviation (a lower bound at ``heavy``), in the
    cloud's units; ``spacing``: the median distance to the 9th nearest point; ``ratio``:
    the plane residual over the spacing (what the levels are cut on); ``level``: one of
    :data:`LEVELS`; ``points``: how many points were sampled; ``lines``: the share of their
    neighbourhoods that are lines (left out; NaN figures where nearly all are);
    ``whiteness``: whether the residual is noise or detail (:func:`residual_whiteness`: about
    1.2 for white noise, about 0.5 or less for detail finer than a quadric fit)."""

    sigma: float
    spacing: float
    ratio: float
    level: str
    points: int
    lines: float
    whiteness: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The fields, NaN as None (JSON has no NaN)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}


def noise_figure(points: Any, *, sample: int = 20_000, seed: int = 0,
                 settings: CreaseSettings = CreaseSettings()) -> NoiseFigure:
    """The noise figure of ``points (N, 3)`` (non-finite rows ignored), measured at ``sample``
    seeded points (all of them if fewer).

    Raises:
        FapcError: fewer finite points than a neighbourhood needs.
        ValueError: ``points`` is not ``(N, 3)``, or ``sample < 1``.
    """
    from scipy.spatial import cKDTree

    pts = np.asarray(getattr(points, "points", points), dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {pts.shape}")
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    s = settings
    pts = pts[np.isfinite(pts).all(axis=1)]
    k = max(s.plane_k, s.spacing_rank + 1)
    if len(pts) < k:
        raise FapcError(f"only {len(pts)} finite points, fewer than the {k} a noise figure needs")
    pts = pts - pts.mean(axis=0)
    rng = np.random.default_rng(seed)
    at = np.sort(rng.choice(len(pts), size=sample, replace=False)) if len(pts) > sample \
        else np.arange(len(pts))
    tree = cKDTree(pts)
    dist, near = tree.query(pts[at], k=k)  # (M, k) each, nearest first
    vals, _ = sym3_eigh(patch_covariance(torch.from_numpy(pts[near[:, :s.plane_k]])))  # (M, 3)
    patch = vals[:, 1] >= LINE * vals[:, 2]  # (M,) not a line
    lines = 1.0 - patch.double().mean().item()
    if int(patch.sum()) < min(MIN_PATCHES, len(at)):
        nan = float("nan")
        return NoiseFigure(sigma=nan, spacing=float(np.median(dist[:, s.spacing_rank])),
                           ratio=nan, level="unknown", points=len(at), lines=lines)
    residual = vals[patch, 0].clamp_min(0).sqrt()  # (P,) RMS distance to the own plane
    r, h = residual_scale(residual, torch.from_numpy(dist[:, s.spacing_rank])[patch], s)
    ratio = r / h if h > 0 else 0.0
    level = "none" if ratio < s.gate_lo else "light" if ratio < s.gate_hi else "heavy"
    white = residual_whiteness(pts, near_of=at[patch.numpy()][:WHITE_SAMPLE], tree=tree)
    return NoiseFigure(sigma=r / s.calib, spacing=h, ratio=ratio, level=level, points=len(at),
                       lines=lines, whiteness=white)


WHITE_K = 32  # residual_whiteness: the neighbourhood of each sampled point ...
WHITE_SAMPLE = 3000  # ... at this many of the figure's sampled points (patches, not lines)


def residual_whiteness(points: np.ndarray, *, near_of: np.ndarray, k: int = WHITE_K,
                       tree: Any = None) -> float:
    """Whether what scatters ``points (N, 3)`` off a smooth surface is noise or detail.

    At each point of ``near_of (S,)``, a quadric height field is fitted to its ``k`` nearest
    points (in their PCA frame), and each of those points' residual is compared with that of
    its nearest neighbour among them (over the tangent plane): the median over the
    neighbourhoods of ``mean (r_i - r_nn(i))^2 / (2 mean r_i^2)``. White noise leaves
    residuals that do not depend on their neighbours' (about 1.2: the fit makes nearby ones
    slightly opposed); detail finer than the quadric (sculpted relief, facets, ripples at the
    scale of the point spacing) leaves residuals that follow their neighbours' (0.4-0.6 on
    TRAIN meshes sampled coarsely, 0.4 on a rippled sphere). Distances only: it does not
    depend on the pose of the cloud. NaN where ``near_of`` is empty or nothing scatters.
    ``tree``: a ``cKDTree(points)`` already built.
    """
    from scipy.spatial import cKDTree

    if not len(near_of) or len(points) < k:
        return float("nan")
    _, nb = (tree or cKDTree(points)).query(points[near_of], k=k)  # (S, k)
    res, uv = quadric_heights(torch.from_numpy(points[nb]))  # (S, k), (S, k, 2)
    r, uv = res.numpy(), uv.numpy()
    d = np.square(uv[:, :, None] - uv[:, None, :]).sum(-1)  # (S, k, k) over the tangent plane
    d[:, np.arange(k), np.arange(k)] = np.inf
    rn = np.take_along_axis(r, d.argmin(axis=2), axis=1)  # (S, k) nearest neighbour's residual
    den = 2.0 * (r ** 2).mean(axis=1)
    ok = den > 0
    if not ok.any():
        return float("nan")
    return float(np.median(((r - rn) ** 2).mean(axis=1)[ok] / den[ok]))
