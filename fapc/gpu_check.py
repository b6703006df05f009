"""``make gpu-check OUT=DIR``: the checks that need a CUDA device, in one run.

Needs torch with CUDA, numpy, scipy, typer and rich (no open3d, no trimesh, no .venv):
``PYTHONPATH=. python3 -m fapc.gpu_check --out DIR``. Writes ``DIR/gpu-check.json`` and
prints a summary: CUDA against CPU normals (within 0.1 degree on 99.9 % of points; bf16's
deviation reported too), the FA core's throughput, and the pipeline at 1 M and 10 M points in
float32 and bf16 (per-stage times, points/s, peak GPU memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch


def compare_cpu_cuda(n: int = 200_000) -> dict:
    from fapc.bench import synthetic_surface
    from fapc.normals import estimate_normals

    pts = synthetic_surface(n, seed=3, noise=2e-3)
    t0 = time.perf_counter()
    cpu = estimate_normals(pts, method="fa", device="cpu", knn="scipy").normals
    t1 = time.perf_counter()
    gpu = estimate_normals(pts, method="fa", device="cuda", knn="torch").normals
    t2 = time.perf_counter()
    bf16 = estimate_normals(pts, method="fa", device="cuda", knn="torch", precision="bf16").normals

    def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        cos = np.abs((a.astype(np.float64) * b).sum(1)) / (
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return np.degrees(np.arccos(np.clip(cos, 0, 1)))

    err, err16 = angles(cpu, gpu), angles(cpu, bf16)
    share = float(np.mean(err < 0.1))
    return {"points": n, "share_within_0.1deg": share, "max_deg": float(err.max()),
            "ok": share >= 0.999, "cpu_s": t1 - t0, "cuda_s": t2 - t1,
            "bf16_share_within_0.1deg": float(np.mean(err16 < 0.1)),
            "bf16_max_deg": float(err16.max())}


def _emit(obj: dict) -> None:
    """One JSON line on stdout (the log of the GPU run)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _stage(res: dict, key: str, fn: Callable[[], object]) -> object:
    """Run one stage; a failure is recorded (with its traceback) and the later stages still run."""
    try:
        res[key] = fn()
    except Exception as exc:  # a GPU host is lent briefly: keep whatever else can be measured
        res[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    _emit({key: res[key]})
    return res[key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fapc.gpu_check")
    p.add_argument("--out", default="out/gpu-check")
    p.add_argument("--sizes", default="1M,10M")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        sys.stderr.write("gpu-check: no CUDA device\n")
        return 2
    from fapc import runtime
    from fapc.bench import bench_core, bench_knn
    from fapc.profile import parse_sizes, profile_file, synthetic_file

    cuda = torch.device("cuda")

    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    out = os.path.join(args.out, "gpu-check.json")

    def save() -> None:  # after every stage, so a run cut short still leaves its figures
        with open(out, "w") as f:
            json.dump(res, f, indent=2)

    _stage(res, "cpu_vs_cuda", compare_cpu_cuda)
    save()
    _stage(res, "core", lambda: bench_core(1_000_000, device="cuda"))
    _stage(res, "knn", lambda: bench_knn(1_000_000, device="cuda"))
    save()
    res["pipeline"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in parse_sizes(args.sizes):
            f = synthetic_file(n, tmp)
            if n <= 1_000_000:  # warm-up (kernels, allocator) on the smaller cloud
                _stage(res, "warm_up", lambda f=f: profile_file(f, device="cuda"))
            runs = [("float32", True), ("bf16", True)]  # fapc normals' CUDA defaults
            if n <= 1_000_000:
                runs.append(("float32", False))  # without CUDA graphs, for comparison
            for precision, graphs in runs:
                def one(f: str = f, precision: str = precision, graphs: bool = graphs) -> dict:
                    runtime.CUDA_GRAPHS = graphs
                    try:
                        r = profile_file(f, device="cuda", precision=precision)
                    finally:
                        runtime.CUDA_GRAPHS = True
                    r["precision"], r["cuda_graphs"] = precision, graphs
                    r["batch_size"] = runtime.default_batch_size(cuda)
                    return r
                res["pipeline"].append(_stage(res, "last_pipeline", one))
                save()
    res.pop("last_pipeline", None)
    save()
    ok = res["cpu_vs_cuda"].get("ok", False)
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    failed += [f"pipeline[{i}]" for i, r in enumerate(res["pipeline"]) if "error" in r]
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
