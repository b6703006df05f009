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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fapc.gpu_check")
    p.add_argument("--out", default="out/gpu-check")
    p.add_argument("--sizes", default="1M,10M")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        sys.stderr.write("gpu-check: no CUDA device\n")
        return 2
    from fapc.bench import bench_core, bench_knn
    from fapc.normals import default_batch_size
    from fapc.profile import parse_sizes, profile_file, synthetic_file

    cuda = torch.device("cuda")

    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    res["cpu_vs_cuda"] = compare_cpu_cuda()
    _emit({"cpu_vs_cuda": res["cpu_vs_cuda"]})
    res["core"] = bench_core(1_000_000, device="cuda")
    _emit({"core": res["core"]})
    res["knn"] = bench_knn(1_000_000, device="cuda")
    _emit({"knn": res["knn"]})
    res["pipeline"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in parse_sizes(args.sizes):
            f = synthetic_file(n, tmp)
            profile_file(f, device="cuda") if n <= 1_000_000 else None  # warm-up on small
            runs = [("float32", None), ("bf16", None)]  # None: fapc normals' CUDA default
            if n <= 1_000_000:
                runs.append(("float32", 1 << 18))
            for precision, batch in runs:
                r = profile_file(f, device="cuda", batch_size=batch, precision=precision)
                r["precision"], r["batch_size"] = precision, batch or default_batch_size(cuda)
                res["pipeline"].append(r)
                _emit(r)
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(res, f, indent=2)
    return 0 if res["cpu_vs_cuda"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
