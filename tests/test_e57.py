"""E57 input (`fapc.io.e57`): scans placed by their poses, cartesian and spherical points,
invalid points left out, attributes kept, each scan's normals facing its own scanner, and
bad files refused in one line."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from typer.testing import CliRunner

from fapc.cli import app
from fapc.errors import FapcError
from fapc.io import read_cloud, sniff_format
from fapc.io.e57 import point_viewpoints, quaternion_matrix, spherical_to_cartesian
from fapc.orient import orient_towards

pye57 = pytest.importorskip("pye57")
from pye57 import libe57  # noqa: E402

runner = CliRunner()

# two stations on either side of a unit sphere, the second turned about z and tilted
STATIONS = [(np.array([4.0, 0.5, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])),
            (np.array([-4.0, 0.0, 1.0]), np.array([0.2, 0.1, -0.3, 0.9]))]


def _unit(q: np.ndarray) -> np.ndarray:
    return q / np.linalg.norm(q)


def _visible_sphere(rng: np.random.Generator, station: np.ndarray, n: int) -> np.ndarray:
    """Points of the unit sphere that a scanner at ``station`` sees ``(M, 3)``."""
    p = rng.normal(size=(n, 3))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return p[((station - p) * p).sum(1) > 0.05]


def _write_two_scans(path, *, colours: bool = True) -> list[np.ndarray]:
    """Two scans of the sphere, each in its scanner's coordinates; returns each scan's
    valid points in the file's coordinates (every 50th point is flagged invalid)."""
    rng = np.random.default_rng(0)
    e = pye57.E57(str(path), mode="w")
    truth = []
    for i, (origin, q) in enumerate(STATIONS):
        world = _visible_sphere(rng, origin, 4000)
        rot = quaternion_matrix(q)
        local = (world - origin) @ rot  # the inverse of local @ rot.T + origin
        n = len(local)
        data = {"cartesianX": local[:, 0], "cartesianY": local[:, 1], "cartesianZ": local[:, 2],
                "intensity": rng.random(n).astype(np.float32),
                "cartesianInvalidState": (np.arange(n) % 50 == 0).astype(np.int8)}
        if colours:
            for c in ("colorRed", "colorGreen", "colorBlue"):
                data[c] = rng.integers(0, 256, n).astype(np.uint8)
        e.write_scan_raw(data, name=f"station {i}", rotation=q, translation=origin)
        truth.append(world[np.arange(n) % 50 != 0])
    e.close()
    return truth


def _write_spherical(path, rae: np.ndarray, q: np.ndarray, origin: np.ndarray) -> None:
    """One scan stored as range, azimuth and elevation (as many terrestrial scanners write
    it), every 7th point flagged invalid."""
    e = pye57.E57(str(path), mode="w")
    f = e.image_file
    scan = libe57.StructureNode(f)
    scan.set("guid", libe57.StringNode(f, f"{{{uuid.uuid4()}}}"))
    scan.set("name", libe57.StringNode(f, "spherical"))
    pose, rot, tr = (libe57.StructureNode(f) for _ in range(3))
    for k, v in zip("wxyz", q, strict=True):
        rot.set(k, libe57.FloatNode(f, float(v)))
    for k, v in zip("xyz", origin, strict=True):
        tr.set(k, libe57.FloatNode(f, float(v)))
    pose.set("rotation", rot)
    pose.set("translation", tr)
    scan.set("pose", pose)
    proto = libe57.StructureNode(f)
    names = ["sphericalRange", "sphericalAzimuth", "sphericalElevation"]
    for name in names:
        proto.set(name, libe57.FloatNode(f, 0.0, libe57.E57_DOUBLE, -1e9, 1e9))
    proto.set("sphericalInvalidState", libe57.IntegerNode(f, 0, 0, 2))
    names.append("sphericalInvalidState")
    points = libe57.CompressedVectorNode(f, proto, libe57.VectorNode(f, True))
    scan.set("points", points)
    e.data3d.append(scan)
    arrays, buffers = e.make_buffers(names, len(rae))
    for j, name in enumerate(names[:3]):
        arrays[name][:] = rae[:, j]
    arrays["sphericalInvalidState"][:] = np.arange(len(rae)) % 7 == 0
    writer = points.writer(buffers)
    writer.write(len(rae))
    writer.close()
    e.close()


def _write_colour16(path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """One scan with 16-bit colours (limits 0-65535), as some scanners write them."""
    e = pye57.E57(str(path), mode="w")
    f = e.image_file
    scan = libe57.StructureNode(f)
    scan.set("guid", libe57.StringNode(f, f"{{{uuid.uuid4()}}}"))
    proto = libe57.StructureNode(f)
    names = ["cartesianX", "cartesianY", "cartesianZ", "colorRed", "colorGreen", "colorBlue"]
    for name in names[:3]:
        proto.set(name, libe57.FloatNode(f, 0.0, libe57.E57_DOUBLE, -1e9, 1e9))
    for name in names[3:]:
        proto.set(name, libe57.IntegerNode(f, 0, 0, 65535))
    points = libe57.CompressedVectorNode(f, proto, libe57.VectorNode(f, True))
    scan.set("points", points)
    e.data3d.append(scan)
    columns = [np.ascontiguousarray(c) for c in (*xyz.T, *rgb.T)]
    buffers = libe57.VectorSourceDestBuffer()
    for name, col in zip(names, columns, strict=True):
        buffers.append(libe57.SourceDestBuffer(f, name, col, len(col), True, True))
    writer = points.writer(buffers)
    writer.write(len(xyz))
    writer.close()
    e.close()


def test_16_bit_colours_are_kept(tmp_path):
    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(500, 3))
    rgb = rng.integers(0, 65536, (500, 3)).astype(np.uint16)
    path = tmp_path / "c16.e57"
    _write_colour16(path, xyz, rgb)
    cloud = read_cloud(path)
    np.testing.assert_allclose(cloud.points, xyz, atol=1e-12)
    for j, name in enumerate(("red", "green", "blue")):
        assert cloud.attributes[name].dtype == np.uint16
        np.testing.assert_array_equal(cloud.attributes[name], rgb[:, j])


def test_quaternion_matrix_is_the_rotation():
    # 90 deg about z: x -> y
    q = np.array([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(quaternion_matrix(q) @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    r = quaternion_matrix(np.array([3.0, -1.0, 2.0, 0.5]))  # not unit: normalised
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-14)
    assert np.linalg.det(r) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not a rotation"):
        quaternion_matrix(np.zeros(4))
    with pytest.raises(ValueError, match="4 elements"):
        quaternion_matrix(np.ones(3))


def test_spherical_to_cartesian_conventions():
    rae = np.array([[2.0, 0.0, 0.0], [1.0, np.pi / 2, 0.0], [3.0, 0.3, np.pi / 2]])
    np.testing.assert_allclose(spherical_to_cartesian(rae),
                               [[2, 0, 0], [0, 1, 0], [0, 0, 3]], atol=1e-15)


def test_read_places_every_scan_by_its_pose(tmp_path):
    path = tmp_path / "site.e57"
    truth = _write_two_scans(path)
    assert sniff_format(str(path)) == ".e57"
    cloud = read_cloud(path)
    both = np.concatenate(truth)
    assert len(cloud) == len(both)  # the invalid points are left out
    assert cloud.points.dtype == np.float64
    # pye57 stores these coordinates in single precision
    np.testing.assert_allclose(cloud.points, both, atol=1e-5)
    index = cloud.attributes["scan_index"]
    assert index.dtype == np.uint16
    np.testing.assert_array_equal(np.bincount(index), [len(t) for t in truth])
    assert cloud.attributes["intensity"].dtype == np.float32
    for c in ("red", "green", "blue"):
        assert cloud.attributes[c].dtype == np.uint8
    meta = cloud.metadata["e57"]
    np.testing.assert_array_equal(meta["origins"], [s[0] for s in STATIONS])
    assert meta["names"] == ["station 0", "station 1"]
    assert cloud.viewpoint is None  # two scanners: one per point instead
    vp = point_viewpoints(cloud)
    np.testing.assert_array_equal(vp, np.asarray([s[0] for s in STATIONS])[index])


def test_read_spherical_scan(tmp_path):
    rng = np.random.default_rng(1)
    rae = np.stack([rng.uniform(1, 10, 600), rng.uniform(-np.pi, np.pi, 600),
                    rng.uniform(-1.2, 1.2, 600)], 1)
    q, origin = np.array([0.9, 0.1, 0.3, -0.2]), np.array([1.0, 2.0, 3.0])
    path = tmp_path / "sph.e57"
    _write_spherical(path, rae, q, origin)
    cloud = read_cloud(path)
    keep = np.arange(600) % 7 != 0
    # by hand: x = r cos(el) cos(az), y = r cos(el) sin(az), z = r sin(el), then the pose
    r, az, el = rae[keep].T
    local = np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el)], 1)
    w, x, y, z = _unit(q)
    rot = np.array([[w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
                    [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
                    [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z]])
    np.testing.assert_allclose(cloud.points, local @ rot.T + origin, atol=1e-12)
    np.testing.assert_array_equal(cloud.viewpoint, origin)  # one scan: the cloud's viewpoint
    assert "intensity" not in cloud.attributes


def test_normals_face_each_scanner(tmp_path):
    path = tmp_path / "site.e57"
    _write_two_scans(path, colours=False)
    out = tmp_path / "site.ply"
    r = runner.invoke(app, ["normals", str(path), "--orient", "viewpoint", "-o", str(out)],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cloud = read_cloud(out)
    assert {"intensity", "scan_index", "confidence", "curvature"} <= set(cloud.attributes)
    # every point was seen from outside the sphere: its normal faces outward
    outward = (cloud.normals * cloud.points).sum(1) > 0
    assert outward.mean() > 0.999, outward.mean()
    # one viewpoint for all (the first scanner's) turns much of the second scan inward
    one = orient_towards(cloud.points, cloud.normals, STATIONS[0][0])
    assert ((one * cloud.points).sum(1) > 0).mean() < 0.9


def test_orient_towards_checks_viewpoint_shape():
    pts = np.zeros((5, 3))
    with pytest.raises(ValueError, match="viewpoint must have shape"):
        orient_towards(pts, pts, np.zeros((4, 3)))


def test_info_lists_the_scans(tmp_path):
    path = tmp_path / "site.e57"
    truth = _write_two_scans(path)
    r = runner.invoke(app, ["info", str(path), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["format"] == "e57" and data["points"] == sum(len(t) for t in truth)
    assert [s["points"] for s in data["e57_scans"]] == [len(t) for t in truth]
    assert [s["origin"] for s in data["e57_scans"]] == [s[0].tolist() for s in STATIONS]
    r = runner.invoke(app, ["info", str(path)], catch_exceptions=False)
    assert "station 1" in r.output and "scanner at -4 0 1" in r.output


def test_bad_e57_files_fail_alone(tmp_path):
    good = tmp_path / "in" / "good.e57"
    good.parent.mkdir()
    _write_two_scans(good)
    data = good.read_bytes()
    (tmp_path / "in" / "cut.e57").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # a page's checksum no longer holds
    (tmp_path / "in" / "flip.e57").write_bytes(bytes(flipped))
    (tmp_path / "in" / "head.e57").write_bytes(b"ASTM-E57" + b"\0" * 40)
    r = runner.invoke(app, ["normals", str(tmp_path / "in"), "-o", str(tmp_path / "out") + "/"],
                      catch_exceptions=False)
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, r.output
    assert all(".e57: corrupt E57 file (" in line for line in errors), errors
    assert "Traceback" not in r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.ply"]


def test_truncated_and_mutated_e57_never_crash(tmp_path):
    path = tmp_path / "a.e57"
    _write_two_scans(path)
    data = path.read_bytes()
    rng = np.random.default_rng(2)
    cases = [data[:n] for n in (8, 48, 1024, len(data) - 1)]
    for _ in range(12):
        b = bytearray(data)
        for i in rng.integers(0, len(b), 4):
            b[i] = int(rng.integers(0, 256))
        cases.append(bytes(b))
    for j, blob in enumerate(cases):
        p = tmp_path / f"m{j}.e57"
        p.write_bytes(blob)
        try:
            cloud = read_cloud(p)
        except FapcError as e:
            assert "\n" not in str(e)
        else:
            assert cloud.points.shape[1] == 3


def test_missing_pye57_is_one_clear_line(tmp_path, monkeypatch):
    path = tmp_path / "site.e57"
    _write_two_scans(path)
    import sys

    monkeypatch.setitem(sys.modules, "pye57", None)  # import pye57 raises ImportError
    with pytest.raises(FapcError, match=r"needs the pye57 package \(pip install 'fapc\[e57\]'\)"):
        read_cloud(path)
