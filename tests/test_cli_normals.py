"""`fapc normals` and `fapc info` end to end: outputs, batches and every bad-input case."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import angle_deg, sphere_points
from typer.testing import CliRunner

from fapc.cli import app
from fapc.cloud import PointCloud
from fapc.io import read_cloud, write_cloud

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_normals_keeps_every_input_value_and_order(tmp_path, rich_cloud):
    src = tmp_path / "scan.ply"
    write_cloud(src, rich_cloud)
    r = run("normals", str(src), "--method", "pca", "--k", "16")
    assert r.exit_code == 0, r.output
    out = read_cloud(tmp_path / "scan.normals.ply")
    np.testing.assert_array_equal(out.points, rich_cloud.points)
    assert out.points.dtype == np.float64
    for k, v in rich_cloud.attributes.items():
        np.testing.assert_array_equal(out.attributes[k], v)
        assert out.attributes[k].dtype == v.dtype
    assert list(out.attributes)[: len(rich_cloud.attributes)] == list(rich_cloud.attributes)
    assert out.normals.dtype == np.float32
    assert out.attributes["confidence"].dtype == np.float32
    assert "curvature" in out.attributes
    # sphere: normal is radial
    radial = rich_cloud.points - rich_cloud.points.mean(0)
    assert np.median(angle_deg(out.normals, radial)) < 8.0  # 500 points: coarse patches


def test_output_directory_mirrors_names_and_skips_existing(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a.ply", "b.pcd", "sub/c.xyz"):
        write_cloud(src / name, PointCloud(points=sphere_points(200, seed=len(name))))
    r = run("normals", str(src), "-o", str(tmp_path / "out") + "/", "--recursive")
    assert r.exit_code == 0, r.output
    assert _files(tmp_path / "out") == ["a.ply", "b.pcd", "sub"]
    assert _files(tmp_path / "out" / "sub") == ["c.xyz"]
    assert read_cloud(tmp_path / "out" / "b.pcd").normals is not None
    r = run("normals", str(src), "-o", str(tmp_path / "out") + "/", "--recursive", "--json")
    summary = json.loads(r.stdout)
    assert summary["skipped"] == 3 and summary["ok"] == 0 and r.exit_code == 0
    r = run("normals", str(src), "-o", str(tmp_path / "out"), "-r", "--overwrite", "--json")
    assert json.loads(r.stdout)["ok"] == 3


def test_glob_and_single_output_file(tmp_path):
    for i in range(2):
        write_cloud(tmp_path / f"s{i}.npz", PointCloud(points=sphere_points(100, seed=i)))
    r = run("normals", str(tmp_path / "s*.npz"), "-o", str(tmp_path / "o"))
    assert r.exit_code == 0
    assert _files(tmp_path / "o") == ["s0.npz", "s1.npz"]
    r = run("normals", str(tmp_path / "s0.npz"), "-o", str(tmp_path / "one.pcd"))
    assert r.exit_code == 0 and read_cloud(tmp_path / "one.pcd").normals is not None


def test_output_without_extension_is_a_directory(tmp_path):
    write_cloud(tmp_path / "a.pcd", PointCloud(points=sphere_points(100)))
    r = run("normals", str(tmp_path / "a.pcd"), "-o", str(tmp_path / "out"), "--method", "pca")
    assert r.exit_code == 0, r.output
    assert _files(tmp_path / "out") == ["a.pcd"]


def test_unknown_output_extension_fails_before_reading(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"")  # unreadable too: the output is checked first
    write_cloud(tmp_path / "good.ply", PointCloud(points=sphere_points(100)))
    r = run("normals", str(tmp_path / "bad.ply"), "-o", str(tmp_path / "x.foo"))
    assert r.exit_code == 1 and "'.foo' is not one of" in r.stderr and "empty" not in r.stderr
    r = run("normals", str(tmp_path / "good.ply"), "-o", str(tmp_path / "x.foo"))
    assert r.exit_code == 1 and "x.foo" in r.stderr
    assert _files(tmp_path) == ["bad.ply", "good.ply"]


def test_mesh_input_writes_ply(tmp_path):
    (tmp_path / "t.obj").write_text(
        "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n")
    r = run("normals", str(tmp_path / "t.obj"), "--from-mesh", "sample:500")
    assert r.exit_code == 0, r.output
    assert len(read_cloud(tmp_path / "t.normals.ply")) == 500


def _bad(tmp_path, name: str, content: bytes | None):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    return p


_PLY_HEAD = b"ply\nformat ascii 1.0\nelement vertex %d\nproperty float x\nproperty float y\n" \
    b"property float z\nend_header\n"


@pytest.mark.parametrize("name,content,reason", [
    ("missing.ply", None, "no such file"),
    ("empty.ply", b"", "empty file"),
    ("trunc.ply", _PLY_HEAD % 5 + b"0 0 0\n1 0 0\n", "truncated"),
    ("lies.ply", _PLY_HEAD % 2 + b"0 0 0\n1 0 0\n0 1 0\n1 1 1\n", "header does not match"),
    ("allnan.xyz", b"nan nan nan\ninf 0 0\n", "no finite point"),
    ("few.xyz", b"0 0 0\n1 0 0\n0 1 0\n1 1 0\n", "fewer than k"),
    ("what.abc", b"0 0 0\n", "unknown format"),
])
def test_each_bad_input_is_one_line_nonzero_and_no_output(tmp_path, name, content, reason):
    good = tmp_path / "good.ply"
    write_cloud(good, PointCloud(points=sphere_points(100)))
    bad = _bad(tmp_path, name, content)
    r = run("normals", str(bad), str(good), "-o", str(tmp_path / "out"))
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and reason in lines[0] and name in lines[0], r.stderr
    assert "Traceback" not in r.output
    # the good file of the batch was still processed; nothing partial for the bad one
    assert _files(tmp_path / "out") == ["good.ply"]


def test_file_names_that_look_like_markup_are_printed_as_they_are(tmp_path):
    """Square brackets are common in file names; the terminal output must not read them as
    rich markup (which dropped '[final]' from the name, or raised on '[/b]')."""
    good = tmp_path / "good[red].ply"
    write_cloud(good, PointCloud(points=sphere_points(100)))
    bad = _bad(tmp_path, "scan[final].ply", b"garbage\n")
    closing = tmp_path / "x[/b].ply"  # a closing tag with nothing to close; no such file
    r = run("normals", str(bad), str(good), str(closing), "-o", str(tmp_path / "out"),
            "--method", "pca")
    assert r.exit_code == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and "scan[final].ply: not a PLY file" in errors[0], r.stderr
    assert "x[/b].ply" in errors[1], r.stderr
    assert "good[red].ply (100 points" in r.stderr
    assert _files(tmp_path / "out") == ["good[red].ply"]
    r = run("info", str(good))
    assert r.exit_code == 0 and "good[red].ply" in r.stdout


def test_directory_with_no_clouds(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hi")
    r = run("normals", str(tmp_path / "empty"))
    assert r.exit_code == 1 and "holds no point-cloud files" in r.stderr


def test_unwritable_output_leaves_nothing(tmp_path):
    write_cloud(tmp_path / "a.ply", PointCloud(points=sphere_points(100)))
    ro = tmp_path / "ro"
    ro.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory is needed: fails even as root
    r = run("normals", str(tmp_path / "a.ply"), "-o", str(blocker / "out.ply"))
    assert r.exit_code == 1 and "cannot write output" in r.stderr
    assert _files(tmp_path) == ["a.ply", "file", "ro"]


def test_never_overwrites_input(tmp_path):
    p = tmp_path / "a.ply"
    write_cloud(p, PointCloud(points=sphere_points(100)))
    before = p.read_bytes()
    r = run("normals", str(p), "-o", str(p), "--overwrite")
    assert r.exit_code == 1 and "overwrite the input" in r.stderr
    assert p.read_bytes() == before


def test_nan_points_kept_dropped_or_refused(tmp_path):
    pts = sphere_points(300)
    pts[[5, 17]] = np.nan
    pts[40, 1] = np.inf
    write_cloud(tmp_path / "n.ply", PointCloud(points=pts))
    r = run("normals", str(tmp_path / "n.ply"), "-o", str(tmp_path / "keep.ply"))
    assert r.exit_code == 0 and "3 points with NaN/inf" in r.stderr
    out = read_cloud(tmp_path / "keep.ply")
    assert len(out) == 300
    np.testing.assert_array_equal(out.normals[[5, 17, 40]], 0)
    np.testing.assert_array_equal(out.attributes["confidence"][[5, 17, 40]], 0)
    good = np.isfinite(pts).all(1)
    np.testing.assert_allclose(np.linalg.norm(out.normals[good], axis=1), 1, atol=1e-5)
    r = run("normals", str(tmp_path / "n.ply"), "-o", str(tmp_path / "drop.ply"),
            "--drop-invalid")
    assert r.exit_code == 0 and len(read_cloud(tmp_path / "drop.ply")) == 297
    r = run("normals", str(tmp_path / "n.ply"), "-o", str(tmp_path / "strict.ply"), "--strict")
    assert r.exit_code == 1 and "--strict" in r.stderr
    assert not (tmp_path / "strict.ply").exists()


def test_duplicate_points_are_estimated_once_or_refused_when_too_few(tmp_path):
    pts = sphere_points(400)
    write_cloud(tmp_path / "u.ply", PointCloud(points=pts))
    write_cloud(tmp_path / "d.ply", PointCloud(points=np.repeat(pts, 5, axis=0)))
    for name in ("u", "d"):
        r = run("normals", str(tmp_path / f"{name}.ply"), "-o", str(tmp_path / f"{name}.out.ply"))
        assert r.exit_code == 0, r.stderr
    alone, out = read_cloud(tmp_path / "u.out.ply"), read_cloud(tmp_path / "d.out.ply")
    assert len(out) == 2000
    np.testing.assert_array_equal(out.normals, np.repeat(alone.normals, 5, axis=0))
    # 20 distinct points, each 100 times: too few for a neighbourhood, whatever the count
    write_cloud(tmp_path / "few.ply", PointCloud(points=np.repeat(sphere_points(20), 100, axis=0)))
    r = run("normals", str(tmp_path / "few.ply"), "-o", str(tmp_path / "few.out.ply"))
    assert r.exit_code == 1 and "only 20 distinct finite points" in r.stderr
    assert not (tmp_path / "few.out.ply").exists()
    info = [json.loads(run("info", str(tmp_path / f), "--json").stdout)
            for f in ("u.ply", "d.ply", "few.ply")]
    assert [(d["points"], d["duplicates"]) for d in info] == [(400, 0), (2000, 1600), (2000, 1980)]


def test_info_json(tmp_path, rich_cloud):
    write_cloud(tmp_path / "a.pcd", rich_cloud)
    r = run("info", str(tmp_path / "a.pcd"), "--json")
    d = json.loads(r.stdout)
    assert d["points"] == 500 and d["attributes"]["label"] == "int32" and not d["normals"]
    r = run("info", str(tmp_path / "missing.pcd"))
    assert r.exit_code == 1 and "no such file" in r.stderr
    # several files: one JSON line each; a bad one is reported and the others still shown
    write_cloud(tmp_path / "b.xyz", PointCloud(points=sphere_points(50)))
    r = run("info", str(tmp_path / "a.pcd"), str(tmp_path / "missing.pcd"),
            str(tmp_path / "b.xyz"), "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 1 and "missing.pcd" in r.stderr
    assert [(d["format"], d["points"]) for d in rows] == [("pcd", 500), ("xyz", 50)]


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"ply\ngarbage\n")
    p = subprocess.run([sys.executable, "-m", "fapc", "normals", str(tmp_path / "bad.ply")],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "bad.ply" in p.stderr


def test_torchrun_splits_files_across_two_ranks(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        write_cloud(src / f"c{i}.ply", PointCloud(points=sphere_points(300, seed=i)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29519", "-m", "fapc", "normals", str(src), "-o",
           str(tmp_path / "out"), "--method", "pca", "--json", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    start = p.stdout.index("{")
    summary = json.loads(p.stdout[start:])
    assert summary["ok"] == 5 and summary["failed"] == 0
    assert [os.path.basename(f["input"]) for f in summary["files"]] == [f"c{i}.ply" for i in
                                                                        range(5)]
    assert _files(tmp_path / "out") == [f"c{i}.ply" for i in range(5)]


def test_broken_symlink_in_a_batch_is_reported_not_fatal(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_cloud(src / "a.ply", PointCloud(points=sphere_points(300)))
    os.symlink(tmp_path / "gone.ply", src / "b.ply")
    r = run("normals", str(src), "-o", str(tmp_path / "out"), "--method", "pca")
    assert r.exit_code == 1
    assert "b.ply" in r.stderr and "no such file" in r.stderr
    assert _files(tmp_path / "out") == ["a.ply"]


def test_global_quiet_and_version():
    r = run("--version")
    assert r.exit_code == 0 and "fapc" in r.stdout
    r = run("--quiet", "info", "/nonexistent.ply")
    assert r.exit_code == 1 and "no such file" in r.stderr


def test_global_quiet_silences_normals(tmp_path):
    write_cloud(tmp_path / "a.ply", PointCloud(points=sphere_points(300)))
    r = run("--quiet", "normals", str(tmp_path / "a.ply"), "--method", "pca")
    assert r.exit_code == 0 and r.stderr.strip() == ""


@pytest.mark.parametrize("option,value", [
    ("--precision", "fp8"), ("--device", "tpu"), ("--device", "cuda:x"), ("--device", ""),
    ("--batch-size", "0"), ("--batch-size", "-5"), ("--from-mesh", "sample:abc"),
    ("--from-mesh", "sample:0"), ("--from-mesh", "verts"),
])
def test_bad_option_values_are_usage_errors_and_write_nothing(tmp_path, option, value):
    write_cloud(tmp_path / "a.ply", PointCloud(sphere_points(500)))
    r = run("normals", str(tmp_path / "a.ply"), "-o", str(tmp_path / "out") + "/",
            option, value)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and option in errors[0], r.stderr
    assert repr(value) in errors[0] or value in errors[0]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_resolve_device_names():
    import torch

    from fapc.errors import FapcError
    from fapc.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "", "meta"):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(FapcError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises((FapcError, ValueError)):
        resolve_device("cuda:64")  # no machine here has 65 GPUs


def test_no_consensus_gives_the_networks_own_normals_and_consensus_helps_at_edges(tmp_path):
    from test_consensus import cube_surface

    from fapc.normals import estimate_normals

    pts, gt = cube_surface(6000, seed=3)
    write_cloud(tmp_path / "cube.ply", PointCloud(points=pts))
    for flag in ("--consensus", "--no-consensus"):
        r = run("normals", str(tmp_path / "cube.ply"), "-o", str(tmp_path / f"{flag}.ply"),
                flag, "--device", "cpu")
        assert r.exit_code == 0, r.output
    n_on = read_cloud(tmp_path / "--consensus.ply").normals
    n_off = read_cloud(tmp_path / "--no-consensus.ply").normals
    plain = estimate_normals(pts, device="cpu", consensus=False).normals
    assert angle_deg(n_off, plain).max() < 1e-3
    err_on, err_off = angle_deg(n_on, gt), angle_deg(n_off, gt)
    assert np.sqrt(np.mean(err_on ** 2)) < 0.8 * np.sqrt(np.mean(err_off ** 2))


def test_progress_reports_each_batch_up_to_the_whole_work():
    from test_consensus import cube_surface

    from fapc.consensus import ConsensusSettings
    from fapc.normals import estimate_normals

    pts, _ = cube_surface(3000, seed=4)
    calls: list[tuple[int, int]] = []
    # the snapping passes alone (the plane vote's pass: test_plane_vote)
    full = estimate_normals(pts, device="cpu", batch_size=500, draws=1, plane_vote=False,
                            progress=lambda d, t: calls.append((d, t))).normals
    done, totals = [d for d, _ in calls], {t for _, t in calls}
    # the network's points, then each consensus pass's, 500 at a time
    assert totals == {(1 + ConsensusSettings.snap_passes) * len(pts)}
    assert done == sorted(done) and done[-1] == len(pts) * (1 + ConsensusSettings.snap_passes)
    assert len(calls) == (1 + ConsensusSettings.snap_passes) * 6
    same = estimate_normals(pts, device="cpu", batch_size=500, draws=1, plane_vote=False).normals
    np.testing.assert_array_equal(full, same)  # no effect on results
    calls.clear()  # draws: each its share of the whole work
    estimate_normals(pts, device="cpu", batch_size=500, draws=2, plane_vote=False,
                     progress=lambda d, t: calls.append((d, t)))
    assert {t for _, t in calls} == {2 * (1 + ConsensusSettings.snap_passes) * len(pts)}
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] == calls[-1][1]
    calls.clear()
    q = np.arange(0, 3000, 7)
    estimate_normals(pts, device="cpu", query_index=q, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] > len(q)  # the queries' patch points are work too
    calls.clear()
    estimate_normals(pts, method="pca", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(len(pts), len(pts))]


def test_batches_report_progress_per_file(tmp_path):
    from fapc.pipeline import NormalsOptions, run_normals

    for name in ("a.ply", "b.xyz"):
        write_cloud(tmp_path / name, PointCloud(points=sphere_points(300, seed=len(name))))
    seen: list[tuple[str, int, int]] = []
    res = run_normals([str(tmp_path / "a.ply"), str(tmp_path / "b.xyz")],
                      NormalsOptions(device="cpu"), output=str(tmp_path / "out"),
                      on_progress=lambda f, d, t: seen.append((os.path.basename(f), d, t)))
    assert [r.status for r in res] == ["ok", "ok"]
    for name in ("a.ply", "b.xyz"):
        last = [s for s in seen if s[0] == name][-1]
        assert last[1] == last[2] > 0, seen


def test_consensus_model_option_refuses_a_wrong_file_before_any_output(tmp_path):
    from fapc.models.checkpoint import CONSENSUS_MODEL, DEFAULT_MODEL

    write_cloud(tmp_path / "a.ply", PointCloud(sphere_points(500)))
    out = tmp_path / "out"
    for flags, reason in (
            (["--consensus-model", str(DEFAULT_MODEL)], "not a consensus-step model"),
            (["--consensus-model", str(tmp_path / "none.safetensors")], "no such model file"),
            (["--model", str(CONSENSUS_MODEL)], "not a normal network")):
        r = run("normals", str(tmp_path / "a.ply"), "-o", str(out) + "/", "--device", "cpu",
                *flags)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and reason in lines[0], r.stderr
        assert not out.exists() or not os.listdir(out)
    if CONSENSUS_MODEL.exists():
        r = run("--quiet", "normals", str(tmp_path / "a.ply"), "-o", str(out) + "/",
                "--device", "cpu", "--consensus-model", str(CONSENSUS_MODEL))
        assert r.exit_code == 0 and _files(out) == ["a.ply"], r.stderr


def test_orient_options_from_the_command_line(tmp_path):
    # a wavy terrain seen from above, as airborne LiDAR sees it
    rng = np.random.default_rng(4)
    xy = rng.uniform(-1, 1, (3000, 2))
    pts = np.column_stack([xy, 0.1 * np.sin(3 * xy[:, 0]) * np.cos(2 * xy[:, 1])])
    write_cloud(tmp_path / "terrain.ply", PointCloud(points=pts))
    for spec, check in [("direction", lambda n: n[:, 2] > 0),
                        ("direction:0,0,-1", lambda n: n[:, 2] < 0),
                        ("viewpoint:0,0,5", lambda n: (n * ([0, 0, 5] - pts)).sum(1) > 0)]:
        out = tmp_path / "out.ply"
        r = run("normals", str(tmp_path / "terrain.ply"), "--method", "pca", "--orient", spec,
                "-o", str(out), "--overwrite")
        assert r.exit_code == 0, r.output
        assert check(read_cloud(out).normals).all(), spec
    r = run("normals", str(tmp_path / "terrain.ply"), "--orient", "direction:0,0,0")
    assert r.exit_code == 2 and "must not be zero" in r.output
    # a bare viewpoint on a file that records no sensor position: the origin, with a warning
    out = tmp_path / "out.ply"
    r = run("normals", str(tmp_path / "terrain.ply"), "--method", "pca", "--orient", "viewpoint",
            "-o", str(out), "--overwrite")
    assert r.exit_code == 0 and "records no sensor position" in r.stderr
    assert ((read_cloud(out).normals * -pts).sum(1) > 0).all()
    write_cloud(tmp_path / "scan.pcd", PointCloud(points=pts, viewpoint=np.array([0, 0, 5.0])))
    r = run("normals", str(tmp_path / "scan.pcd"), "--method", "pca", "--orient", "viewpoint",
            "-o", str(tmp_path / "o.pcd"))
    assert r.exit_code == 0 and "sensor position" not in r.stderr
    assert ((read_cloud(tmp_path / "o.pcd").normals * ([0, 0, 5] - pts)).sum(1) > 0).all()
