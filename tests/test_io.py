"""Readers and writers: lossless round trips, sniffing, and refusal of corrupt files."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fapc.cloud import PointCloud
from fapc.errors import FapcError, FormatError
from fapc.io import read_cloud, sample_mesh, write_cloud
from fapc.io.pcd import lzf_decompress


def _same(a: PointCloud, b: PointCloud, *, exact_dtype: bool = True) -> None:
    np.testing.assert_array_equal(a.points, b.points)
    if exact_dtype:
        assert a.points.dtype == b.points.dtype
    if a.normals is None:
        assert b.normals is None
    else:
        np.testing.assert_array_equal(a.normals, b.normals)
    assert list(a.attributes) == list(b.attributes)
    for k in a.attributes:
        np.testing.assert_array_equal(a.attributes[k], b.attributes[k])
        if exact_dtype:
            assert a.attributes[k].dtype == b.attributes[k].dtype, k


@pytest.mark.parametrize("ext,ascii", [(".ply", False), (".ply", True), (".pcd", False),
                                       (".pcd", True), (".npz", False)])
def test_binary_formats_round_trip_every_attribute(tmp_path, rich_cloud, ext, ascii):
    rich_cloud.normals = np.random.default_rng(0).normal(size=(len(rich_cloud), 3)).astype(
        np.float32)
    p = tmp_path / f"c{ext}"
    write_cloud(p, rich_cloud, ascii=ascii)
    back = read_cloud(p)
    _same(rich_cloud, back)
    assert back.points.dtype == np.float64  # georeferenced precision kept


@pytest.mark.parametrize("ext", [".xyz", ".txt", ".csv", ".xyzn"])
def test_text_formats_round_trip(tmp_path, rich_cloud, ext):
    rich_cloud.normals = np.tile([0.0, 0.6, 0.8], (len(rich_cloud), 1))
    if ext == ".xyzn":
        rich_cloud.attributes.clear()
    p = tmp_path / f"c{ext}"
    write_cloud(p, rich_cloud)
    back = read_cloud(p)
    np.testing.assert_array_equal(back.points, rich_cloud.points)
    np.testing.assert_allclose(back.normals, rich_cloud.normals)
    assert list(back.attributes) == list(rich_cloud.attributes)
    for k, v in rich_cloud.attributes.items():
        np.testing.assert_array_equal(back.attributes[k].astype(v.dtype), v)


def test_big_endian_ply_and_faces(tmp_path):
    pts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.5]], ">f4")
    header = (b"ply\nformat binary_big_endian 1.0\nelement vertex 4\nproperty float x\n"
              b"property float y\nproperty float z\nproperty ushort flag\nelement face 2\n"
              b"property list uchar int vertex_indices\nend_header\n")
    body = b"".join(p.tobytes() + struct.pack(">H", i) for i, p in enumerate(pts))
    body += struct.pack(">Biii", 3, 0, 1, 2) + struct.pack(">Biii", 3, 1, 3, 2)
    (tmp_path / "be.ply").write_bytes(header + body)
    c = read_cloud(tmp_path / "be.ply")
    np.testing.assert_array_equal(c.points, pts.astype(np.float32))
    np.testing.assert_array_equal(c.attributes["flag"], [0, 1, 2, 3])
    np.testing.assert_array_equal(c.faces, [[0, 1, 2], [1, 3, 2]])
    s = read_cloud(tmp_path / "be.ply", from_mesh="sample:200")
    assert len(s) == 200 and np.allclose(np.abs(s.normals[:, 2]) > 0.5, True)


def test_ply_with_quads_and_extra_element(tmp_path):
    header = ("ply\nformat ascii 1.0\ncomment x\nelement vertex 4\nproperty double x\n"
              "property double y\nproperty double z\nelement face 1\n"
              "property list uchar int vertex_indices\nelement range_grid 2\n"
              "property list uchar int vertex_indices\nend_header\n")
    body = "0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n1 0\n0\n"
    (tmp_path / "q.ply").write_text(header + body)
    c = read_cloud(tmp_path / "q.ply")
    assert c.points.dtype == np.float64
    assert c.faces.shape == (2, 3)


def test_content_sniffing_beats_a_lying_extension(tmp_path, rich_cloud):
    write_cloud(tmp_path / "c.ply", rich_cloud)
    os.rename(tmp_path / "c.ply", tmp_path / "c.xyz")
    _same(rich_cloud, read_cloud(tmp_path / "c.xyz"))


def test_text_headers_pts_and_comma(tmp_path):
    (tmp_path / "a.pts").write_text("3\n0 0 0 10 255 0 0\n1 0 0 20 0 255 0\n0 1 0 30 0 0 255\n")
    c = read_cloud(tmp_path / "a.pts")
    assert len(c) == 3 and list(c.attributes) == ["intensity", "red", "green", "blue"]
    (tmp_path / "b.csv").write_text("X,Y,Z,Intensity\n1,2,3,4\n5,6,7,8\n")
    c = read_cloud(tmp_path / "b.csv")
    np.testing.assert_array_equal(c.points, [[1, 2, 3], [5, 6, 7]])
    np.testing.assert_array_equal(c.attributes["intensity"], [4, 8])
    # semicolons, as spreadsheets in comma-decimal locales write them (Windows line ends too)
    (tmp_path / "c.csv").write_bytes(b"X;Y;Z;Intensity\r\n1,5;2;-3,25;4\r\n5;6,5;7;8\r\n\r\n")
    c = read_cloud(tmp_path / "c.csv")
    np.testing.assert_array_equal(c.points, [[1.5, 2, -3.25], [5, 6.5, 7]])
    np.testing.assert_array_equal(c.attributes["intensity"], [4, 8])
    # a semicolon in a comment does not make commas decimal marks
    (tmp_path / "d.xyz").write_text("# exported; units m\n1.5,2,3\n4,5,6\n")
    np.testing.assert_array_equal(read_cloud(tmp_path / "d.xyz").points, [[1.5, 2, 3], [4, 5, 6]])


def test_npy_and_mesh_sampling(tmp_path):
    a = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    c = read_cloud(tmp_path / "a.npy")
    np.testing.assert_array_equal(c.points, a[:, :3])
    np.testing.assert_array_equal(c.normals, a[:, 3:])
    # sampling records the normal of the face each sample came from
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    pts, nrm, fi = sample_mesh(v, f, 1000, seed=0)
    for face in range(4):
        sel = fi == face
        a_, b_, c_ = v[f[face]]
        expect = np.cross(b_ - a_, c_ - a_)
        expect /= np.linalg.norm(expect)
        np.testing.assert_allclose(nrm[sel], np.tile(expect, (sel.sum(), 1)), atol=1e-12)
        # points lie on their face's plane
        np.testing.assert_allclose((pts[sel] - a_) @ expect, 0, atol=1e-12)


def test_obj_and_off_through_trimesh(tmp_path):
    (tmp_path / "t.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "t.off").write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    for name in ("t.obj", "t.off"):
        c = read_cloud(tmp_path / name, from_mesh="sample:50")
        assert len(c) == 50
        np.testing.assert_allclose(np.abs(c.normals[:, 2]), 1)


def test_lzf_known_stream():
    # literal "abc" then a back-reference of length 6 at distance 3 (overlapping copy)
    stream = bytes([2]) + b"abc" + bytes([(4 << 5) | 0, 2])
    assert lzf_decompress(stream, 9) == b"abcabcabc"
    with pytest.raises(ValueError):
        lzf_decompress(stream, 10)


def test_binary_compressed_pcd(tmp_path):
    n = 5
    xyz = np.arange(15, dtype="<f4").reshape(5, 3)
    raw = b"".join(xyz[:, i].tobytes() for i in range(3))  # column-major blocks
    comp = bytes([len(raw) - 1]) + raw if len(raw) <= 32 else None
    header = (f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {n}\n"
              f"HEIGHT 1\nVIEWPOINT 1 2 3 1 0 0 0\nPOINTS {n}\nDATA binary_compressed\n")
    # 60 bytes: two literal runs (32 + 28)
    comp = bytes([31]) + raw[:32] + bytes([27]) + raw[32:]
    (tmp_path / "c.pcd").write_bytes(header.encode() + struct.pack("<II", len(comp), len(raw))
                                     + comp)
    c = read_cloud(tmp_path / "c.pcd")
    np.testing.assert_array_equal(c.points, xyz)
    np.testing.assert_array_equal(c.viewpoint, [1, 2, 3])


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
     b"property float z\nend_header\n0 0 0\n1 1 1\n", "truncated"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 1000000000\nproperty float x\n"
     b"property float y\nproperty float z\nend_header\n" + b"\0" * 24, "truncated"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n"
     b"property float y\nproperty float z\nend_header\n" + b"\1" * 24, "header does not match"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n", "no 'y'"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty flot x\nend_header\n0\n", "header"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\n", "end_header"),
    (b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 9\nHEIGHT 1\n"
     b"POINTS 9\nDATA binary\n" + b"\0" * 12, "truncated"),
    (b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 9\nHEIGHT 1\n"
     b"POINTS 9\nDATA binary_compressed\n" + struct.pack("<II", 4, 108) + b"\xff\xff\xff\xff",
     "compressed"),
])
def test_corrupt_files_give_one_line_errors(tmp_path, content, reason):
    p = tmp_path / "bad.ply"
    if content.startswith(b"VERSION"):
        p = tmp_path / "bad.pcd"
    p.write_bytes(content)
    with pytest.raises(FormatError) as e:
        read_cloud(p)
    msg = str(e.value)
    assert reason in msg and str(p) in msg and "\n" not in msg


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FapcError, match="no such file"):
        read_cloud(tmp_path / "nope.ply")
    (tmp_path / "x.foo").write_text("hello")
    with pytest.raises(FormatError, match="unknown format"):
        read_cloud(tmp_path / "x.foo")


_finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pts=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40)
                   .map(lambda s: (s[0], 3)), elements=_finite),
    ints=st.integers(0, 255),
    ext=st.sampled_from([".ply", ".pcd", ".npz", ".xyz", ".csv"]),
    ascii=st.booleans(),
)
def test_property_random_clouds_round_trip(tmp_path, pts, ints, ext, ascii):
    n = len(pts)
    cloud = PointCloud(points=pts, normals=np.roll(pts, 1, axis=0),
                       attributes={"v": np.full(n, ints, np.uint8),
                                   "w": (pts[:, 0] * 0.5).astype(np.float32)})
    p = tmp_path / f"r{ext}"
    write_cloud(p, cloud, ascii=ascii)
    back = read_cloud(p)
    text = ext in (".xyz", ".csv")
    np.testing.assert_array_equal(back.points.astype(np.float32), pts)
    if not text:
        assert back.points.dtype == np.float32
    np.testing.assert_array_equal(back.normals.astype(np.float32), cloud.normals)
    for k, v in cloud.attributes.items():
        np.testing.assert_array_equal(back.attributes[k].astype(v.dtype), v)


def test_a_corrupt_npz_or_npy_leaves_no_file_open(tmp_path):
    import gc
    import warnings

    for name, data in (("bad.npz", b"PK\x03\x04" + b"\0" * 40), ("bad.npy", b"\x93NUMPY\x01\0x")):
        p = tmp_path / name
        p.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(FapcError, match="not a readable"):
                read_cloud(p)
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], name
