"""How noisy a whole cloud is: the statistic that picks which of the two shipped networks
runs (:func:`fapc.normals.estimate_normals` with the default model).

For a seeded sample of points, the RMS distance of each point's 12 nearest points to their
best-fit plane (the square root of their covariance's smallest eigenvalue) over the
distance to its 10th nearest point; the cloud's figure is the 25 % quantile, which flat and
smoothly curved parts of the surface set (creases and corners, where even noiseless points
leave the plane, stay above it). Measured on TRAIN clouds only (the model card): noiseless
meshes sampled at 100,000-250,000 points gave at most 0.005, clouds with noise of 0.03 % of
the diagonal or more (and simulated line scans) at least 0.016.
"""

from __future__ import annotations

import numpy as np
import torch

from fapc.eigen import sym3_eigh

NOISY_FROM = 0.01  # clouds at or above this run the network trained for noise
SAMPLES = 3000
K = 12  # points in each plane fit (the point itself included)
SPACING_RANK = 9  # the spacing: distance to the 10th nearest point (the point itself first)


def cloud_noise(points: torch.Tensor | np.ndarray, near: torch.Tensor | np.ndarray,
                sample: torch.Tensor | np.ndarray) -> float:
    """The cloud's noise figure (see the module doc) from ``points (N, 3)``, a ``sample
    (M,)`` of point indices and ``near (M, S)``: each sampled point's nearest points,
    itself first, ``S >= 12``. Dimensionless: 0 on exactly planar neighbourhoods."""
    pts = torch.as_tensor(points)
    nb = torch.as_tensor(near, device=pts.device).long()
    idx = torch.as_tensor(sample, device=pts.device).long()
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {tuple(pts.shape)}")
    if nb.ndim != 2 or nb.shape[0] != idx.shape[0] or nb.shape[1] < K:
        raise ValueError(f"near must be (M, >= {K}) for M = len(sample), got {tuple(nb.shape)}")
    local = pts[nb[:, :K]].double()  # (M, K, 3)
    local = local - local.mean(1, keepdim=True)
    cov = local.transpose(1, 2) @ local / K  # (M, 3, 3)
    lam = sym3_eigh(cov)[0][:, 0].clamp_min(0)  # (M,) smallest eigenvalue
    spacing = (pts[nb[:, SPACING_RANK]] - pts[idx]).double().norm(dim=1)  # (M,)
    ok = spacing > 0
    if not bool(ok.any()):
        return 0.0
    ratio = lam[ok].sqrt() / spacing[ok]
    return float(torch.quantile(ratio, 0.25))


def noise_sample(n: int, *, seed: int = 0) -> np.ndarray:
    """The seeded sample of point indices the figure is measured at (``min(n, SAMPLES)``)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, SAMPLES), replace=False))
