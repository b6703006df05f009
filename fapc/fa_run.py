"""The FA network's run over one cloud: patches, the network, the edge scale's second run,
the consensus step, and the draws of the far scale averaged (:func:`fa_normals`, behind
:func:`fapc.normals.estimate_normals` and :mod:`fapc.tiles`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fapc.eigen import sym3_eigh
from fapc.memory import trim_every
from fapc.runtime import default_batch_size, run_network

log = logging.getLogger(__name__)


def fa_normals(
    points: np.ndarray,
    model: Any,
    *,
    device: torch.device,
    batch_size: int | None = None,
    query_index: np.ndarray | None = None,
    seed: int = 0,
    far_index: np.ndarray | list[np.ndarray] | None = None,
    knn: str = "auto",
    consensus: bool = True,
    consensus_model: str | os.PathLike | None = None,
    crease: bool = False,
    light_smoothing: bool = False,
    progress: Callable[[int, int], None] | None = None,
    edge_scale: int = 0,
    draws: int = 1,
    plane_vote: bool = False,
    exact_planes: bool = False,
    resolution: float = 0.0,
    exact_min_change: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FA network's normals at ``query_index`` (default all) of finite ``points (N, 3)``
    float64 (centred); ``far_index``: the far scale's subsample, if not the seeded one
    (:class:`fapc.patches.PatchBuilder`; with ``draws``, a list of one per draw).
    ``draws``: the whole estimate runs this many times, each with its own seeded far-scale
    subsample (seeds ``seed``, ``seed + 1``, ...; the near scale's search is shared), and the
    normal is the top eigenvector of the draws' summed ``n n^T`` (unoriented normals: no
    cancellation), the confidence and curvature their means; it averages out the variance
    that the choice of far points leaves (under heavy noise; at a noiseless cloud's sharp
    edges). ``knn``: ``scipy`` (patches built on the CPU),
    ``torch`` (exact grid kNN on ``device``: the whole pipeline stays there) or ``auto``
    (torch on CUDA).
    ``consensus``: snap normals that straddle a crease onto one face (clean data), smooth
    them with their patch's under heavy noise (:mod:`fapc.consensus`); under light noise, with
    ``light_smoothing``, refit them from their nearest points' normals
    (:mod:`fapc.light`, a last consensus pass), on noiseless data, with ``plane_vote``, let the
    patch normals whose planes hold each point vote on its normal (:mod:`fapc.vote`, a last
    consensus pass instead; not with ``light_smoothing``), then, with ``crease``, give points near a
    sharp edge the face they lie on (:mod:`fapc.crease`); with ``query_index`` this runs the
    network on the queries' patch points too (and on theirs, one hop per consensus pass);
    ``consensus_model``: the learned smoothing's weights (default: the shipped ones).
    ``edge_scale``: where not 0, the points whose fit is curved (the network's curvature above
    the model's ``edge_curvature``: at sharp edges) are run again at this near scale, before
    the consensus step (:func:`fapc.near_scale.near_scales_for` sets it for lightly noisy
    clouds); their confidence and curvature stay those of the first run.
    ``exact_planes``: last of all, after the draws' average, each query whose facet holds it
    exactly (a cloud sampled without noise from a mesh) takes that plane's normal
    (:mod:`fapc.exact`; ``resolution``: the coordinates' rounding,
    :func:`fapc.exact.coordinate_resolution` of the cloud as read; ``exact_min_change``: a
    change by fewer degrees is not made, :attr:`fapc.exact.ExactSettings.min_change`).
    ``progress(done, total)``: after each batch, in points of work (the network's points,
    then each consensus pass's)."""
    from fapc.patches import (
        PatchBuilder,
        TorchPatchBuilder,
    )

    if knn == "auto":
        knn = "torch" if device.type == "cuda" else "scipy"
    if knn not in ("scipy", "torch"):
        raise ValueError(f"knn must be auto, scipy or torch, got {knn!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    last = last_pass(light_smoothing, plane_vote)
    if isinstance(far_index, list):
        fars = far_index
    elif far_index is None or draws == 1:
        fars = [far_index] * draws
    else:
        fars = []
    if len(fars) != draws:
        raise ValueError(f"far_index: a list of one subsample per draw ({draws}) expected")
    batch_size = batch_size or default_batch_size(device)
    n = len(points)
    spec = model.config.patch
    builder: Any = (TorchPatchBuilder(points, spec, device=device, seed=seed, far_index=fars[0])
                    if knn == "torch" else
                    PatchBuilder(points, spec, seed=seed, far_index=fars[0]))
    kwargs = dict(model=model, device=device, batch_size=batch_size, query_index=query_index,
                  seed=seed, far_index=fars[0], consensus=consensus,
                  consensus_model=consensus_model, crease=crease,
                  last=last, edge_scale=edge_scale)
    if draws == 1:
        result = _fa_draw(builder, progress=progress, **kwargs)
    else:
        result = _draws(builder, draws=draws, fars=fars, progress=progress, **kwargs)
    if exact_planes:
        qi = np.arange(n) if query_index is None else np.asarray(query_index, np.int64)
        result = (exact_pass(builder, result[0], qi, device=device, batch_size=batch_size,
                             resolution=resolution, min_change=exact_min_change), *result[1:])
    return result


def _draws(builder: Any, *, draws: int, fars: list[Any],
           progress: Callable[[int, int], None] | None, **kwargs: Any
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fa_normals`' ``draws`` of the far scale, each with its own subsample (``fars``:
    one per draw, None for the seeded one), combined by :class:`DrawSum`."""
    from fapc.patches import builder_with_far_index, far_subsample

    n, spec, seed = len(builder.points), builder.spec, kwargs["seed"]
    total = DrawSum()
    for d in range(draws):
        b = builder
        if d:  # another far subsample, everything else shared
            far = fars[d] if fars[d] is not None else far_subsample(n, spec, seed + d)
            b = builder_with_far_index(builder, far)
            kwargs.update(seed=seed + d, far_index=far)

        def part(done: int, of: int, d: int = d) -> None:  # draw d's share of the work
            if progress is not None:
                progress(d * of + done, draws * of)

        total.add(*_fa_draw(b, progress=part, **kwargs))
    return total.result()


def exact_pass(builder: Any, normals: np.ndarray, query: np.ndarray, *,
               device: torch.device, batch_size: int, resolution: float = 0.0,
               min_change: float = 0.0) -> np.ndarray:
    """:func:`fapc.exact.exact_planes` over the queries' ``normals (Q, 3)`` at the points
    ``query (Q,)`` of ``builder``'s cloud, with the facet planes of the queries and their
    support points (:func:`fapc.exact.facet_planes`, one hop), in batches (float64
    throughout: the planes are exact to the data's rounding); returns the new normals
    ``(Q, 3)`` float32; ``min_change``: :attr:`fapc.exact.ExactSettings.min_change`."""
    from fapc.exact import ExactSettings, exact_planes, facet_planes

    settings = ExactSettings(min_change=min_change)
    k = settings.support_k
    n = len(builder.points)
    pts = torch.as_tensor(builder.points, device=device).double()  # (N, 3)
    step = max(1, min(batch_size, 2048))  # (B, 190, 48) plane-point distances per batch

    def support_of(idx: np.ndarray) -> torch.Tensor:  # (B, k) nearest first, itself first
        return torch.as_tensor(builder.nearest(builder.as_index(idx), k), device=device).long()

    whole = len(query) == n
    planes = torch.zeros(n, 3, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.long, device=device)
    supports: list[torch.Tensor] = []  # the queries' support, kept for the second pass
    with torch.inference_mode():
        if whole:
            hop = np.arange(n)
        else:  # the queries and their support points
            for s in range(0, len(query), step):
                supports.append(support_of(query[s:s + step]))
            hop = np.unique(torch.cat(supports).cpu().numpy()) if supports else query
        for s in range(0, len(hop), step):
            trim_every(s // step)
            idx = torch.as_tensor(hop[s:s + step], device=device)
            planes[idx], counts[idx] = facet_planes(pts, query=idx, support=support_of(hop[s:s + step]),
                                                    resolution=resolution)
        out = np.asarray(normals, np.float32).copy()
        for b, s in enumerate(range(0, len(query), step)):
            idx = query[s:s + step]
            support = support_of(idx) if whole else supports[b]
            new, _ = exact_planes(pts, torch.as_tensor(out[s:s + len(idx)], device=device),
                                  query=torch.as_tensor(idx, device=device), support=support,
                                  resolution=resolution, planes=planes, counts=counts,
                                  settings=settings)
            out[s:s + len(idx)] = new.float().cpu().numpy()
    return out


class DrawSum:
    """The draws of :func:`fa_normals`, combined as they come: each normal the top
    eigenvector of the draws' summed ``n n^T`` (unoriented: no sign to cancel), confidence and
    curvature their means. Keeps running sums only (float64: 9 + 2 values per point)."""

    def __init__(self) -> None:
        self.outer: torch.Tensor | None = None  # (Q, 3, 3)
        self.sums: list[np.ndarray] = []  # confidence, curvature (Q,) each
        self.count = 0

    def add(self, normals: np.ndarray, *rest: np.ndarray) -> None:
        """One draw: ``normals (Q, 3)`` and optionally ``confidence, curvature (Q,)``."""
        nn = torch.from_numpy(np.asarray(normals)).double()  # (Q, 3)
        outer = nn.unsqueeze(2) * nn.unsqueeze(1)  # (Q, 3, 3)
        self.outer = outer if self.outer is None else self.outer + outer
        vals = [np.asarray(v, np.float64) for v in rest]
        self.sums = vals if not self.sums else [a + v for a, v in zip(self.sums, vals, strict=True)]
        self.count += 1

    def normals(self) -> np.ndarray:
        """``(Q, 3)`` float32: the top eigenvector of the summed ``n n^T``."""
        if self.outer is None:
            raise ValueError("no draw added")
        return sym3_eigh(self.outer)[1][..., 2].float().numpy()

    def result(self) -> tuple[np.ndarray, ...]:
        """The combined normals, then the mean of each other output added."""
        return (self.normals(), *[(a / self.count).astype(np.float32) for a in self.sums])


def _fa_draw(builder: Any, *, model: Any, device: torch.device, batch_size: int,
             query_index: np.ndarray | None, seed: int, far_index: np.ndarray | None,
             consensus: bool, consensus_model: str | os.PathLike | None, crease: bool,
             last: str | None, edge_scale: int,
             progress: Callable[[int, int], None] | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One draw of :func:`fa_normals` on ``builder`` (its far subsample): normals ``(Q, 3)``,
    confidence and curvature ``(Q,)``. ``last``: the consensus step's last pass
    (:func:`last_pass`)."""
    from fapc.confidence import final_confidence
    from fapc.consensus import ConsensusSettings
    from fapc.consensus_batches import consensus_pass, crease_pass, neighbour_agreement_at

    n = len(builder.points)
    qi = np.arange(n) if query_index is None else np.asarray(query_index, np.int64)
    passes = ConsensusSettings.snap_passes + int(last is not None) if consensus else 0
    # the points each consensus pass reads, from the last pass's (the queries) back to the
    # points the network sees: each pass reads its queries' candidates from the pass before
    sets = [qi] * (passes + 1)
    if query_index is not None:
        for h in range(1, passes + 1):
            sets[h] = _with_neighbours(builder, sets[h - 1], batch_size, builder.neighbours)
        if not passes:  # the confidence reads the queries' near neighbours' normals
            sets.append(_with_neighbours(builder, qi, batch_size, builder.near))
    run = sets[-1]  # points the network sees (sorted)
    rows = [np.searchsorted(run, sets[h]) for h in range(passes - 1, -1, -1)]
    # the queries' rows of run (all of them, in order, for a whole cloud: no copy)
    pos: Any = np.searchsorted(run, qi) if query_index is not None else slice(None)
    tick = _ticker(progress, len(run) + sum(len(r) for r in rows))
    out, far = _network_pass(builder, model, run, device=device, batch_size=batch_size,
                             keep_far=consensus, tick=tick)
    if edge_scale:  # light noise: curved fits (at sharp edges) again at a smaller near scale
        rerun_curved(builder, model, run, out, edge_scale=edge_scale, device=device,
                     batch_size=batch_size, seed=seed, far_index=far_index)
    if consensus:
        normal, before = consensus_pass(builder, out["normal"], far, run, rows, n=n,
                                        device=device, batch_size=batch_size,
                                        tick=tick, smoother_path=consensus_model,
                                        last=last)  # (Q, 3)
        if crease:  # light noise: the face each point near a sharp edge lies on
            normal = crease_pass(builder, normal, qi, device=device, batch_size=batch_size)
    else:
        normal, before = out["normal"][pos], out["normal"]
    agree = neighbour_agreement_at(builder, normal, before, run, qi, device=device,
                                   batch_size=batch_size)  # (Q,)
    conf = final_confidence(torch.from_numpy(out["confidence"][pos]), torch.from_numpy(agree))
    return normal, conf.numpy(), out["curvature"][pos]


def last_pass(light_smoothing: bool, plane_vote: bool) -> str | None:
    """The consensus step's last pass (:func:`fapc.consensus_batches.consensus_pass`'s
    ``last``): the light smoothing, the plane vote, or none (only snapping).

    Raises:
        ValueError: both asked for (each is the last pass).
    """
    if light_smoothing and plane_vote:
        raise ValueError("light_smoothing and plane_vote are both a last consensus pass (one "
                         "for lightly noisy clouds, one for noiseless ones): choose one")
    return "light" if light_smoothing else "vote" if plane_vote else None


def rerun_curved(builder: Any, model: Any, run: np.ndarray, out: dict[str, np.ndarray], *,
                 edge_scale: int, device: torch.device, batch_size: int, seed: int = 0,
                 far_index: np.ndarray | None = None) -> int:
    """The edge scale's second run: the points ``run (M,)`` whose network fit is curved
    (``out["curvature"] (M,)`` above the model's ``edge_curvature``) get the network's
    normals at near scale ``edge_scale`` in ``out["normal"] (M, 3)`` (in place; their
    confidence and curvature stay). ``builder``: the first run's patch builder, whose search
    structures the second shares where it can. Returns how many points ran again."""
    from fapc.patches import PatchBuilder, TorchPatchBuilder, builder_for_near_scale

    curved = np.flatnonzero(out["curvature"] > model.config.edge_curvature)  # rows of run
    if not len(curved) or edge_scale > len(builder.points):
        return 0
    small = model.with_near_scale(edge_scale)
    spec = small.config.patch
    again = builder_for_near_scale(builder, spec) or (
        TorchPatchBuilder(np.asarray(builder.points.cpu(), np.float64), spec, device=device,
                          seed=seed, far_index=far_index)
        if isinstance(builder, TorchPatchBuilder) else
        PatchBuilder(builder.points, spec, seed=seed, far_index=far_index))
    res, _ = _network_pass(again, small, run[curved], device=device, batch_size=batch_size)
    out["normal"][curved] = res["normal"]  # (C, 3)
    return len(curved)


def _with_neighbours(builder: Any, index: np.ndarray, batch_size: int,
                     find: Callable[[Any], Any]) -> np.ndarray:
    """The sorted union of ``index`` and the points ``find`` (``builder.near`` or
    ``builder.neighbours``) gives for them."""
    found = [torch.as_tensor(find(builder.as_index(index[s:s + batch_size]))).cpu().numpy()
             for s in range(0, len(index), batch_size)]
    return np.unique(np.concatenate([index, *[f.ravel() for f in found]]))


def _ticker(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """``tick(k)``: ``k`` more points of work done; reports ``progress(done, total)``."""
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    return tick


def _network_pass(builder: Any, model: Any, run: np.ndarray, *,
                  device: torch.device, batch_size: int, keep_far: bool = False,
                  tick: Callable[[int], None] | None = None
                  ) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
    """The network's outputs at the points ``run (M,)``: normal ``(M, 3)``, confidence and
    curvature ``(M,)``, float32 numpy; with ``keep_far`` also each point's far-scale
    neighbours ``(M, k_far)`` int32 on ``device`` (the consensus step's candidates, kept so
    that it need not search them again)."""
    keys = ("normal", "confidence", "curvature")
    outs: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    spec = builder.spec
    far = torch.empty(len(run), spec.k_far, dtype=torch.int32, device=device) if keep_far else None
    with torch.inference_mode():
        for s in range(0, len(run), batch_size):
            trim_every(s // batch_size)
            patches, _, nb = builder.patches(builder.as_index(run[s:s + batch_size]))
            if far is not None:
                far[s:s + len(nb)] = torch.as_tensor(nb[:, spec.far_rows], device=device)
            patches = torch.as_tensor(patches).to(device, non_blocking=True)
            res = run_network(model, patches)
            for key in keys:
                outs[key].append(res[key].float().cpu().numpy())
            if tick is not None:
                tick(len(nb))
    return {key: np.concatenate(outs[key]) for key in keys}, far
