"""Suite O (how well ``--orient mst`` orients): its scores and its summary, on procedural
meshes generated here, so the tests need no benchmark data."""

from __future__ import annotations

import numpy as np
import pytest

from fapc.datasets import procedural_shapes
from fapc.evaluate import orientation_scores
from fapc.pca import pca_normals
from fapc.validate_orient import orientation_suite


def test_orientation_scores_consistent_and_outward():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(1000, 3))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    assert orientation_scores(truth, truth) == (100.0, 100.0)
    assert orientation_scores(-truth, truth) == (100.0, 0.0)  # consistent, inside out
    flip = np.where(np.arange(1000)[:, None] < 300, -truth, truth)
    consistent, outward = orientation_scores(flip, truth)
    assert consistent == pytest.approx(70.0) and outward == pytest.approx(70.0)
    with_outlier = truth.copy()
    with_outlier[0] = 0.0  # a point without ground truth is left out
    assert orientation_scores(-truth, with_outlier)[1] == 0.0
    with pytest.raises(ValueError):
        orientation_scores(truth[:, :2], truth[:, :2])


def test_orientation_suite_on_procedural_meshes():
    shapes = procedural_shapes(("torus", "cube"))

    def normals_fn(pts: np.ndarray) -> np.ndarray:
        scrambled = pca_normals(pts, k=16)[0]
        return scrambled * np.random.default_rng(1).choice([-1.0, 1.0], size=(len(pts), 1))

    summary, rows = orientation_suite(normals_fn, shapes, points=8000,
                                      levels={"none": 0.0, "0.125%": 0.00125})
    assert len(rows) == 4 and summary["all"]["clouds"] == 4
    assert set(summary) == {"none", "0.125%", "all"}
    torus = [r for r in rows if r["shape"] == "proc_torus"]
    assert all(r["outward"] > 99 for r in torus)  # scrambled signs put right, outward
    assert summary["all"]["at_99"] + summary["all"]["below_90"] <= 4
    assert summary["none"]["consistent"] == pytest.approx(
        np.mean([r["consistent"] for r in rows if r["column"] == "none"]))


def test_an_unwritable_report_path_is_refused_before_any_work(monkeypatch, capsys):
    import fapc.datasets
    from fapc.validate_orient import main

    def no_work(*args, **kwargs):
        raise AssertionError("the meshes were loaded before the report path was checked")

    monkeypatch.setattr(fapc.datasets, "load_shapes", no_work)
    assert main(["--json", "/proc/no-such-dir/o.json"]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and "/proc/no-such-dir" in out and len(out.strip().splitlines()) == 1
