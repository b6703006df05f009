"""Equivariance checks for any function of point sets (used by our tests; public so users
can check their own FA models).

``equivariance_error(fn, points, group="E3")`` draws random group elements (rotations,
reflections where the group has them, translations where it has them) and point permutations,
and compares ``fn(g . X)`` with ``g . fn(X)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fapc.frames import _check_group, has_reflections, has_translations


def random_rotation(generator: torch.Generator, *, dtype: torch.dtype = torch.float64,
                    reflect: bool = False) -> torch.Tensor:
    """A Haar-random ``(3, 3)`` rotation (times ``diag(1, 1, -1)`` when ``reflect``)."""
    a = torch.randn(3, 3, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q = q @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=dtype))
    return q


def equivariance_error(
    fn: Callable[[torch.Tensor], torch.Tensor],
    points: torch.Tensor,
    *,
    group: str = "E3",
    output: str = "invariant",
    per_point: bool = False,
    trials: int = 8,
    seed: int = 0,
    reflections: bool | None = None,
    permute: bool = True,
) -> dict[str, float]:
    """Worst and median error of ``fn`` under random group elements and permutations.

    Args:
        fn: ``(B, N, 3) -> (B, *S)``.
        points: ``(B, N, 3)``; float64 recommended.
        group: which transformations to draw (``O3``, ``SO3``, ``E3``, ``SE3``).
        output: ``invariant`` (expect ``fn(gX) == fn(X)``), ``equivariant`` (vectors:
            ``fn(gX) == fn(X) Q^T``) or ``axis`` (unit vectors up to sign).
        per_point: the output's dim 1 indexes points (it is permuted with them).
        trials: how many random elements (half of them reflections when drawn).
        reflections: draw reflections (default: when ``group`` has them).
        permute: also permute the points (off for inputs whose order carries meaning).

    Returns:
        ``{"worst": ..., "median": ...}``: max abs deviation per trial (for ``axis``:
        ``min(|a - b|, |a + b|)``).
    """
    g = _check_group(group)
    reflections = has_reflections(g) if reflections is None else reflections
    gen = torch.Generator().manual_seed(seed)
    base = fn(points)
    errs = []
    for t in range(trials):
        q = random_rotation(gen, dtype=points.dtype, reflect=reflections and t % 2 == 1)
        q = q.to(points.device)
        shift = (torch.randn(3, generator=gen, dtype=points.dtype) * 10).to(points.device) \
            if has_translations(g) else torch.zeros(3, dtype=points.dtype, device=points.device)
        perm = torch.randperm(points.shape[1], generator=gen).to(points.device) if permute \
            else torch.arange(points.shape[1], device=points.device)
        moved = points[:, perm] @ q.T + shift
        got = fn(moved)
        want = base[:, perm] if per_point else base
        if output in ("equivariant", "axis"):
            want = want @ q.T
        if output == "axis":
            err = torch.minimum((got - want).norm(dim=-1), (got + want).norm(dim=-1)).max()
        else:
            err = (got - want).abs().max()
        errs.append(float(err.detach()))
    errs_t = torch.tensor(errs)
    return {"worst": float(errs_t.max()), "median": float(errs_t.median())}


def degeneracy_sweep(
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    ratios: tuple[float, ...] = (1.0, 1.0001, 1.001, 1.01, 1.1, 1.5),
    patches: int = 256,
    points: int = 64,
    output: str = "axis",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, float]]:
    """How far ``fn``'s output moves under random rotations of planar patches whose two
    in-plane spreads have the ratio ``r`` (``r = 1``: isotropic disc, ``lambda1 = lambda2``).

    Returns, per ratio, the median frame stability and the median/max output change
    (degrees for ``axis``, absolute for ``invariant``).
    """
    from fapc.frames import compute_frames

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r in ratios:
        # rings of equally spaced points (random radius and phase per ring): the in-plane
        # covariance is exactly isotropic, then stretched by r along x
        per_ring = 8
        rings = max(points // per_ring, 1)
        radius = torch.rand(patches, rings, 1, generator=gen, dtype=torch.float64) + 0.1
        phase = torch.rand(patches, rings, 1, generator=gen, dtype=torch.float64) * 2 * torch.pi
        ang = phase + torch.arange(per_ring, dtype=torch.float64) * (2 * torch.pi / per_ring)
        xy = torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], -1)
        xy = xy.reshape(patches, rings * per_ring, 2)
        xy = xy * torch.tensor([r, 1.0], dtype=torch.float64)
        points = xy.shape[1]
        z = 0.05 * torch.randn(patches, points, 1, generator=gen, dtype=torch.float64)
        pts = torch.cat([xy, z], -1).to(dtype)
        stab = compute_frames(pts, group="SO3").stability
        base = fn(pts)
        worst = torch.zeros(patches)
        for _ in range(4):
            q = random_rotation(gen, dtype=dtype)
            got = fn(pts @ q.T)
            want = base @ q.T if output == "axis" else base
            if output == "axis":
                cos = (got * want).sum(-1).abs().clamp(max=1)
                d = torch.rad2deg(torch.arccos(cos))
            else:
                d = (got - want).abs().reshape(patches, -1).amax(-1)
            worst = torch.maximum(worst, d.float())
        rows.append({"ratio": r, "stability": float(stab.median()),
                     "median_change": float(worst.median()), "max_change": float(worst.max())})
    return rows
