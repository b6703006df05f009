"""``estimate_normals``: the Python entry point behind ``fapc normals``.

Non-finite points are handled here, once, for every method: they are left out of every
neighbourhood and get a zero normal, zero confidence and zero curvature. Exact duplicate
points are estimated once (:func:`fapc.neighbors.distinct_points`) and share the result, so
copies do not crowd a neighbourhood.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fapc.errors import FapcError
from fapc.exact import coordinate_resolution
from fapc.fa_run import fa_normals, last_pass
from fapc.models import checkpoint
from fapc.near_scale import choices_for, with_near_scale
from fapc.neighbors import distinct_points
from fapc.pca import pca_normals
from fapc.runtime import (
    PRECISIONS,
    configure_precision,
    load_network,
    resolve_device,
)
from fapc.tiles import MIN_TILE_POINTS, TILE_POINTS, tiled_fa_normals

log = logging.getLogger(__name__)

METHODS = ("fa", "pca")
PCA_K = 30  # PCA's neighbourhood size when none is given


@dataclass
class NormalsResult:
    """Per-point outputs, in the input's order.

    Attributes:
        normals: ``(N, 3)`` float32, unit (zero for invalid points).
        confidence: ``(N,)`` float32 in [0, 1].
        curvature: ``(N,)`` float32 (surface variation, in [0, 1/3]).
        valid: ``(N,)`` bool, False where the input point was not finite.
    """

    normals: np.ndarray
    confidence: np.ndarray
    curvature: np.ndarray
    valid: np.ndarray


def as_points(points: Any) -> np.ndarray:
    """``(N, 3)`` numpy array from a numpy array, a torch tensor, a :class:`fapc.PointCloud`
    or an open3d ``PointCloud``."""
    if hasattr(points, "points") and not isinstance(points, np.ndarray):
        points = points.points  # fapc.PointCloud or open3d.geometry.PointCloud
    if hasattr(points, "detach"):
        points = points.detach().cpu().numpy()
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return arr


def estimate_normals(
    points: Any,
    *,
    method: str = "fa",
    k: int | None = None,
    model: str | os.PathLike | Any | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int | None = None,
    query_index: np.ndarray | None = None,
    knn: str = "auto",
    precision: str = "auto",
    consensus: bool = True,
    consensus_model: str | os.PathLike | None = None,
    crease: bool = False,
    light_smoothing: bool | None = None,
    draws: int | None = None,
    plane_vote: bool | None = None,
    exact_planes: bool | None = None,
    tile_points: int | None = TILE_POINTS,
    progress: Callable[[int, int], None] | None = None,
) -> NormalsResult:
    """Estimate unoriented normals, a confidence and the curvature of every point.

    Args:
        points: ``(N, 3)`` array (float64 kept as float64 until each patch is centred),
            a torch tensor, a :class:`fapc.PointCloud` or an open3d ``PointCloud``.
        method: ``"fa"`` (the frame-averaging network) or ``"pca"`` (local PCA over ``k``
            neighbours).
        k: the neighbourhood size: PCA's (default :data:`PCA_K`, 30), or for ``fa`` the
            near scale of the network's patch (:data:`fapc.near_scale.FA_K_RANGE`; its far
            scale stays as it is). Default for ``fa``: the model's own (32 for the shipped
            model), or on a noiseless cloud its ``clean_k_near`` where it has one
            (:func:`fapc.near_scale.near_scale_for`). The weights do not depend on it, but
            they learned the size they were trained at (the README gives what other sizes
            did on the held-out TRAIN shapes).
        model: for ``fa``: a ``.safetensors`` file, a run directory, a loaded ``NormalNet``,
            or None for the shipped default model.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        batch_size: query points per network batch (default 4096 on a CPU, 262144 on CUDA).
        query_index: estimate only at these point indices (results are then ``(Q, ...)``).
        knn: neighbour search for ``fa``: ``scipy`` (CPU), ``torch`` (exact grid search on
            ``device``) or ``auto`` (torch on CUDA, scipy on the CPU).
        precision: the network's arithmetic for ``fa``: ``float32`` (= ``auto``) or ``bf16``
            (autocast on the widest layer; frames and fits stay float32 or wider). bf16 moves
            0.2-0.4 % of normals by more than 0.1 degree (none by 1 degree in our checks).
        consensus: for ``fa``: each normal looks at its patch's normals once more
            (:mod:`fapc.consensus`): it snaps onto one face where it straddles a sharp edge
            (clean and lightly noisy data; in three passes, see
            :attr:`fapc.consensus.ConsensusSettings.snap_passes`) and smooths with them under
            heavy noise. With ``query_index`` the network then also runs at the points those
            passes read (the queries' patch points, and theirs, three hops out).
        consensus_model: for ``fa`` with ``consensus``: the learned smoothing's weights, a
            ``.safetensors`` file or a directory holding ``consensus.safetensors`` (what
            ``python -m fapc.train_consensus --out DIR`` writes; train it on your own
            network's normals with ``--model``); None for the shipped weights (on a cloud
            whose noise figure reads heavily noisy, the package's heavy-noise ones where it
            holds them: :func:`fapc.near_scale.smoother_for_figure`).
        crease: for ``fa`` with ``consensus``: under light noise (up to about a quarter of
            the point spacing), a last step gives points a few noise widths from a sharp edge
            the face they lie on (:mod:`fapc.crease`; off by default: on TRAIN shapes it
            gains at 0.03-0.125 % noise, on the TEST split it changed nothing measurable).
        light_smoothing: for ``fa`` with ``consensus``: under light noise (0.012-0.1 point
            spacings), a last consensus pass refits each normal from its 32 nearest points'
            normals (:mod:`fapc.light`; one hop more with ``query_index``). For lightly noisy
            scans of smooth surfaces; it rounds detail at the scale of the point spacing.
            None (default): the model decides by the cloud's noise figure
            (:func:`fapc.near_scale.light_for_figure`: on where the cloud reads lightly noisy
            and its scatter is noise rather than detail, if the model sets
            ``light_whiteness``).
        draws: for ``fa``: run the estimate this many times, each with its own seeded draw
            of the far-scale subsample, and average (:func:`fa_normals`): it removes the
            variance the choice of far points leaves (under heavy noise, and at the sharp
            edges of noiseless clouds), at ``draws`` times the network's and the consensus
            step's cost. None (default): the model decides by the cloud's noise figure
            (:func:`fapc.near_scale.draws_for_figure`: its ``heavy_draws`` where the cloud
            reads heavily noisy, its ``clean_draws`` where it reads noiseless, else 1).
        plane_vote: for ``fa`` with ``consensus``: on noiseless data, a last consensus pass
            lets the patch normals whose planes hold each point vote on its normal
            (:mod:`fapc.vote`; one hop more with ``query_index``; not with
            ``light_smoothing``). None (default): the model decides by the cloud's noise
            figure (:func:`fapc.near_scale.vote_for_figure`: on where the cloud reads
            noiseless and has no scan lines, if the model sets ``clean_vote``).
        exact_planes: for ``fa``: last of all, each point whose mesh facet holds it exactly
            (a cloud sampled without noise from a mesh, in float64 or float32 coordinates)
            takes that plane's normal (:mod:`fapc.exact`). None (default): the model decides
            by the cloud's noise figure (:func:`fapc.near_scale.exact_for_figure`: on where
            the cloud reads noiseless and has no scan lines, if the model sets
            ``clean_exact``; there a change by fewer than the model's ``exact_min_change``
            degrees is not made).
        tile_points: for ``fa``: a cloud of more finite points than this is done in tiles
            of at most this many, each with a halo (:mod:`fapc.tiles`), so memory stays that
            of one tile (about 3 GB on a CPU for the default 5 M); the answers are those of
            one run wherever the halo covers what they read. None: never.
        progress: called as ``progress(done, total)`` as the work goes on (for ``fa``, in
            points: the network's, then each consensus pass's; in tiles, the queries
            answered; otherwise once, at the end).

    Raises:
        FapcError: no finite point, or fewer distinct finite points than a neighbourhood
            needs.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if k is not None and k < 3:
        raise ValueError(f"k must be at least 3, got {k}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if draws is not None and draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    last_pass(bool(light_smoothing), bool(plane_vote))  # both forced: a ValueError
    if tile_points is not None and tile_points < MIN_TILE_POINTS:
        raise ValueError(f"tile_points must be at least {MIN_TILE_POINTS} (or None), got {tile_points}")
    pts = as_points(points)
    valid = np.isfinite(pts).all(axis=1)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise FapcError("no finite point")
    net = None
    if method == "fa":
        dev = resolve_device(device)
        net = load_network(model, dev, consensus_model=consensus_model if consensus else None)
        if k is not None:
            net = with_near_scale(net, k)
        configure_precision(net, dev, precision)
        need = getattr(net.config, "points", None) or max(net.config.k_near,
                                                           net.config.patch.k_far_all)
    else:
        k = PCA_K if k is None else k
        need = k
    finite = np.asarray(pts[valid] if n_valid < len(pts) else pts, np.float64)  # (M, 3)
    dup = distinct_points(finite)  # exact duplicates: estimated once, copied back
    if dup is not None:
        log.info("%d duplicate points: each distinct point is estimated once",
                 len(finite) - len(dup[0]))
        finite = finite[dup[0]]  # (U, 3)
    if len(finite) < need:
        what = "finite" if dup is None else "distinct finite"
        noun = "point" if len(finite) == 1 else "points"
        raise FapcError(f"only {len(finite)} {what} {noun}, fewer than k={need} (the "
                        "neighbourhood size)")
    as_read = finite  # the coordinates' rounding is that of the cloud as read
    # centre the whole cloud in float64 first: georeferenced coordinates keep their precision
    finite = finite - finite.mean(axis=0)
    if query_index is not None:
        qi = np.asarray(query_index, np.int64)
        if n_valid < len(pts):  # map to indices among the finite points
            remap = np.cumsum(valid) - 1
            ok = valid[qi]
            qi_f = remap[qi[ok]]
        else:
            ok, qi_f = np.ones(len(qi), bool), qi
    else:
        qi_f, ok = None, valid
    expand = None  # rows of the distinct points' results, per finite point (or query)
    if dup is not None:
        if qi_f is None:
            expand = dup[1]
        else:
            qi_f, expand = np.unique(dup[1][qi_f], return_inverse=True)
    if method == "fa" and getattr(net.config, "kind", "patch") != "shape":
        edge, light, n_draws = 0, bool(light_smoothing), draws or 1
        vote, exact = bool(plane_vote), bool(exact_planes)
        # the model's own choice leaves small changes (its exact_min_change); forced, all
        min_change = float(getattr(net.config, "exact_min_change", 0.0)) if exact_planes is None else 0.0
        smoother = consensus_model
        own_smoother = (consensus and consensus_model is None
                        and checkpoint.HEAVY_CONSENSUS_MODEL.exists())
        if (k is None or light_smoothing is None or draws is None or plane_vote is None
                or exact_planes is None or own_smoother):  # chosen by the cloud's noise
            chosen = choices_for(finite, net)  # (fapc.near_scale)
            if k is None:
                net, edge = net.with_near_scale(chosen.k), chosen.edge
            if light_smoothing is None:
                light = chosen.light and not plane_vote
            if plane_vote is None:
                vote = chosen.vote and not light
            if exact_planes is None:
                exact = chosen.exact
            if draws is None:
                n_draws = chosen.draws
            if consensus_model is None:
                smoother = chosen.smoother
        run: Callable[..., Any] = fa_normals
        if tile_points is not None and len(finite) > tile_points:
            run = functools.partial(tiled_fa_normals, tile_points=tile_points)
        nrm, conf, curv = run(finite, net, device=dev, batch_size=batch_size,
                              query_index=qi_f, knn=knn, consensus=consensus,
                              consensus_model=smoother, crease=crease,
                              light_smoothing=light, progress=progress,
                              edge_scale=edge, draws=n_draws, plane_vote=vote,
                              exact_planes=exact,
                              resolution=coordinate_resolution(as_read) if exact else 0.0,
                              exact_min_change=min_change)
    else:  # PCA, or a whole-shape model: one step
        if method == "pca":
            nrm, conf, curv = pca_normals(finite, k=k, query_index=qi_f)
        else:
            from fapc.models.shape_net import shape_normals

            nrm, conf, curv = shape_normals(finite, net, device=dev, query_index=qi_f)
        if progress is not None:
            progress(len(nrm), len(nrm))
    if expand is not None:
        nrm, conf, curv = nrm[expand], conf[expand], curv[expand]
    m = len(pts) if query_index is None else len(query_index)
    if ok.all():
        return NormalsResult(nrm, conf, curv, ok)
    out = NormalsResult(np.zeros((m, 3), np.float32), np.zeros(m, np.float32),
                        np.zeros(m, np.float32), ok)
    out.normals[ok], out.confidence[ok], out.curvature[ok] = nrm, conf, curv
    return out
