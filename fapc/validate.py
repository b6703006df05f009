"""Model selection on TRAIN only: the suites every candidate model is judged by before TEST
is looked at, and the rule that judges it.

``python -m fapc.validate --model runs/mine --json runs/mine/val.json --baseline base.json``

Suites (each cloud's score is the unoriented RMSE in degrees at seeded query points, whole
pipeline: the network, then the consensus step with its learned smoothing):

- ``A``, **held out**: the config's validation shapes (held out of training by its seeded
  split or its ``val_shapes``), 100,000 area-uniform samples each, noise 0, 0.03, 0.06,
  0.125, 0.25, 0.6 and 1.2 % of the diagonal (the benchmark's four levels and three
  between them); ``noise4`` is the mean over the benchmark's four.
- ``C``, **analytic light noise**: a torus and an ellipsoid with exact normals
  (:func:`fapc.datasets.analytic_surface`), 10,000 / 30,000 / 100,000 points, noise 0.03,
  0.06, 0.125 and 0.25 %: light scanner-like noise on smooth surfaces.
- ``D``, **checks**: TRAIN shapes (:data:`CHECK_SHAPES`: six sculpted models, two CAD
  parts) clean, at 0.125 % noise, dense (250,000 points, noiseless; scored against the
  faceted and the smooth ground truth, :func:`fapc.io.mesh.interpolated_normals`) and as
  simulated one-sided line scans (:func:`fapc.datasets.simulated_scan`, needs open3d).
- ``R``, **confidence ranking** (reported, not in the rule; not run by default): suite A's
  shapes at none, 0.03, 0.125, 0.6 and 1.2 %, scored by how well the confidence ranks the
  errors (:func:`fapc.evaluate.confidence_auroc`: normals off by more than 10 deg against
  the rest), the mean over shapes per level.

Shapes under ``../shared/data`` are read through the config's ``data``; where they are
missing, suites A and D are skipped (and say so); suite C needs no data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fapc.datasets import ANALYTIC, Shape, analytic_surface, make_cloud, simulated_scan
from fapc.evaluate import Estimator, _seed, angle_errors, confidence_auroc, scores
from fapc.io.mesh import interpolated_normals, sample_mesh

log = logging.getLogger(__name__)

HELD_OUT_LEVELS = {"none": 0.0, "0.03%": 0.0003, "0.06%": 0.0006, "0.125%": 0.00125,
                   "0.25%": 0.0025, "0.6%": 0.006, "1.2%": 0.012}
BENCHMARK_LEVELS = ("none", "0.125%", "0.6%", "1.2%")
ANALYTIC_NOISE = (0.0003, 0.0006, 0.00125, 0.0025)
CHECK_SHAPES = ("rabbit", "beetle", "camelhead", "cheburashka", "elephant", "face",
                "plate_holes", "ADIS16480")
CHECK_COLUMNS = ("clean", "0.125%", "dense", "scan")  # the rule's; "dense-smooth" is reported
RANKING_LEVELS = ("none", "0.03%", "0.125%", "0.6%", "1.2%")
ConfidenceEstimator = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def rmse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Unoriented RMSE in degrees of ``pred (Q, 3)`` against ``gt (Q, 3)``."""
    return scores(angle_errors(pred, gt))["rmse"]


def _queries(n: int, count: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(count, n), replace=False))


def _held_out_cloud(shape: Shape, col: str, noise: float, *, points: int, queries: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Suite A's seeded cloud of ``shape`` in column ``col``: points, normals, queries."""
    pts, nrm = make_cloud(shape, n=points, noise=noise, seed=_seed(0, shape.name, col))
    return pts, nrm, _queries(len(pts), queries, _seed(0, shape.name, col, "q"))


def held_out_suite(estimate: Estimator, shapes: Sequence[Shape], *, points: int = 100_000,
                   queries: int = 3000, levels: dict[str, float] | None = None
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Suite A: each shape at each noise level. Returns the mean RMSE per level (plus
    ``noise4``, the mean over :data:`BENCHMARK_LEVELS` when all were run) and per-cloud rows."""
    levels = HELD_OUT_LEVELS if levels is None else levels
    cols: dict[str, float] = {}
    rows = []
    for col, noise in levels.items():
        errs = []
        for s in shapes:
            pts, nrm, q = _held_out_cloud(s, col, noise, points=points, queries=queries)
            errs.append(rmse(estimate(pts, q), nrm[q]))
            rows.append({"suite": "A", "shape": s.name, "column": col, "rmse": errs[-1]})
            log.info("A %s %s %.3f", s.name, col, errs[-1])
        cols[col] = float(np.mean(errs))
    if all(c in cols for c in BENCHMARK_LEVELS):
        cols["noise4"] = float(np.mean([cols[c] for c in BENCHMARK_LEVELS]))
    return cols, rows


def ranking_suite(estimate: ConfidenceEstimator, shapes: Sequence[Shape], *,
                  points: int = 100_000, queries: int = 3000,
                  levels: Sequence[str] = RANKING_LEVELS
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Suite R: ``estimate(points, query) -> (normals (Q, 3), confidence (Q,))`` on each
    shape at each level (suite A's clouds and queries); the mean AUROC per level (shapes
    with no normal off by 10 deg are left out of a level's mean) and over all (``mean``)."""
    cols: dict[str, float] = {}
    rows = []
    for col in levels:
        vals = []
        for s in shapes:
            pts, nrm, q = _held_out_cloud(s, col, HELD_OUT_LEVELS[col], points=points,
                                          queries=queries)
            normals, conf = estimate(pts, q)
            auc = confidence_auroc(angle_errors(normals, nrm[q]), conf)
            rows.append({"suite": "R", "shape": s.name, "column": col, "auroc": auc})
            log.info("R %s %s %.3f", s.name, col, auc)
            if np.isfinite(auc):
                vals.append(auc)
        cols[col] = float(np.mean(vals)) if vals else float("nan")
    finite = [v for v in cols.values() if np.isfinite(v)]
    cols["mean"] = float(np.mean(finite)) if finite else float("nan")
    return cols, rows


def analytic_suite(estimate: Estimator, *, sizes: Sequence[int] = (10_000, 30_000, 100_000),
                   noises: Sequence[float] = ANALYTIC_NOISE, queries: int = 2000
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Suite C: the analytic surfaces at each size and light noise level. Returns the mean
    RMSE per noise level (``"0.03%"``...) and over all (``mean``), and per-cloud rows."""
    per: dict[float, list[float]] = {noise: [] for noise in noises}
    rows = []
    for kind in ANALYTIC:
        for n in sizes:
            for noise in noises:
                rng = np.random.default_rng(_seed(kind, n, noise))
                pts, nrm = analytic_surface(kind, n, seed=int(rng.integers(2 ** 31)))
                diag = float(np.linalg.norm(pts.max(0) - pts.min(0)))
                pts = pts + rng.normal(scale=noise * diag, size=pts.shape)
                q = np.sort(rng.choice(n, min(queries, n), replace=False))
                e = rmse(estimate(pts, q), nrm[q])
                per[noise].append(e)
                rows.append({"suite": "C", "shape": f"{kind}-{n}", "column": f"{noise * 100:g}%",
                             "rmse": e})
                log.info("C %s %d %g %.3f", kind, n, noise, e)
    cols = {f"{noise * 100:g}%": float(np.mean(v)) for noise, v in per.items()}
    cols["mean"] = float(np.mean(list(cols.values())))
    return cols, rows


def check_suite(estimate: Estimator, shapes: Sequence[Shape], *, points: int = 100_000,
                dense_points: int = 250_000, queries: int = 2000,
                scan_rays: tuple[int, int] = (300, 700)
                ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Suite D: each mesh clean, at 0.125 % noise, dense (faceted and smooth ground truth)
    and as a line scan (skipped, with a warning, where open3d cannot be imported). Returns
    the mean RMSE per column and per-cloud rows."""
    try:
        import open3d  # noqa: F401

        scans = True
    except ImportError as e:  # e.g. a machine without open3d or libusb
        log.warning("no line scans in suite D: open3d unavailable (%s)", e)
        scans = False
    per: dict[str, list[float]] = {}
    rows = []

    def add(name: str, col: str, e: float) -> None:
        per.setdefault(col, []).append(e)
        rows.append({"suite": "D", "shape": name, "column": col, "rmse": e})
        log.info("D %s %s %.3f", name, col, e)

    for s in shapes:
        if not s.is_mesh:
            raise ValueError(f"check shape {s.name} is not a mesh")
        for col in CHECK_COLUMNS:
            seed = _seed(1, s.name, col)
            if col in ("clean", "0.125%"):
                pts, nrm = make_cloud(s, n=points, noise=0.0 if col == "clean" else 0.00125,
                                      seed=seed)
            elif col == "dense":
                pts, nrm, face = sample_mesh(s.vertices, s.faces, dense_points, seed=seed)
                smooth = interpolated_normals(s.vertices, s.faces, face, pts)
            elif scans:
                pts, nrm = simulated_scan(s, seed=seed, lines=scan_rays[0], per_line=scan_rays[1])
            else:
                continue
            q = _queries(len(pts), queries, seed)
            est = estimate(pts, q)
            add(s.name, col, rmse(est, nrm[q]))
            if col == "dense":
                add(s.name, "dense-smooth", rmse(est, smooth[q]))
    return {col: float(np.mean(v)) for col, v in per.items()}, rows


def gate(baseline: dict[str, Any], candidate: dict[str, Any], *, clean_slack: float = 0.05,
         check_slack: float = 0.1) -> list[tuple[str, bool, str]]:
    """The TRAIN rule a candidate must pass, against a baseline (both :func:`validate`
    reports), before TEST may be measured: the held-out shapes' ``noise4`` lower and their
    noiseless column no worse by more than ``clean_slack`` deg; the analytic suite's mean
    lower; no check column (:data:`CHECK_COLUMNS`) worse by more than ``check_slack``.
    Returns ``(item, passed, "baseline -> candidate")`` per item; a suite either report
    lacks fails its items."""
    items: list[tuple[str, Any, Any, str]] = [
        ("held-out benchmark levels (noise4) gain", ("A", "noise4"), 0.0, "<"),
        (f"held-out noiseless within +{clean_slack:g} deg", ("A", "none"), clean_slack, "<="),
        ("analytic light noise (mean) gains", ("C", "mean"), 0.0, "<"),
    ] + [(f"check column {col} within +{check_slack:g} deg", ("D", col), check_slack, "<=")
         for col in CHECK_COLUMNS]
    out = []
    for label, (suite, col), slack, op in items:
        b = baseline.get("suites", {}).get(suite, {}).get(col)
        c = candidate.get("suites", {}).get(suite, {}).get(col)
        if b is None or c is None:
            out.append((label, False, "not measured"))
            continue
        ok = c < b + slack if op == "<" else c <= b + slack
        out.append((label, bool(ok), f"{b:.3f} -> {c:.3f}"))
    return out


def validate(estimate: Estimator, *, held_out: Sequence[Shape] = (),
             checks: Sequence[Shape] = (), suites: str = "ACD", points: int = 100_000,
             dense_points: int = 250_000, analytic_sizes: Sequence[int] = (10_000, 30_000, 100_000),
             queries: int = 3000, check_queries: int = 2000,
             scan_rays: tuple[int, int] = (300, 700),
             estimate_confidence: ConfidenceEstimator | None = None) -> dict[str, Any]:
    """Run the ``suites`` (letters of ``ACDR``) with ``estimate(points (N, 3), query (Q,))
    -> normals (Q, 3)`` (suite R: ``estimate_confidence``, which gives the confidence too). A
    suite whose shapes are not given is skipped.

    Returns ``{"suites": {"A": {column: mean RMSE}, ...}, "clouds": [rows], "skipped":
    [letters]}``.
    """
    bad = set(suites) - set("ACDR")
    if bad or not suites:
        raise ValueError(f"suites are letters of ACDR, got {suites!r}")
    if "R" in suites and estimate_confidence is None:
        raise ValueError("suite R needs estimate_confidence")
    report: dict[str, Any] = {"suites": {}, "clouds": [], "skipped": []}

    def keep(letter: str, result: tuple[dict[str, float], list[dict[str, Any]]]) -> None:
        report["suites"][letter], rows = result
        report["clouds"] += rows

    if "A" in suites:
        if held_out:
            keep("A", held_out_suite(estimate, held_out, points=points, queries=queries))
        else:
            report["skipped"].append("A")
    if "C" in suites:
        keep("C", analytic_suite(estimate, sizes=analytic_sizes, queries=check_queries))
    if "D" in suites:
        if checks:
            keep("D", check_suite(estimate, checks, points=points, dense_points=dense_points,
                                  queries=check_queries, scan_rays=scan_rays))
        else:
            report["skipped"].append("D")
    if "R" in suites:
        if held_out and estimate_confidence is not None:
            keep("R", ranking_suite(estimate_confidence, held_out, points=points,
                                    queries=queries))
        else:
            report["skipped"].append("R")
    return report


def check_report_path(path: str) -> None:
    """Refuse an unwritable report path before a long run, not after it (raises OSError)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w"):
        pass
    os.remove(path + ".tmp")


def write_report(path: str, report: dict[str, Any]) -> None:
    """``report`` as JSON at ``path``, through a temporary file (never half written)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def config_shapes(config: str, check_names: Sequence[str] = CHECK_SHAPES
                  ) -> tuple[list[Shape], list[Shape]]:
    """The held-out shapes of a training config (its seeded split or ``val_shapes``) and
    the check shapes named ``check_names`` among its data; both empty where the data is
    missing (e.g. no ``../shared/data``), no check shapes where the config's data holds none
    of the default ones (a user's own data: name its check meshes)."""
    from fapc.datasets import load_shapes
    from fapc.errors import FapcError
    from fapc.train import TrainConfig
    from fapc.train_data import split_shapes

    cfg = TrainConfig.from_toml(config)
    try:
        shapes = load_shapes(cfg.data)
    except FapcError as e:
        log.warning("training data not found (%s): the held-out and check suites are skipped",
                    e)
        return [], []
    _, held_out = split_shapes(shapes, cfg.val_fraction, cfg.seed, names=cfg.val_shapes)
    by_name = {s.name: s for s in shapes}
    missing = [n for n in check_names if n not in by_name]
    if tuple(check_names) == CHECK_SHAPES and len(missing) == len(CHECK_SHAPES):
        log.warning("none of the default check shapes is in %s's data: suite D is skipped "
                    "(name some of its meshes with --checks)", config)
        return held_out, []
    if missing:
        raise FapcError(f"check shapes not among the config's data: {missing}", path=config)
    return held_out, [by_name[n] for n in check_names]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from fapc.errors import FapcError
    from fapc.evaluate import model_method
    from fapc.normals import estimate_normals
    from fapc.runtime import load_network, resolve_device

    p = argparse.ArgumentParser(prog="python -m fapc.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the network (default: the shipped one)")
    p.add_argument("--consensus-model", default=None,
                   help="the learned smoothing's weights (default: the shipped ones)")
    p.add_argument("--crease", action="store_true",
                   help="with the optional face choice at creases (fapc normals --crease)")
    p.add_argument("--light-smoothing", action=argparse.BooleanOptionalAction, default=None,
                   help="with (or without) the light smoothing, as fapc normals "
                   "--light-smoothing (default: the model's choice per cloud)")
    p.add_argument("--config", default="fapc/weights/default.toml",
                   help="training config: its data and held-out split")
    p.add_argument("--suites", default="ACD",
                   help="letters of ACDR (default ACD; R: how the confidence ranks the errors)")
    p.add_argument("--checks", default=",".join(CHECK_SHAPES), help="suite D's shapes")
    p.add_argument("--json", dest="json_path", default=None, help="write the report here")
    p.add_argument("--baseline", default=None,
                   help="a report of the model to beat: apply the rule (exit 1 if it fails)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console(stderr=False)
    try:
        if args.json_path:
            check_report_path(args.json_path)
        baseline = None
        if args.baseline:
            with open(args.baseline) as f:
                baseline = json.load(f)
        dev = resolve_device("cpu")
        net = load_network(args.model, dev, consensus_model=args.consensus_model)
        held_out, checks = ((), ())
        if set(args.suites) & set("ADR"):
            held_out, checks = config_shapes(args.config, [c for c in args.checks.split(",") if c])

        def with_confidence(pts: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            res = estimate_normals(pts, method="fa", model=net, device="cpu", query_index=q,
                                   consensus_model=args.consensus_model, crease=args.crease,
                                   light_smoothing=args.light_smoothing)
            return res.normals, res.confidence

        report = validate(model_method(net, device="cpu", consensus_model=args.consensus_model,
                                       crease=args.crease, light_smoothing=args.light_smoothing),
                          held_out=held_out, checks=checks, suites=args.suites,
                          estimate_confidence=with_confidence)
    except (FapcError, OSError, ValueError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    report.update(model=args.model, consensus_model=args.consensus_model, crease=args.crease,
                  light_smoothing=args.light_smoothing, config=args.config,
                  held_out=[s.name for s in held_out], checks=[s.name for s in checks])
    for letter in report["skipped"]:
        console.print(f"[yellow]suite {letter} skipped: its shapes (the config's data) were not "
                      "found[/]")
    for letter, cols in report["suites"].items():
        t = Table(title=f"suite {letter}: " + ("AUROC of the confidence (errors > 10 deg)"
                                               if letter == "R" else "unoriented RMSE (deg)"))
        for col in cols:
            t.add_column(col, justify="right")
        t.add_row(*(f"{v:.3f}" for v in cols.values()))
        console.print(t)
    if args.json_path:
        write_report(args.json_path, report)
    if baseline is None:
        return 0
    verdict = gate(baseline, report)
    t = Table(title=f"rule against {args.baseline}")
    for col in ("item", "passed", "baseline -> candidate"):
        t.add_column(col)
    for label, ok, detail in verdict:
        t.add_row(label, "[green]yes[/]" if ok else "[red]no[/]", detail)
    console.print(t)
    return 0 if all(ok for _, ok, _ in verdict) else 1


if __name__ == "__main__":
    sys.exit(main())
