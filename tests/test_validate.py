"""TRAIN-only model selection (:mod:`fapc.validate`): its data generators, its suites on
procedural shapes, the rule, and the command line (no benchmark data is read)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import angle_deg

from fapc.datasets import analytic_surface, procedural_shapes, simulated_scan
from fapc.evaluate import confidence_auroc, pca_method
from fapc.io.mesh import face_normals, interpolated_normals, sample_mesh, vertex_normals
from fapc.normals import estimate_normals
from fapc.validate import CHECK_COLUMNS, config_shapes, gate, main, validate


@pytest.mark.parametrize("kind", ["torus", "ellipsoid"])
def test_analytic_surfaces_lie_on_their_surface_with_exact_normals(kind):
    pts, nrm = analytic_surface(kind, 5000, seed=3)
    assert pts.shape == nrm.shape == (5000, 3)
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-12)
    if kind == "torus":  # (sqrt(x^2 + y^2) - 1)^2 + z^2 = 0.35^2
        ring = np.hypot(pts[:, 0], pts[:, 1])
        np.testing.assert_allclose((ring - 1) ** 2 + pts[:, 2] ** 2, 0.35 ** 2, atol=1e-12)
        centre = np.column_stack([pts[:, :2] / ring[:, None], np.zeros(len(pts))])
        grad = pts - centre  # from the tube's centre line, outward
    else:
        axes = np.array([1.0, 0.7, 0.45])
        np.testing.assert_allclose(((pts / axes) ** 2).sum(1), 1, atol=1e-12)
        grad = pts / axes ** 2
    grad /= np.linalg.norm(grad, axis=1, keepdims=True)
    np.testing.assert_allclose((grad * nrm).sum(1), 1, atol=1e-9)  # outward and exact
    again, _ = analytic_surface(kind, 5000, seed=3)
    np.testing.assert_array_equal(pts, again)
    other, _ = analytic_surface(kind, 5000, seed=4)
    assert not np.allclose(pts, other)


def test_analytic_surface_is_area_uniform():
    """The torus's outer half (cos v > 0) has more area than its inner half:
    fraction = 1/2 + 2 r / (2 pi R) = 0.5 + 0.35 / pi."""
    pts, _ = analytic_surface("torus", 200_000, seed=0)
    outer = (np.hypot(pts[:, 0], pts[:, 1]) > 1.0).mean()
    assert abs(outer - (0.5 + 0.35 / np.pi)) < 0.005
    with pytest.raises(ValueError, match="kind"):
        analytic_surface("cube", 10)


def test_interpolated_normals_follow_the_smooth_surface():
    sphere = procedural_shapes(["sphere"])[0]  # an icosphere of radius 0.7
    v, f = sphere.vertices, sphere.faces
    pts, faceted, face = sample_mesh(v, f, 20_000, seed=1)
    smooth = interpolated_normals(v, f, face, pts)
    radial = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    assert np.sqrt(np.mean(angle_deg(smooth, radial) ** 2)) < \
        0.3 * np.sqrt(np.mean(angle_deg(faceted, radial) ** 2))
    # at a face's corners the blend is that vertex's normal
    corners = v[f[:50, 0]]
    np.testing.assert_allclose(interpolated_normals(v, f, np.arange(50), corners),
                               vertex_normals(v, f)[f[:50, 0]], atol=1e-9)
    with pytest.raises(ValueError, match="points"):
        interpolated_normals(v, f, face[:10], pts[:11])
    # a mesh whose faces are wound every which way has the same smooth surface
    flip = np.random.default_rng(2).random(len(f)) < 0.4
    mixed = np.where(flip[:, None], f[:, ::-1], f)
    assert angle_deg(interpolated_normals(v, mixed, face, pts), smooth).max() < 1e-4
    outward = vertex_normals(v, f)
    assert (outward * v).sum(1).min() > 0  # consistent winding: outward, as the faces are


def test_simulated_scan_is_one_sided_and_on_the_surface():
    pytest.importorskip("open3d")
    box = procedural_shapes(["box"])[0]  # extents 1 x 0.6 x 0.3, centred
    pts, nrm = simulated_scan(box, seed=2, lines=60, per_line=80, noise=0.0)
    assert 500 < len(pts) <= 60 * 80 and nrm.shape == pts.shape
    half = np.array([0.5, 0.3, 0.15])
    on_face = np.isclose(np.abs(pts), half, atol=1e-4).any(1)
    assert on_face.all()
    seen = {tuple(np.round(n).astype(int)) for n in nrm}
    assert 1 <= len(seen) <= 3  # a convex box shows at most three faces to one sensor
    fn, _ = face_normals(box.vertices, box.faces)
    assert all(np.isclose(np.abs(n).max(), 1) for n in fn)  # axis-aligned faces
    noisy, _ = simulated_scan(box, seed=2, lines=60, per_line=80, noise=0.01)
    dist = np.abs(np.abs(noisy) - half).min(1)
    assert 0.002 < np.median(dist) < 0.02  # noise of 1 % of the diagonal (1.2) along the rays


def _small(estimate, suites="ACD", *, held_out, checks):
    return validate(estimate, held_out=held_out, checks=checks, suites=suites, points=6000,
                    dense_points=8000, analytic_sizes=(4000,), queries=300, check_queries=300,
                    scan_rays=(60, 80))


def test_suites_score_every_cloud_and_noise_costs_accuracy():
    held = procedural_shapes(["box", "sphere"])
    checks = procedural_shapes(["cylinder"])
    rep = _small(pca_method(16), held_out=held, checks=checks)
    a, c, d = (rep["suites"][s] for s in "ACD")
    assert set(a) == {"none", "0.03%", "0.06%", "0.125%", "0.25%", "0.6%", "1.2%", "noise4"}
    assert a["1.2%"] > a["0.125%"] > 0 and a["noise4"] == pytest.approx(
        np.mean([a[c] for c in ("none", "0.125%", "0.6%", "1.2%")]))
    assert c["0.25%"] > c["0.03%"] and c["mean"] > 0
    expected = set(CHECK_COLUMNS) | {"dense-smooth"}
    try:
        import open3d  # noqa: F401
    except ImportError:
        expected.discard("scan")
    assert set(d) == expected
    # the faceted cylinder's sides: PCA fits the facets, so faceted truth scores better
    assert d["dense"] < d["dense-smooth"]
    assert len(rep["clouds"]) == 7 * 2 + 2 * 4 + len(expected) and rep["skipped"] == []
    # a wider PCA neighbourhood is better under heavy noise: the suites see the difference
    wide = _small(pca_method(64), "A", held_out=held, checks=checks)
    assert wide["suites"]["A"]["1.2%"] < a["1.2%"]
    again = _small(pca_method(16), "A", held_out=held, checks=checks)
    assert again["suites"]["A"] == a  # seeded: the same clouds and queries each time
    skipped = _small(pca_method(16), "AD", held_out=(), checks=())
    assert skipped["suites"] == {} and skipped["skipped"] == ["A", "D"]
    with pytest.raises(ValueError, match="ACDR"):
        _small(pca_method(16), "AB", held_out=held, checks=checks)


def test_the_shipped_model_runs_through_the_suites():
    from fapc.evaluate import model_method

    rep = _small(model_method(None, device="cpu"), "C", held_out=(), checks=())
    assert 0 < rep["suites"]["C"]["mean"] < 20


def test_confidence_auroc_counts_the_ranking():
    err = np.array([1.0, 2.0, 30.0, 40.0])
    assert confidence_auroc(err, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert confidence_auroc(err, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert confidence_auroc(err, np.full(4, 0.5)) == 0.5  # ties count half
    # one bad normal ranked above one of the two good ones: 1 of 4 pairs wrong
    assert confidence_auroc(err, np.array([0.9, 0.3, 0.5, 0.1])) == 0.75
    assert np.isnan(confidence_auroc(err[:2], np.ones(2)))
    with pytest.raises(ValueError, match="confidence"):
        confidence_auroc(err, np.ones(3))


def test_ranking_suite_scores_the_confidence_of_every_level():
    held = procedural_shapes(["box"])

    def planarity_of_pca(pts, q):
        res = estimate_normals(pts, method="pca", k=16, query_index=q)
        return res.normals, res.confidence

    def reversed_confidence(pts, q):
        normals, conf = planarity_of_pca(pts, q)
        return normals, 1 - conf

    rep = validate(pca_method(16), held_out=held, suites="R", points=6000, queries=300,
                   estimate_confidence=planarity_of_pca)
    r = rep["suites"]["R"]
    assert set(r) == {"none", "0.03%", "0.125%", "0.6%", "1.2%", "mean"}
    assert r["none"] > 0.8  # on a clean box PCA's planarity finds the edges
    worse = validate(pca_method(16), held_out=held, suites="R", points=6000, queries=300,
                     estimate_confidence=reversed_confidence)["suites"]["R"]
    assert worse["none"] == pytest.approx(1 - r["none"])
    with pytest.raises(ValueError, match="estimate_confidence"):
        validate(pca_method(16), held_out=held, suites="R")


def _report(a=(5.0, 14.0), c=2.0, d=(4.0, 7.0, 3.0, 6.0)) -> dict:
    return {"suites": {"A": {"none": a[0], "noise4": a[1]}, "C": {"mean": c},
                       "D": dict(zip(CHECK_COLUMNS, d, strict=True))}}


def test_gate_applies_the_rule_item_by_item():
    base = _report()
    better = _report(a=(5.04, 13.9), c=1.9, d=(4.09, 6.9, 3.1, 5.0))
    assert all(ok for _, ok, _ in gate(base, better))
    same = {label: ok for label, ok, _ in gate(base, base)}
    assert not same["held-out benchmark levels (noise4) gain"]  # a tie is no gain
    assert not same["analytic light noise (mean) gains"]
    assert same["held-out noiseless within +0.05 deg"]
    worse = {label: ok for label, ok, _ in gate(base, _report(a=(5.06, 13.9), c=1.9,
                                                               d=(4.0, 7.0, 3.11, 6.0)))}
    assert not worse["held-out noiseless within +0.05 deg"]
    assert not worse["check column dense within +0.1 deg"]
    assert worse["check column scan within +0.1 deg"]
    partial = _report()
    del partial["suites"]["D"]
    missing = [(label, detail) for label, ok, detail in gate(base, partial) if not ok]
    assert len(missing) == len(CHECK_COLUMNS) + 2  # D's items not measured, and no gain on A/C
    assert all(detail == "not measured" for label, detail in missing if "check" in label)


def _config(tmp_path, names: list[str], extra: str = "") -> str:
    data = []
    for s in procedural_shapes(names):
        import trimesh

        path = tmp_path / f"{s.name}.obj"
        trimesh.Trimesh(s.vertices, s.faces).export(path)
        data.append(str(path))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"data = {json.dumps(data)}\nval_fraction = 0.4\nseed = 0\n{extra}")
    return str(cfg)


def test_config_shapes_holds_out_the_configs_split(tmp_path):
    from fapc.errors import FapcError

    cfg = _config(tmp_path, ["box", "sphere", "cone", "cylinder", "capsule"])
    held, checks = config_shapes(cfg, ["proc_cone"])
    assert len(held) == 2 and [s.name for s in checks] == ["proc_cone"]
    named = _config(tmp_path, ["box", "sphere", "cone"], 'val_shapes = ["proc_box"]')
    assert [s.name for s in config_shapes(named, [])[0]] == ["proc_box"]
    with pytest.raises(FapcError, match="proc_teapot"):
        config_shapes(cfg, ["proc_teapot"])
    assert len(config_shapes(cfg)[1]) == 0  # a user's data: none of the default check shapes
    gone = tmp_path / "gone.toml"
    gone.write_text('data = ["/nonexistent/meshes"]\n')
    assert config_shapes(str(gone)) == ([], [])  # no data: suites A and D skip


def test_command_line_writes_the_report_and_exits_by_the_rule(tmp_path, capsys):
    gone = tmp_path / "gone.toml"
    gone.write_text('data = ["/nonexistent/meshes"]\n')
    out = tmp_path / "new" / "rep.json"  # the folder is made
    assert main(["--config", str(gone), "--suites", "AD", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["skipped"] == ["A", "D"] and rep["suites"] == {}
    assert "suite A skipped" in capsys.readouterr().out
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_report()))
    assert main(["--config", str(gone), "--suites", "A", "--baseline", str(base)]) == 1
    assert "not measured" in capsys.readouterr().out
    assert main(["--config", str(gone), "--suites", "A", "--model",
                 str(tmp_path / "none.safetensors")]) == 2
    assert "no such model file" in capsys.readouterr().out
    assert main(["--config", str(gone), "--suites", "A", "--json",
                 str(base / "rep.json")]) == 2  # under a file: refused before any work
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
