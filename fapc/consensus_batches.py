"""The steps after the network, run over a whole cloud in batches: the neighbour consensus
(:mod:`fapc.consensus`, with the light smoothing of :mod:`fapc.light` or the plane vote of
:mod:`fapc.vote` as its last pass where they run), its candidates and support found through
the patch builder, its spreads kept up to date between the passes, and the shipped learned
smoothing loaded where the package holds it; the optional face choice at creases
(:mod:`fapc.crease`); and the neighbours' agreement that the confidence multiplies in.
:func:`fapc.normals.estimate_normals` calls them after the network."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fapc.errors import FapcError
from fapc.gather import rows as rows_of
from fapc.memory import trim_every

LAST_PASSES = (None, "light", "vote")  # consensus_pass's ``last``: what its last pass is


def consensus_model(device: torch.device, path: str | os.PathLike | None = None) -> Any:
    """The learned consensus step (:mod:`fapc.models.consensus_net`) on ``device``: the file
    ``path`` (or a directory holding ``consensus.safetensors``, as
    ``python -m fapc.train_consensus --out`` writes it), or else the shipped one, or None
    where the package holds none (then the fixed smoothing runs).

    Raises:
        FapcError: ``path`` is missing or is not a consensus-step model.
    """
    from fapc.models.checkpoint import CONSENSUS_MODEL, cached_model

    if path is None:
        if not CONSENSUS_MODEL.exists():
            return None
        return cached_model(str(CONSENSUS_MODEL), str(device))[0]
    p = Path(path)
    if p.is_dir():
        p = p / CONSENSUS_MODEL.name
    model, info = cached_model(str(p), str(device))
    if getattr(info["config"], "kind", None) != "consensus":
        raise FapcError("not a consensus-step model (one that python -m fapc.train_consensus "
                        "writes)", path=p)
    return model


def consensus_pass(builder: Any, normals: np.ndarray, far: torch.Tensor, run: np.ndarray,
                   rows: list[np.ndarray], *, n: int, device: torch.device,
                   batch_size: int, tick: Callable[[int], None] | None = None,
                   smoother_path: str | os.PathLike | None = None, last: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour consensus (:func:`fapc.consensus.consensus_normals`), given the network's
    ``normals (M, 3)`` and far neighbours ``far (M, k_far)`` at the points ``run (M,)`` of a
    cloud of ``n``. ``rows``: for each pass, the rows of ``run`` it refines (the first pass
    snaps or smooths, the later ones snap again with the normals of the pass before, see
    :attr:`fapc.consensus.ConsensusSettings.snap_passes`; each pass's candidates must be among
    the rows of the pass before, the first's among all of ``run``). A query's candidates are
    its patch's points (near, then far), its support the near scale; on noisy data the
    learned smoothing (:func:`consensus_model`: ``smoother_path``, or the shipped one) runs
    where it is present. ``last``: the last pass is the light smoothing (``"light"``,
    :func:`fapc.light.light_smoothing`) or the plane vote (``"vote"``,
    :func:`fapc.vote.plane_vote`) instead of a snapping pass. Returns the normals
    ``(Q, 3)`` float32 at the last pass's rows, and the normals ``(M, 3)`` float32 at ``run``
    as the last pass found them (what the confidence's neighbour agreement compares with: the
    same in a run over the whole cloud and over ``rows[-1]`` alone); ``tick(k)`` after each
    batch of ``k`` rows."""
    from fapc.consensus import ConsensusSettings, consensus_normals, spread
    from fapc.light import light_smoothing
    from fapc.vote import plane_vote

    if last not in LAST_PASSES:
        raise ValueError(f"last must be one of {LAST_PASSES}, got {last!r}")
    if len(rows) < 1 + int(last is not None):
        raise ValueError("consensus_pass needs at least one pass (two with a last pass)")
    last_step = {"light": light_smoothing, "vote": plane_vote}.get(last or "")

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    pts = torch.as_tensor(builder.points, device=device).to(dtype)  # (N, 3)
    full = torch.zeros(n, 3, dtype=dtype, device=device)
    run_t = torch.as_tensor(run, device=device)
    full[run_t] = torch.as_tensor(normals, device=device).to(dtype)
    spreads = torch.zeros(n, dtype=dtype, device=device)
    smoother = consensus_model(device, smoother_path)

    def near_of(idx: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(builder.near(builder.as_index(idx)), device=device)

    def update_spreads(at: torch.Tensor) -> None:  # ``at``: rows of run
        for s in range(0, len(at), batch_size):
            r = at[s:s + batch_size]
            spreads[run_t[r]] = spread(pts, full, run_t[r],
                                       near_of(run[r.cpu().numpy()])[:, :ConsensusSettings.spread_k])

    with torch.inference_mode():
        update_spreads(torch.arange(len(run), device=device))
        moved = torch.zeros(n, dtype=torch.bool, device=device)  # (N,) changed by the last pass
        for p, pass_rows in enumerate(rows):
            if p == len(rows) - 1:
                before = full[run_t]  # (M, 3) a copy: the normals the last pass reads
            pos_t = torch.as_tensor(pass_rows, device=device)
            arrays = None  # the learned step's features come from float32 copies (half the cost)
            if p == 0 and smoother is not None:
                arrays = (pts.float(), full.float(), spreads.float())
            last_pass = last_step is not None and p == len(rows) - 1
            q_all = run_t[pos_t]
            new = full[q_all]  # (R, 3) a copy: rows a later pass skips keep their normal
            for s in range(0, len(pos_t), batch_size):
                trim_every(s // batch_size)
                r = pos_t[s:s + batch_size]  # (B,) rows of run
                q = run_t[r]
                near = near_of(run[r.cpu().numpy()])
                cand = torch.cat([near, far[r].long()], 1)  # (B, k_near + k_far)
                at = slice(s, s + len(q))
                if last_pass:
                    new[at], _ = last_step(pts, full, spreads, query=q, candidates=cand,
                                           support=near)
                else:
                    if p > 0:  # a later snapping pass repeats the one before where nothing
                        # it reads moved: the query's normal, its candidates' normals and
                        # spreads (a spread reads only its own point's normal)
                        go = (moved[q] | rows_of(moved, cand).any(1)).nonzero().squeeze(1)
                        q, cand, near = q[go], cand[go], near[go]
                        at = s + go
                    if len(q):
                        new[at], _, _ = consensus_normals(
                            pts, full, spreads, query=q, candidates=cand, support=near,
                            smoother=smoother if p == 0 else None, n_near=near.shape[1],
                            smoother_arrays=arrays, smooth=p == 0)
                if tick is not None:
                    tick(len(r))
            changed = (new != full[q_all]).any(1)  # (R,)
            full[q_all] = new
            if p + 1 < len(rows):
                update_spreads(pos_t[changed])
                moved.zero_()
                moved[q_all[changed]] = True
    final = full[run_t[torch.as_tensor(rows[-1], device=device)]]
    return final.float().cpu().numpy(), before.float().cpu().numpy()


def crease_pass(builder: Any, normals: np.ndarray, query: np.ndarray, *,
                device: torch.device, batch_size: int) -> np.ndarray:
    """The face choice at creases under light noise (:mod:`fapc.crease`) over the queries'
    ``normals (Q, 3)`` at the points ``query (Q,)``; returns the new normals ``(Q, 3)``
    float32 (the same array, unchanged, where the cloud's noise gate is closed). Every
    point's own plane is fitted first (the noise figure is the whole cloud's), so a run over
    some queries gives them what a run over the whole cloud does."""
    from fapc.crease import (
        CreaseSettings,
        cloud_sigma,
        crease_candidates,
        crease_faces,
        local_planes,
    )

    s = CreaseSettings()
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    pts = torch.as_tensor(builder.points, device=device).to(dtype)  # (N, 3)
    n = len(pts)
    centres, plane_n = torch.empty_like(pts), torch.empty_like(pts)
    residual = torch.empty(n, dtype=dtype, device=device)  # (N,) each point's plane residual
    spacing = torch.empty_like(residual)  # (N,) distance to its 9th nearest point

    def nearest(idx: np.ndarray, k: int) -> torch.Tensor:  # (len(idx), k), nearest first
        if builder.spec.k_near >= k:  # the patch builder's near scale holds them
            near = builder.near(builder.as_index(idx))[:, :k]
        else:
            near = builder.nearest(builder.as_index(idx), k)
        return torch.as_tensor(near, device=device).long()

    with torch.inference_mode():
        for b in range(0, n, 1 << 17):
            idx = np.arange(b, min(n, b + (1 << 17)))
            near = nearest(idx, max(s.plane_k, s.spacing_rank + 1))
            at = slice(b, b + len(idx))
            centres[at], plane_n[at], residual[at] = local_planes(pts, near[:, :s.plane_k])
            spacing[at] = (rows_of(pts, near[:, s.spacing_rank]) - pts[at]).norm(dim=-1)
        sigma = cloud_sigma(residual, spacing, s)
        if sigma is None:
            return normals
        out = torch.as_tensor(normals, device=device).to(dtype)  # (Q, 3)
        for b in range(0, len(query), batch_size):
            trim_every(b // batch_size)
            idx = query[b:b + batch_size]
            go = crease_candidates(pts, centres, plane_n, support=nearest(idx, s.pre_k),
                                   sigma=sigma, settings=s).nonzero().squeeze(1)
            for c in range(0, len(go), 4096):  # the full test holds (B, 8, 48, 48) flags
                part = go[c:c + 4096]
                support = torch.as_tensor(
                    builder.nearest(builder.as_index(idx[part.cpu().numpy()]), s.k),
                    device=device).long()
                at = b + part
                out[at], _ = crease_faces(pts, out[at], centres, plane_n, support=support,
                                          sigma=sigma, settings=s)
    return out.float().cpu().numpy()


def neighbour_agreement_at(builder: Any, normals: np.ndarray, before: np.ndarray,
                           run: np.ndarray, query: np.ndarray, *, device: torch.device,
                           batch_size: int) -> np.ndarray:
    """:func:`fapc.confidence.neighbour_agreement` of the final ``normals (Q, 3)`` at ``query
    (Q,)`` with their near neighbours' normals in ``before (M, 3)``, the normals at the
    sorted points ``run (M,)`` (which hold every query's near neighbours) as the last step
    read them. Returns ``(Q,)`` float32."""
    from fapc.confidence import neighbour_agreement
    from fapc.gather import rows as gather

    whole = len(run) == len(builder.points)  # run is every point: rows are point indices
    table = torch.as_tensor(before, device=device).float()
    run_t = None if whole else torch.as_tensor(run, device=device)
    out = np.empty(len(query), np.float32)
    with torch.inference_mode():
        for s in range(0, len(query), batch_size):
            near = torch.as_tensor(builder.near(builder.as_index(query[s:s + batch_size])),
                                   device=device)
            near = near[:, 1:].long().contiguous()  # (B, k_near - 1): not the point itself
            at = near if run_t is None else torch.searchsorted(run_t, near)
            own = torch.as_tensor(normals[s:s + batch_size], device=device).float()
            out[s:s + len(own)] = neighbour_agreement(own, gather(table, at)).cpu().numpy()
    return out
