"""Benchmarks behind ``make bench`` and ``fapc bench``: speed of the PCA baseline against
open3d, throughput of the FA core, and (when ``../shared/data`` exists) accuracy tables.

Run ``python -m fapc.bench all`` (or a section: ``pca``, ``core``; ``bound``, the Bayes bound on
the TEST split's noisy columns, runs only when named). Results print as rich
tables; ``--json FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fapc.errors import FapcError

log = logging.getLogger(__name__)
console = Console(width=None if sys.stdout.isatty() else 150)  # logs: no truncated tables


def synthetic_surface(n: int, *, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """``(n, 3)`` float64 samples of a smooth closed surface (a bumpy sphere), radius ~1."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = 1 + 0.1 * np.sin(5 * d[:, 0]) * np.cos(4 * d[:, 1])
    return d * r[:, None] + rng.normal(scale=noise, size=(n, 3))


def _timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_pca(n: int = 1_000_000, k: int = 30, *, method: str = "pca",
              device: str = "cpu") -> dict[str, Any]:
    """``method`` normals on ``n`` points vs open3d ``estimate_normals`` (k), estimation alone
    and end to end (read + estimate + write a binary PLY); ``k`` is PCA's too (the FA model
    keeps its own patch)."""
    from fapc.cloud import PointCloud
    from fapc.io import write_cloud
    from fapc.normals import estimate_normals
    from fapc.pipeline import Job, NormalsOptions, process_file

    pts = synthetic_surface(n, seed=1, noise=1e-3)
    res: dict[str, Any] = {"method": method, "device": device, "points": n, "k": k}
    own_k = k if method == "pca" else None
    res["fapc_estimate_s"], _ = _timed(lambda: estimate_normals(pts, method=method, k=own_k,
                                                                device=device))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "cloud.ply")
        write_cloud(src, PointCloud(points=pts.astype(np.float32)))
        job = Job(src, os.path.join(tmp, "out.ply"))
        res["fapc_file_s"], r = _timed(lambda: process_file(job, NormalsOptions(
            method=method, k=own_k, device=device, overwrite=True)))
        assert r.status == "ok", r.message
        try:
            import open3d as o3d
        except ImportError as e:  # no open3d (e.g. a GPU host): report fapc alone
            res["open3d"] = f"not importable ({e})"
            return res
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        res["open3d_estimate_s"], _ = _timed(
            lambda: pc.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(k)))

        def o3d_file() -> None:
            c = o3d.io.read_point_cloud(src)
            c.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(k))
            o3d.io.write_point_cloud(os.path.join(tmp, "o3d.ply"), c)

        res["open3d_file_s"], _ = _timed(o3d_file)
    res["ratio_estimate"] = res["fapc_estimate_s"] / res["open3d_estimate_s"]
    res["ratio_file"] = res["fapc_file_s"] / res["open3d_file_s"]
    return res


def _sync(dev: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work's end."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_core(n: int = 1_000_000, *, device: str = "cpu", k: int = 32) -> dict[str, Any]:
    """Eigensolver and frame construction throughput on ``n`` neighbourhoods (float32)."""
    from fapc.eigen import sym3_eigh
    from fapc.frames import local_frames

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 3, 3, generator=g)
    cov = (a @ a.transpose(-1, -2)).to(dev)

    def eig() -> None:
        sym3_eigh(cov)
        _sync(dev)

    eig()  # warm-up
    t_eig, _ = _timed(eig, repeat=3)
    m = min(n, 1_000_000 if dev.type == "cuda" else 250_000)
    patches = torch.randn(m, k, 3, generator=g).to(dev)

    def frames() -> None:
        local_frames(patches, group="SO3")
        _sync(dev)

    frames()
    t_fr, _ = _timed(frames, repeat=3)
    return {"device": device, "matrices": n, "eigh_s": t_eig, "eigh_per_s": n / t_eig,
            "frame_neighbourhoods": m, "k": k, "frames_s": t_fr, "frames_per_s": m / t_fr}


def bench_knn(n: int = 1_000_000, *, device: str = "cpu", k: int = 32, far_k: int = 32,
              far_stride: int = 8) -> dict[str, Any]:
    """The exact grid kNN (:mod:`fapc.knn_torch`) on a synthetic surface of ``n`` points:
    ``k`` neighbours of every point (the near scale), and ``far_k`` neighbours in a
    1/``far_stride`` subsample (the far scale, as the default model asks); grid build
    included. Points per second."""
    from fapc.knn_torch import GridKNN

    dev = torch.device(device)
    pts = torch.from_numpy(synthetic_surface(n, seed=1, noise=1e-3).astype(np.float32)).to(dev)

    def near() -> None:
        GridKNN(pts, k).query(pts, k)
        _sync(dev)

    def far() -> None:
        GridKNN(pts[::far_stride], far_k).query(pts, far_k)
        _sync(dev)

    near()  # warm-up
    t_near, _ = _timed(near, repeat=3)
    far()
    t_far, _ = _timed(far, repeat=3)
    return {"device": device, "points": n, "k": k, "knn_s": t_near, "knn_points_per_s": n / t_near,
            "far_k": far_k, "far_stride": far_stride, "far_knn_s": t_far,
            "far_knn_points_per_s": n / t_far}


def bench_accuracy(root: str | None = None, *, model: str | None = None,
                   consensus_model: str | None = None, crease: bool = False,
                   light_smoothing: bool | None = None,
                   queries: int = 5000) -> dict[str, Any] | None:
    """The accuracy table on the TEST split (``../shared/data``): the model (with the learned
    smoothing ``consensus_model``, default the shipped one, and the optional steps ``crease``
    and ``light_smoothing``) and PCA with k in 16..256, under no rotation and under random
    SO(3) poses. None when data is absent."""
    from fapc.bench_data import find_root, test_clouds
    from fapc.evaluate import evaluate, model_method, pca_method
    from fapc.models.checkpoint import load_model
    from fapc.runtime import load_network

    root = find_root(root)
    if root is None:
        return None
    net, info = load_model(model)
    load_network(net, torch.device("cpu"), consensus_model=consensus_model)  # refuse bad ones now
    clouds = test_clouds(root, queries=queries)
    methods = {"fa": model_method(net, device="cpu", consensus_model=consensus_model,
                                  crease=crease, light_smoothing=light_smoothing)}
    methods.update({f"pca-{k}": pca_method(k) for k in (16, 32, 64, 128, 256)})
    rep = evaluate(clouds, methods, rotate="none")
    rot = evaluate(clouds, {"fa": methods["fa"]}, rotate="so3")
    rep["fa_so3"] = rot["table"]["fa"]
    rep["fa_so3_avg"] = rot["avg"]["fa"]
    rep["model"] = info["path"]
    rep["consensus_model"] = consensus_model
    rep["crease"], rep["light_smoothing"] = crease, light_smoothing
    return rep


def print_accuracy(rep: dict[str, Any]) -> None:
    cols = rep["columns"]
    noise = [c for c in ("none", "0.125%", "0.6%", "1.2%") if c in cols]
    t = Table(title=f"TEST split, unoriented RMSE (deg); model {rep['model']}")
    t.add_column("method")
    for c in cols:
        t.add_column(c, justify="right")
    t.add_column("noise avg", justify="right")
    rows = dict(rep["table"])
    rows["fa (so3 poses)"] = rep["fa_so3"]
    for m, row in rows.items():
        t.add_row(m, *(f"{row[c]:.2f}" for c in cols),
                  f"{np.mean([row[c] for c in noise]):.2f}")
    console.print(t)
    fa, best = rep["table"]["fa"], rep["table"]["pca-best"]
    ratio = np.mean([fa[c] for c in noise]) / np.mean([best[c] for c in noise])
    scans = fa.get("scans", float("nan")) / best.get("scans", float("nan"))
    drift = max(abs(rep["fa_so3"][c] - fa[c]) for c in cols)
    console.print(f"fa / best-k PCA: noise columns {ratio:.3f}x, noiseless "
                  f"{fa['none'] / best['none']:.3f}x, scans {scans:.3f}x; "
                  f"max |so3 - none| {drift:.4f} deg")


def bench_orient(n: int = 100_000, k: int = 8) -> dict[str, Any]:
    """MST orientation vs open3d ``orient_normals_consistent_tangent_plane(k)`` on ``n``
    points of a torus (two-sided ground truth known) with scrambled PCA normals.
    Consistency: the share of points whose normal agrees with the outward truth (after the
    better global sign)."""
    from fapc.datasets import make_cloud, procedural_shapes
    from fapc.evaluate import orientation_scores
    from fapc.normals import estimate_normals
    from fapc.orient import orient_mst

    shape = procedural_shapes(("torus",))[0]
    pts, gt = make_cloud(shape, n=n, noise=0.001, seed=1)
    est = estimate_normals(pts, method="pca", k=20).normals.astype(np.float64)
    est *= np.random.default_rng(0).choice([-1.0, 1.0], size=(n, 1))

    def consistency(nrm: np.ndarray) -> float:
        return orientation_scores(nrm, gt)[0] / 100

    res: dict[str, Any] = {"points": n, "k": k}
    res["fapc_s"], out = _timed(lambda: orient_mst(pts, est, k=k))
    res["fapc_consistency"] = consistency(out)
    try:
        import open3d as o3d
    except ImportError as e:
        res["open3d"] = f"not importable ({e})"
        return res
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    pc.normals = o3d.utility.Vector3dVector(est)
    res["open3d_s"], _ = _timed(lambda: pc.orient_normals_consistent_tangent_plane(k))
    res["open3d_consistency"] = consistency(np.asarray(pc.normals))
    res["speedup"] = res["open3d_s"] / res["fapc_s"]
    return res


def _table(title: str, rows: dict[str, Any]) -> None:
    t = Table(title=title, show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    for key, v in rows.items():
        if isinstance(v, float):
            v = f"{v:,.3f}" if v < 1e4 else f"{v:,.0f}"
        t.add_row(key, str(v))
    console.print(t)


def bench_bound(root: str | None = None, *, queries: int = 5000) -> dict[str, Any] | None:
    """The Bayes bound (:mod:`fapc.bound`) on the TEST meshes' noisy columns: the least RMSE
    any estimator can reach there in expectation. None when data is absent."""
    from fapc.bench_data import find_root
    from fapc.bound import benchmark_bound

    root = find_root(root)
    return None if root is None else benchmark_bound(root, queries=queries)


def print_bound(rep: dict[str, Any]) -> None:
    t = Table(title="TEST split: Bayes bound, the least RMSE any estimator can reach (deg)")
    t.add_column("mesh")
    cols = list(rep["columns"])
    for c in cols:
        t.add_column(c, justify="right")
    for name in dict.fromkeys(r["mesh"] for r in rep["rows"]):
        vals = {r["column"]: r["rmse"] for r in rep["rows"] if r["mesh"] == name}
        t.add_row(name, *(f"{vals[c]:.2f}" for c in cols))
    t.add_row("mean", *(f"{rep['columns'][c]:.2f}" for c in cols))
    console.print(t)
    console.print(f"noise-column average with a perfect noiseless column: "
                  f"{sum(rep['columns'].values()) / 4:.2f} deg")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fapc.bench", description=__doc__)
    p.add_argument("section", nargs="?", default="all",
                   choices=["all", "pca", "fa", "core", "orient", "accuracy", "bound"],
                   help="'all' runs every section except 'bound' (the Bayes bound of the TEST "
                        "split's noisy columns: about 20 minutes on 2 cores)")
    p.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--model", default=None)
    p.add_argument("--consensus-model", default=None,
                   help="the learned smoothing's weights (default the shipped ones)")
    p.add_argument("--crease", action="store_true", help="accuracy: with fapc normals --crease")
    p.add_argument("--light-smoothing", action=argparse.BooleanOptionalAction, default=None,
                   help="accuracy: with (or without) the light smoothing, as fapc normals "
                   "--light-smoothing (default: the model's choice per cloud)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=5000,
                   help="query points per TEST cloud for 'accuracy' and 'bound' (the protocol's "
                        "5000 by default; fewer for a quick look)")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.queries < 1:
        p.error("--queries must be at least 1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results: dict[str, Any] = {}
    if args.section in ("all", "core"):
        results["core"] = bench_core(args.points, device=args.device)
        _table(f"FA core ({args.device}, float32)", results["core"])
        results["degeneracy"] = bench_degeneracy()
        t = Table(title="Frame degeneracy: output change under rotation (planar patches, deg)")
        for col in ("in-plane ratio", "stability", "FA-PointNet median", "FA-PointNet max",
                    "normal model median", "normal model max"):
            t.add_column(col, justify="right")
        for row in results["degeneracy"]:
            t.add_row(f"{row['ratio']:.4f}", f"{row['stability']:.4f}",
                      f"{row['median_change']:.3f}", f"{row['max_change']:.3f}",
                      f"{row['model_median_change']:.3f}", f"{row['model_max_change']:.3f}")
        console.print(t)
    if args.section in ("all", "pca"):
        results["pca"] = bench_pca(args.points)
        _table("PCA normals vs open3d estimate_normals", results["pca"])
    if args.section in ("all", "fa"):
        results["fa"] = bench_pca(args.points, method="fa", device=args.device)
        _table(f"FA normals ({args.device}) vs open3d estimate_normals", results["fa"])
    if args.section in ("all", "orient"):
        results["orient"] = bench_orient()
        _table("Orientation: MST propagation vs open3d (100k points)", results["orient"])
    if args.section in ("all", "accuracy"):
        try:
            rep = bench_accuracy(args.data, model=args.model,
                                 consensus_model=args.consensus_model, crease=args.crease,
                                 light_smoothing=args.light_smoothing, queries=args.queries)
        except FapcError as e:  # a missing or refused model: one line, no traceback
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            return 2
        if rep is None:
            console.print("[yellow]accuracy: ../shared/data not found (set FAPC_DATA or "
                          "--data); skipped[/]")
        else:
            print_accuracy(rep)
            results["accuracy"] = {k: v for k, v in rep.items() if k != "rows"}
    if args.section == "bound":
        bound = bench_bound(args.data, queries=args.queries)
        if bound is None:
            console.print("[yellow]bound: ../shared/data not found (set FAPC_DATA or --data); "
                          "skipped[/]")
        else:
            print_bound(bound)
            results["bound"] = bound
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def bench_degeneracy(model: str | None = None) -> list[dict[str, float]]:
    """Output change under rotation vs frame stability: a generic FA-PointNet axis model
    (untrained, seeded) and the normal model (its normal comes from a weighted fit)."""
    from fapc.models import FrameAveraging, PointNet
    from fapc.models.checkpoint import load_model
    from fapc.patches import summary_of
    from fapc.testing import degeneracy_sweep

    def with_summary(p: torch.Tensor, wide: int) -> torch.Tensor:  # (B, K, 3) -> (B, K + 6, 3)
        return torch.cat([p, summary_of(p)], 1) if wide else p

    torch.manual_seed(0)
    fa = FrameAveraging(PointNet(widths=(32, 64), head=(32,), out_dim=3), group="SO3",
                        output="axis").eval()
    net, _ = load_model(model)
    with torch.no_grad():
        rows = degeneracy_sweep(fa)
        ours = degeneracy_sweep(lambda p: net(with_summary(p, net.config.wide_stride))["normal"])
    for row, o in zip(rows, ours, strict=True):
        row["model_median_change"] = o["median_change"]
        row["model_max_change"] = o["max_change"]
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
