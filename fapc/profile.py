"""Stage-by-stage timing of the normals pipeline (``fapc bench``): read, neighbours and
patches, frames, network, orientation, write; with points/s, peak memory, and open3d's
``estimate_normals`` on the same cloud when open3d is importable."""

from __future__ import annotations

import os
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fapc.cloud import PointCloud
from fapc.io import read_cloud, write_cloud


def parse_sizes(text: str) -> list[int]:
    """``"100k,1M,10M"`` -> ``[100000, 1000000, 10000000]``."""
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        mult = {"k": 1_000, "m": 1_000_000}.get(tok[-1:], 1)
        try:
            n = int(float(tok[:-1] if mult > 1 else tok) * mult)
        except (ValueError, OverflowError):
            n = 0
        if n < 1:
            raise ValueError(f"cloud sizes are whole numbers with an optional k or M, such as "
                             f"100k,1M; got {text!r}")
        out.append(n)
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _clock(dev: torch.device) -> Callable[[], float]:
    def now() -> float:
        _sync(dev)
        return time.perf_counter()
    return now


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_file(path: str, *, method: str = "fa", device: str = "cpu", model: str | None = None,
                 k: int = 30, orient: str = "none", batch_size: int | None = None,
                 out_path: str | None = None, precision: str = "auto", crease: bool = False,
                 light_smoothing: bool | None = None) -> dict[str, Any]:
    """Run the pipeline on one file, timing each stage (seconds); ``crease`` and
    ``light_smoothing``: with those optional steps (timed in the consensus stage; None: the
    light smoothing where the model's choice for the cloud runs it, as in fapc normals)."""
    from fapc.runtime import resolve_device

    dev = resolve_device(device)
    now = _clock(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t: dict[str, float] = {}
    t0 = now()
    cloud = read_cloud(path)
    t["read"] = now() - t0
    pts = cloud.points.astype(np.float64)
    pts = pts - pts.mean(0)
    n = len(pts)
    setup: float | None = None  # CUDA graph capture, once per model
    if method == "pca":  # chunk by chunk, as the pipeline does: memory stays bounded
        from scipy.spatial import cKDTree

        from fapc.neighbors import knn
        from fapc.pca import pca_normals

        t0 = now()
        tree = cKDTree(pts)
        t["knn"], t["estimate"] = now() - t0, 0.0
        normals = np.empty((n, 3), np.float32)
        for s in range(0, n, 1 << 16):
            sl = np.arange(s, min(s + (1 << 16), n))
            t0 = now()
            idx = knn(pts, k, queries=pts[sl], tree=tree)
            t["knn"] += now() - t0
            t0 = now()
            normals[sl] = pca_normals(pts, neighbors=idx, query_index=sl)[0]
            t["estimate"] += now() - t0
    else:
        normals, setup = _profile_fa(pts, t, dev=dev, model=model, batch_size=batch_size, now=now,
                                     precision=precision, crease=crease,
                                     light_smoothing=light_smoothing)
    if orient != "none":
        from fapc.orient import orient_spec

        t0 = now()
        normals = orient_spec(pts, normals.astype(np.float64), orient)
        t["orient"] = now() - t0
    cloud.normals = normals.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = now()
        write_cloud(out_path or os.path.join(tmp, "out.ply"), cloud)
        t["write"] = now() - t0
    total = sum(t.values())
    res: dict[str, Any] = {"file": path, "points": n, "method": method, "device": str(dev),
                           "stages_s": t, "total_s": total, "points_per_s": n / total,
                           "estimate_points_per_s": n / sum(v for s, v in t.items()
                                                            if s not in ("read", "write")),
                           "peak_rss_mb": peak_rss_mb()}
    if setup is not None:
        res["graph_capture_s"] = setup
    if dev.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def _profile_fa(pts: np.ndarray, t: dict[str, float], *, dev: torch.device, model: str | None,
                batch_size: int | None, now: Callable[[], float], precision: str,
                crease: bool = False, light_smoothing: bool | None = None
                ) -> tuple[np.ndarray, float | None]:
    """The FA normals ``(N, 3)``, stage times added to ``t``; and the CUDA graph's capture
    time (one-time, like loading the model: not a stage), or None. The optional steps
    (``crease``, ``light_smoothing``) count in the consensus stage."""
    from fapc import runtime
    from fapc.consensus import ConsensusSettings
    from fapc.consensus_batches import consensus_pass, crease_pass, neighbour_agreement_at
    from fapc.fa_run import DrawSum, last_pass, rerun_curved
    from fapc.frames import compute_frames
    from fapc.memory import trim_every
    from fapc.models.checkpoint import load_model
    from fapc.near_scale import choices_for
    from fapc.patches import (
        PatchBuilder,
        TorchPatchBuilder,
        builder_with_far_index,
        far_subsample,
    )

    net, _ = load_model(model, device=dev)
    runtime.configure_precision(net, dev, precision)
    batch_size = batch_size or runtime.default_batch_size(dev)
    n = len(pts)
    t0 = now()
    chosen = choices_for(pts, net)  # as fapc normals picks them (a kNN stage)
    edge = chosen.edge
    light_smoothing = chosen.light if light_smoothing is None else light_smoothing
    last = last_pass(light_smoothing, chosen.vote and not light_smoothing)  # as fapc normals
    net = net.with_near_scale(chosen.k)
    if dev.type == "cuda":
        builder: Any = TorchPatchBuilder(pts, net.config.patch, device=dev)
    else:
        builder = PatchBuilder(pts, net.config.patch)
    t["knn"] = now() - t0
    t["frames"] = t["network"] = t["consensus"] = 0.0
    spec = net.config.patch
    graphed = dev.type == "cuda" and runtime.CUDA_GRAPHS
    if graphed:  # capture once before timing, as a batch of files does (model loaded once)
        from fapc.cuda_graphs import graphed_forward

        t0 = now()
        with torch.inference_mode():
            graphed = graphed_forward(net, torch.zeros(1, spec.size, 3, device=dev)) is not None
        setup: float | None = now() - t0
    else:
        setup = None
    total = DrawSum()  # the draws combined (as fapc.fa_run.fa_normals does)
    for d in range(chosen.draws):
        b = builder if d == 0 else builder_with_far_index(builder, far_subsample(n, spec, d))
        normals = np.empty((n, 3), np.float32)
        curvature = np.empty(n, np.float32)
        far = torch.empty(n, spec.k_far, dtype=torch.int32, device=dev)  # consensus candidates
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                trim_every(s // batch_size)  # as the pipeline does (fapc.memory)
                q = np.arange(s, min(s + batch_size, n))
                t0 = now()
                patches, _, nb = b.patches(b.as_index(q))
                patches = torch.as_tensor(patches)
                far[s:s + len(q)] = torch.as_tensor(nb[:, spec.far_rows], device=dev)
                t["knn"] += now() - t0
                if not graphed:  # eager: time the frames alone (the forward pass repeats them)
                    t0 = now()
                    compute_frames(patches, group=net.config.group,
                                   center=torch.zeros(len(q), 3, device=dev))
                    t["frames"] += now() - t0
                t0 = now()
                out = runtime.run_network(net, patches)
                normals[q] = out["normal"].float().cpu().numpy()
                curvature[q] = out["curvature"].float().cpu().numpy()
                t["network"] += now() - t0
        if edge:  # light noise: curved fits again at the edge scale (counted as network time)
            t0 = now()
            rerun_curved(b, net, np.arange(n), {"normal": normals, "curvature": curvature},
                         edge_scale=edge, device=dev, batch_size=batch_size)
            t["network"] += now() - t0
        t0 = now()
        run = np.arange(n)
        passes = ConsensusSettings.snap_passes + int(last is not None)
        normals, before = consensus_pass(b, normals, far, run, [run] * passes, n=n,
                                         device=dev, batch_size=batch_size, last=last,
                                         smoother_path=chosen.smoother)
        if crease:
            normals = crease_pass(b, normals, run, device=dev, batch_size=batch_size)
        neighbour_agreement_at(b, normals, before, run, run, device=dev,
                               batch_size=batch_size)  # the confidence's part
        t["consensus"] += now() - t0
        if chosen.draws > 1:
            total.add(normals)
    if graphed:  # one graph holds frames and network: their times are not separable
        del t["frames"]
    else:
        t["network"] = max(t["network"] - t["frames"], 0.0)  # the forward pass includes frames
    if chosen.draws > 1:
        normals = total.normals()
    return normals, setup


def open3d_reference(path: str, k: int = 30) -> dict[str, Any] | None:
    """open3d read + ``estimate_normals(k)`` + write of the same file, or None."""
    try:
        import open3d as o3d
    except Exception:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        c = o3d.io.read_point_cloud(path)
        t1 = time.perf_counter()
        c.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(k))
        t2 = time.perf_counter()
        o3d.io.write_point_cloud(os.path.join(tmp, "o.ply"), c)
        t3 = time.perf_counter()
    return {"read": t1 - t0, "estimate": t2 - t1, "write": t3 - t2, "total_s": t3 - t0}


def synthetic_file(n: int, folder: str, *, seed: int = 0) -> str:
    """A binary PLY of ``n`` points on a bumpy sphere (float32) in ``folder``."""
    from fapc.bench import synthetic_surface

    path = os.path.join(folder, f"synthetic_{n}.ply")
    if not os.path.exists(path):  # made in chunks, so the peak memory is the cloud's own
        pts = np.empty((n, 3), np.float32)
        step = 1 << 21
        for i, s in enumerate(range(0, n, step)):
            pts[s:s + step] = synthetic_surface(min(step, n - s), seed=seed + i, noise=1e-3)
        write_cloud(path, PointCloud(points=pts))
    return path
