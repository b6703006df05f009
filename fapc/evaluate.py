"""``fapc eval``: the PCPNet protocol (unoriented RMSE in degrees, PGP5, PGP10) for a model
and the PCA baseline on the same clouds and query points, optionally under random rotations.

Meshes become one cloud per column: 100,000 area-uniform samples with Gaussian noise of 0,
0.125 %, 0.6 % and 1.2 % of the bounding-box diagonal, plus the ``stripe`` and ``gradient``
density variants. Clouds with normals (and PCPNet ``.xyz`` + ``.normals``) form the
``given`` column. Queries: the ``.pidx`` file where given, else a seeded random subset.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fapc.datasets import Shape, make_cloud

log = logging.getLogger(__name__)

NOISE_COLUMNS = {"none": 0.0, "0.125%": 0.00125, "0.6%": 0.006, "1.2%": 0.012}
DENSITY_COLUMNS = ("stripe", "gradient")
ROTATIONS = ("none", "so3", "o3")


@dataclass
class EvalCloud:
    """One evaluation cloud: ``points (N, 3)``, ``normals (N, 3)`` ground truth, ``queries (Q,)``."""

    name: str
    column: str
    points: np.ndarray
    normals: np.ndarray
    queries: np.ndarray


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def build_clouds(
    shapes: list[Shape],
    *,
    columns: tuple[str, ...] = tuple(NOISE_COLUMNS),
    points: int = 100_000,
    queries: int = 5000,
    seed: int = 0,
) -> list[EvalCloud]:
    """Evaluation clouds for ``shapes`` (meshes: one per column; clouds: ``given``)."""
    out = []
    for s in shapes:
        cols = columns if s.is_mesh else ("given",)
        for col in cols:
            if s.is_mesh:
                noise = NOISE_COLUMNS.get(col, 0.0)
                density = col if col in DENSITY_COLUMNS else "uniform"
                if col not in NOISE_COLUMNS and col not in DENSITY_COLUMNS:
                    raise ValueError(f"unknown column {col!r}")
                pts, nrm = make_cloud(s, n=points, noise=noise, density=density,
                                      seed=_seed(seed, s.name, col))
            else:
                pts, nrm = s.vertices, s.normals
            rng = np.random.default_rng(_seed(seed, s.name, col, "q"))
            if s.query_index is not None and not s.is_mesh:
                q = s.query_index
            else:
                q = np.sort(rng.choice(len(pts), size=min(queries, len(pts)), replace=False))
            out.append(EvalCloud(s.name, col, pts, nrm, q))
    return out


def random_pose(rotate: str, seed: int) -> np.ndarray:
    """A ``(3, 3)`` orthogonal matrix: identity, a random rotation, or a random reflection."""
    if rotate == "none":
        return np.eye(3)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if rotate == "o3":
        q = q @ np.diag([1.0, 1.0, -1.0])
    return q


def angle_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Unoriented angles in degrees between rows of ``pred`` and ``gt``."""
    p = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
    g = gt / np.maximum(np.linalg.norm(gt, axis=1, keepdims=True), 1e-12)
    return np.degrees(np.arccos(np.clip(np.abs((p * g).sum(1)), 0, 1)))


def scores(err: np.ndarray) -> dict[str, float]:
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "pgp5": float(np.mean(err < 5)),
            "pgp10": float(np.mean(err < 10))}


def confidence_auroc(err: np.ndarray, confidence: np.ndarray, *, threshold: float = 10.0
                     ) -> float:
    """How well ``confidence (Q,)`` ranks the errors ``err (Q,)`` (degrees): the chance that a
    normal off by more than ``threshold`` has a lower confidence than one that is not (ties
    count half; 0.5 is no better than chance, 1 a perfect ranking). NaN where either group is
    empty."""
    from scipy.stats import rankdata

    if err.shape != confidence.shape or err.ndim != 1:
        raise ValueError(f"err and confidence must be (Q,) each, got {err.shape} and "
                         f"{confidence.shape}")
    bad = err > threshold
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    if n_bad == 0 or n_good == 0:
        return float("nan")
    r = rankdata(-confidence)  # rank 1: the most confident
    return float((r[bad].sum() - n_bad * (n_bad + 1) / 2) / (n_bad * n_good))


Estimator = Callable[[np.ndarray, np.ndarray], np.ndarray]


def orientation_scores(oriented: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(consistent, outward)`` in percent for ``oriented (N, 3)`` against the outward
    ``truth (N, 3)``; points whose truth is zero (outliers) are left out."""
    if oriented.shape != truth.shape or oriented.ndim != 2 or oriented.shape[1] != 3:
        raise ValueError(f"oriented and truth must both be (N, 3), got {oriented.shape} "
                         f"and {truth.shape}")
    keep = np.abs(truth).sum(1) > 0
    if not keep.any():
        raise ValueError("no point has a ground-truth normal")
    outward = float(np.mean(np.einsum("ij,ij->i", oriented[keep], truth[keep]) > 0)) * 100
    return max(outward, 100 - outward), outward


def evaluate(
    clouds: list[EvalCloud],
    methods: dict[str, Estimator],
    *,
    rotate: str = "none",
    seed: int = 0,
    on_cloud: Callable[[EvalCloud], None] | None = None,
    on_errors: Callable[[EvalCloud, str, np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Score every method on every cloud.

    Args:
        methods: name -> ``f(points (N, 3), queries (Q,)) -> normals (Q, 3)``.
        rotate: ``none``, ``so3`` (a random rotation per cloud) or ``o3`` (a random
            rotation times a reflection); ground truth is moved with the cloud.
        on_errors: called with ``(cloud, method, query points (Q, 3), errors (Q,) deg)``.

    Returns:
        ``{"rows": [...], "table": {method: {column: rmse}}, "avg": {method: rmse},
        "pgp5"/"pgp10": {method: {column: share}}}``. Methods named ``pca-K`` also give
        ``pca-best``: the best ``K`` per column.
    """
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    rows = []
    for c in clouds:
        q = random_pose(rotate, _seed(seed, c.name, c.column, "pose"))
        pts, gt = c.points @ q.T, c.normals @ q.T
        for name, fn in methods.items():
            pred = fn(pts, c.queries)
            err = angle_errors(pred, gt[c.queries])
            s = scores(err)
            if on_errors:
                on_errors(c, name, pts[c.queries], err)
            rows.append({"cloud": c.name, "column": c.column, "method": name, **s})
        if on_cloud:
            on_cloud(c)
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = list(dict.fromkeys(r["column"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out: dict[str, Any] = {"rows": rows, "columns": columns}
    for metric, key in (("rmse", "table"), ("pgp5", "pgp5"), ("pgp10", "pgp10")):
        out[key] = {m: {c: float(np.mean([r[metric] for r in rows
                                           if r["method"] == m and r["column"] == c]))
                        for c in columns} for m in methods}
    pcas = [m for m in methods if m.startswith("pca-") and m[4:].isdigit()]
    if pcas:
        best = {c: min(pcas, key=lambda m, c=c: out["table"][m][c]) for c in columns}
        out["best_k"] = {c: int(best[c][4:]) for c in columns}
        for key in ("table", "pgp5", "pgp10"):
            out[key]["pca-best"] = {c: out[key][best[c]][c] for c in columns}
    out["avg"] = {m: float(np.mean(list(v.values()))) for m, v in out["table"].items()}
    return out


def pca_method(k: int) -> Estimator:
    from fapc.normals import estimate_normals

    return lambda pts, q: estimate_normals(pts, method="pca", k=k, query_index=q).normals


def model_method(model: Any, *, device: str = "auto", batch_size: int = 4096,
                 consensus_model: str | None = None, crease: bool = False,
                 light_smoothing: bool | None = None, draws: int | None = None) -> Estimator:
    """The FA pipeline with ``model`` (and the learned smoothing ``consensus_model``,
    default the shipped one; the optional steps ``crease`` and ``light_smoothing`` and the
    ``draws``, as in :func:`fapc.normals.estimate_normals`) as an estimator."""
    from fapc.normals import estimate_normals

    return lambda pts, q: estimate_normals(pts, method="fa", model=model, device=device,
                                           batch_size=batch_size, query_index=q,
                                           consensus_model=consensus_model, crease=crease,
                                           light_smoothing=light_smoothing,
                                           draws=draws).normals
