"""LAS: a file laid out by hand from the specification, read; round trips; the writer's
layout checked field by field; bad files refused in one line."""

from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import pytest

from fapc.cli import app
from fapc.cloud import PointCloud
from fapc.errors import FapcError
from fapc.io import read_cloud, write_cloud
from fapc.io.las import POINT_FIELDS

HAS_LAZRS = importlib.util.find_spec("lazrs") is not None


def _vlr(user: bytes, rid: int, payload: bytes, desc: bytes = b"") -> bytes:
    return struct.pack("<H16sHH32s", 0, user, rid, len(payload), desc) + payload


def _descriptor(dtype_code: int, name: bytes, *, options: int = 0, scale: float = 0.0,
                offset: float = 0.0) -> bytes:
    d = bytearray(192)
    d[2], d[3] = dtype_code, options
    d[4:4 + len(name)] = name
    d[112:120] = struct.pack("<d", scale)
    d[136:144] = struct.pack("<d", offset)
    return bytes(d)


def _hand_made_las(path) -> dict:
    """A LAS 1.2 file, point format 3 (34 bytes) + 2 extra bytes (a scaled int16 'height'),
    three points, a GeoTIFF key VLR; every byte placed here from the specification."""
    ints = np.array([[100, 200, -5], [-300, 0, 7], [2**31 - 1, -(2**31), 0]], np.int64)
    scale, offset = (0.01, 0.01, 0.001), (500000.0, 4000000.0, 50.0)
    geokeys = struct.pack("<8H", 1, 1, 0, 1, 3072, 0, 1, 32632)  # EPSG:32632
    extra = _vlr(b"LASF_Spec", 4, _descriptor(4, b"height", options=0b11000, scale=0.5,
                                                offset=10.0))
    vlrs = _vlr(b"LASF_Projection", 34735, geokeys, b"GeoKeyDirectoryTag") + extra
    rec_len = 34 + 2
    point_offset = 227 + len(vlrs)
    body = b""
    for i, (x, y, z) in enumerate(ints):
        bits = (1 + i % 2) | (2 << 3) | ((i % 2) << 6) | (1 << 7)  # return i, of 2, dir, edge
        cls = 6 | (1 << 5) if i == 0 else 2 | (1 << 7)  # building + synthetic; ground + withheld
        body += struct.pack("<iiiHBBbBH", x, y, z, 1000 + i, bits, cls, -12 + i, 7, 42)
        body += struct.pack("<d", 1e5 + 0.25 * i)  # gps time
        body += struct.pack("<HHH", 65535, 256 * i, 3)  # rgb
        body += struct.pack("<h", -4 + 3 * i)  # the extra 'height'
    fmt = 3
    header = struct.pack("<4sHH16sBB32s32sHHHIIBHI5I12d", b"LASF", 7, 0, b"\0" * 16, 1, 2,
                         b"hand".ljust(32, b"\0"), b"test".ljust(32, b"\0"), 1, 2026, 227,
                         point_offset, 2, fmt, rec_len, 3, 2, 1, 0, 0, 0, *scale, *offset,
                         0, 0, 0, 0, 0, 0)
    assert len(header) == 227
    path.write_bytes(header + vlrs + body)
    return {"ints": ints, "scale": np.array(scale), "offset": np.array(offset),
            "geokeys": geokeys}


def test_a_hand_made_las_file_reads_every_field(tmp_path):
    f = tmp_path / "scan.las"
    want = _hand_made_las(f)
    c = read_cloud(f)
    np.testing.assert_array_equal(c.points, want["ints"] * want["scale"] + want["offset"])
    assert c.points.dtype == np.float64 and c.normals is None
    a = c.attributes
    np.testing.assert_array_equal(a["intensity"], [1000, 1001, 1002])
    np.testing.assert_array_equal(a["return_number"], [1, 2, 1])
    np.testing.assert_array_equal(a["number_of_returns"], [2, 2, 2])
    np.testing.assert_array_equal(a["scan_direction_flag"], [0, 1, 0])
    np.testing.assert_array_equal(a["edge_of_flight_line"], [1, 1, 1])
    np.testing.assert_array_equal(a["classification"], [6, 2, 2])
    np.testing.assert_array_equal(a["synthetic"], [1, 0, 0])
    np.testing.assert_array_equal(a["withheld"], [0, 1, 1])
    np.testing.assert_array_equal(a["scan_angle_rank"], [-12, -11, -10])
    np.testing.assert_array_equal(a["gps_time"], [1e5, 1e5 + 0.25, 1e5 + 0.5])
    np.testing.assert_array_equal(a["green"], [0, 256, 512])
    np.testing.assert_array_equal(a["height"], [-4 * 0.5 + 10, -1 * 0.5 + 10, 2 * 0.5 + 10])
    assert a["intensity"].dtype == np.uint16 and a["scan_angle_rank"].dtype == np.int8
    meta = c.metadata["las"]
    assert meta["point_format"] == 3
    assert [(r[0], r[1], r[3]) for r in meta["records"]] == [
        ("LASF_Projection", 34735, want["geokeys"])]


def test_las_round_trip_keeps_the_integers_the_format_and_the_crs(tmp_path):
    src = tmp_path / "scan.las"
    want = _hand_made_las(src)
    c = read_cloud(src)
    c.normals = np.tile(np.array([0, 0.6, 0.8], np.float32), (3, 1))
    c.attributes["confidence"] = np.array([0.5, 1, 0], np.float32)
    write_cloud(tmp_path / "out.las", c)
    raw = (tmp_path / "out.las").read_bytes()
    # the header, read here with the specification's layout rather than our reader
    assert raw[:4] == b"LASF" and raw[24:26] == bytes([1, 4])
    header_size, point_offset, n_vlrs, fmt, rec_len = struct.unpack_from("<HIIBH", raw, 94)
    assert (header_size, fmt, n_vlrs) == (375, 3, 2)
    assert rec_len == 34 + 2 * 4 + 4 * 4  # height (float64: scaled), 3 normals + confidence
    assert struct.unpack_from("<3d3d", raw, 131) == (*want["scale"], *want["offset"])
    assert struct.unpack_from("<Q", raw, 247)[0] == 3
    xyz = np.array([struct.unpack_from("<3i", raw, point_offset + i * rec_len) for i in range(3)])
    np.testing.assert_array_equal(xyz, want["ints"])
    back = read_cloud(tmp_path / "out.las")
    np.testing.assert_array_equal(back.points, c.points)
    np.testing.assert_array_equal(back.normals, c.normals)
    for k, v in c.attributes.items():
        np.testing.assert_array_equal(back.attributes[k], v, err_msg=k)
    assert back.metadata["las"]["point_format"] == 3
    assert back.metadata["las"]["records"][0][3] == want["geokeys"]


def test_a_cloud_from_another_format_gets_point_format_7_and_extra_bytes(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    pts = rng.normal(size=(n, 3)) * [30, 30, 2] + [691000.0, 5335000.0, 420.0]
    c = PointCloud(points=pts, normals=rng.normal(size=(n, 3)).astype(np.float32),
                   attributes={"red": rng.integers(0, 256, n).astype(np.uint8),
                               "green": np.zeros(n, np.uint8), "blue": np.full(n, 255, np.uint8),
                               "pair": rng.integers(0, 9, (n, 2)).astype(np.uint16),
                               "label": np.arange(n, dtype=np.int32)})
    write_cloud(tmp_path / "c.las", c)
    raw = (tmp_path / "c.las").read_bytes()
    assert raw[104] == 7 and struct.unpack_from("<I", raw, 107)[0] == 0  # legacy count 0
    assert struct.unpack_from("<H", raw, 6)[0] & 0b10000  # formats 6-10: the WKT bit
    back = read_cloud(tmp_path / "c.las")
    assert np.abs(back.points - pts).max() < 1e-6  # the scale chosen for the extent
    np.testing.assert_array_equal(back.normals, c.normals)
    np.testing.assert_array_equal(back.attributes["red"], c.attributes["red"].astype(np.uint16) * 257)
    np.testing.assert_array_equal(back.attributes["pair"], c.attributes["pair"])
    np.testing.assert_array_equal(back.attributes["label"], c.attributes["label"])
    np.testing.assert_array_equal(back.attributes["return_number"], np.ones(n))
    assert set(POINT_FIELDS) == set(range(11))


def _compressed_with_lazrs(las: bytes) -> bytes:
    """The LAZ file of an uncompressed LAS 1.2 file, made with lazrs's own compressor (not
    our writer): the LASzip VLR appended, the point format's bit 7 set."""
    import io

    import lazrs

    header_size, offset, n_vlrs, fmt, rec_len = struct.unpack_from("<HIIBH", las, 94)
    count = struct.unpack_from("<I", las, 107)[0]
    vlr = lazrs.LazVlr.new_for_compression(fmt, rec_len - np.dtype(POINT_FIELDS[fmt]).itemsize)
    laszip = _vlr(b"laszip encoded", 22204, bytes(vlr.record_data()))
    head = bytearray(las[:offset])
    struct.pack_into("<IIB", head, 96, offset + len(laszip), n_vlrs + 1, fmt | 0x80)
    out = io.BytesIO()
    out.write(bytes(head) + laszip)
    compressor = lazrs.LasZipCompressor(out, vlr)
    compressor.compress_many(las[offset:offset + count * rec_len])
    compressor.done()
    return out.getvalue()


def test_laz_made_by_lazrs_reads_as_its_las(tmp_path):
    pytest.importorskip("lazrs")
    _hand_made_las(tmp_path / "scan.las")
    (tmp_path / "scan.laz").write_bytes(_compressed_with_lazrs((tmp_path / "scan.las").read_bytes()))
    las, laz = read_cloud(tmp_path / "scan.las"), read_cloud(tmp_path / "scan.laz")
    np.testing.assert_array_equal(laz.points, las.points)
    assert list(laz.attributes) == list(las.attributes)
    for k, v in las.attributes.items():
        np.testing.assert_array_equal(laz.attributes[k], v, err_msg=k)
    assert laz.metadata["las"]["records"] == las.metadata["las"]["records"]  # LASzip's dropped


def test_laz_round_trip(tmp_path):
    pytest.importorskip("lazrs")
    rng = np.random.default_rng(2)
    n = 20000
    pts = np.c_[rng.uniform(0, 50, (n, 2)), rng.normal(0, 0.05, n)] + [500000.0, 4e6, 80.0]
    c = PointCloud(points=pts, normals=np.tile(np.float32([0, 0, 1]), (n, 1)),
                   attributes={"classification": rng.integers(0, 7, n).astype(np.uint8),
                               "confidence": rng.random(n).astype(np.float32)})
    write_cloud(tmp_path / "t.las", c)
    write_cloud(tmp_path / "t.laz", c)
    raw = (tmp_path / "t.laz").read_bytes()
    assert raw[104] == 6 | 0x80
    assert len(raw) < 0.6 * (tmp_path / "t.las").stat().st_size
    a, b = read_cloud(tmp_path / "t.las"), read_cloud(tmp_path / "t.laz")
    np.testing.assert_array_equal(b.points, a.points)
    np.testing.assert_array_equal(b.normals, c.normals)
    for k, v in a.attributes.items():
        np.testing.assert_array_equal(b.attributes[k], v, err_msg=k)
    # a LAZ read is written back as LAZ with the same records: the same bytes, but the date
    write_cloud(tmp_path / "u.laz", b)
    assert (tmp_path / "u.laz").read_bytes()[:90] == raw[:90]


def test_bad_las_files_fail_in_one_line(tmp_path):
    if HAS_LAZRS:
        f = tmp_path / "cut.laz"
        _hand_made_las(tmp_path / "x.las")
        f.write_bytes(_compressed_with_lazrs((tmp_path / "x.las").read_bytes())[:-40])
        with pytest.raises(FapcError, match="corrupt LAZ data") as err:
            read_cloud(f)
        assert "\n" not in str(err.value)
        # a LASzip record listing no items: lazrs panics (pyo3's PanicException, which is not
        # an Exception); still one line, still this file
        data = bytearray(_compressed_with_lazrs((tmp_path / "x.las").read_bytes()))
        pos, at = 227, None
        for _ in range(struct.unpack_from("<I", data, 100)[0]):
            user, rid, length = struct.unpack_from("<2x16sHH", data, pos)
            if (user.rstrip(b"\0"), rid) == (b"laszip encoded", 22204):
                at = pos + 54
            pos += 54 + length
        struct.pack_into("<H", data, at + 32, 0)  # the number of items
        f.write_bytes(bytes(data))
        with pytest.raises(FapcError, match="corrupt LAZ data .*PanicException"):
            read_cloud(f)
        # a chunk table claiming 2^31 chunks: lazrs would try to allocate them and abort the
        # whole process; the reader refuses it first
        data = bytearray(_compressed_with_lazrs((tmp_path / "x.las").read_bytes()))
        table_at = struct.unpack_from("<q", data, struct.unpack_from("<I", data, 96)[0])[0]
        struct.pack_into("<I", data, table_at + 4, 2**31)
        f.write_bytes(bytes(data))
        with pytest.raises(FapcError, match="claims 2147483648 chunks"):
            read_cloud(f)
    g = tmp_path / "cut.las"
    _hand_made_las(g)
    g.write_bytes(g.read_bytes()[:-10])
    with pytest.raises(FapcError, match="truncated: the header declares 3 points"):
        read_cloud(g)
    bad = PointCloud(points=np.array([[0, 0, 0], [np.nan, 0, 0.0]]))
    with pytest.raises(FapcError, match="NaN/inf") as err:
        write_cloud(tmp_path / "nan.las", bad)
    assert err.value.path == str(tmp_path / "nan.las")  # the output, not its temporary file
    assert not list(tmp_path.glob("nan*")) and not list(tmp_path.glob(".fapc-*"))


def test_an_attribute_that_does_not_fit_its_las_field_is_kept_as_extra_bytes(tmp_path):
    c = PointCloud(points=np.zeros((3, 3)), attributes={
        "classification": np.array([3, 300, 2]), "intensity": np.array([0.5, 1, 2], np.float32),
        "user_data": np.array([1, 2, 3], np.uint8)})
    write_cloud(tmp_path / "c.las", c)
    back = read_cloud(tmp_path / "c.las").attributes
    np.testing.assert_array_equal(back["user_data"], [1, 2, 3])  # fits: the standard field
    np.testing.assert_array_equal(back["classification"], [0, 0, 0])
    np.testing.assert_array_equal(back["classification_extra"], [3, 300, 2])
    np.testing.assert_array_equal(back["intensity_extra"], c.attributes["intensity"])
    raw = (tmp_path / "c.las").read_bytes()
    user, rid, length = struct.unpack_from("<2x16sHH", raw, 375)  # the first VLR
    assert (user.rstrip(b"\0"), rid) == (b"LASF_Spec", 4)
    names = [raw[375 + 54 + k * 192 + 4:375 + 54 + k * 192 + 36].rstrip(b"\0")
             for k in range(length // 192)]
    # no extra-bytes name repeats a standard field's (laspy refuses such files)
    assert names == [b"classification_extra", b"intensity_extra"]


@pytest.mark.parametrize("ext", ["las", "laz"])
def test_fapc_normals_on_a_lidar_tile_keeps_its_fields(tmp_path, ext):
    from typer.testing import CliRunner

    if ext == "laz":
        pytest.importorskip("lazrs")

    rng = np.random.default_rng(1)
    n = 3000
    xy = rng.uniform(0, 20, (n, 2))
    pts = np.c_[xy, 0.1 * np.sin(xy[:, 0])] + [500000.0, 4000000.0, 30.0]
    cls = rng.integers(0, 10, n).astype(np.uint8)
    write_cloud(tmp_path / f"tile.{ext}", PointCloud(points=pts, attributes={"classification": cls}))
    r = CliRunner().invoke(app, ["normals", str(tmp_path / f"tile.{ext}"), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"][0]["status"] == "ok"
    out = read_cloud(tmp_path / f"tile.normals.{ext}")
    assert (tmp_path / f"tile.normals.{ext}").read_bytes()[104] & 0x80 == (ext == "laz") * 0x80
    np.testing.assert_array_equal(out.attributes["classification"], cls)
    np.testing.assert_array_equal(out.points, read_cloud(tmp_path / f"tile.{ext}").points)
    slope = np.c_[-0.1 * np.cos(xy[:, 0]), np.zeros(n), np.ones(n)]
    slope /= np.linalg.norm(slope, axis=1, keepdims=True)
    assert np.percentile(np.abs((out.normals * slope).sum(1)), 5) > 0.99
    assert {"confidence", "curvature"} <= set(out.attributes)


def test_fapc_info_names_the_point_format_and_coordinate_system(tmp_path):
    from typer.testing import CliRunner

    want = _hand_made_las(tmp_path / "scan.las")
    write_cloud(tmp_path / "plain.las", PointCloud(points=np.zeros((4, 3))))
    r = CliRunner().invoke(app, ["info", str(tmp_path / "scan.las"), str(tmp_path / "plain.las"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    scan, plain = (json.loads(line) for line in r.stdout.splitlines())
    assert scan["las"] == {"point_format": 3, "scale": list(want["scale"]),
                           "offset": list(want["offset"]), "crs": "GeoTIFF"}
    assert plain["las"]["point_format"] == 6 and plain["las"]["crs"] is None


def test_extra_bytes_names_are_unique_and_never_a_standard_field():
    from fapc.io.las_extra import unique_names

    a = np.zeros(1)
    long = "v" * 40
    got = [n for n, _ in unique_names([(long + "1", a), (long + "2", a), (long + "3", a),
                                       ("intensity", a), ("Intensity_extra", a)], {"intensity"})]
    assert got == ["v" * 32, "v" * 26 + "_extra", "v" * 25 + "_extra2", "intensity_extra",
                   "Intensity_extra_extra"]
    assert all(len(n) <= 32 for n in got)


def test_a_laz_whose_chunk_table_moved_is_refused_before_decompressing(tmp_path):
    """Four bytes inserted into the points shift the chunk table: it then reads as holding no
    chunk, and lazrs, left to itself, allocated 1.4 GB for this 2 KB file before failing."""
    pytest.importorskip("lazrs")
    rng = np.random.default_rng(0)
    c = PointCloud(points=rng.normal(size=(20, 3)), attributes={"label": np.arange(20)})
    write_cloud(tmp_path / "a.laz", c)
    data = bytearray((tmp_path / "a.laz").read_bytes())
    offset = struct.unpack_from("<I", data, 96)[0]
    data[offset + 200:offset + 200] = b"Xw\"f"
    (tmp_path / "b.laz").write_bytes(bytes(data))
    with pytest.raises(FapcError, match="chunk table holds fewer than its 20 points"):
        read_cloud(tmp_path / "b.laz")


def test_an_extended_record_after_the_points_round_trips(tmp_path):
    from fapc.io.las import describe

    c = PointCloud(points=np.random.default_rng(0).normal(size=(50, 3)))
    wkt = b'PROJCS["WGS 84 / UTM zone 32N"]\0'
    c.metadata["las"] = {"point_format": 6, "scale": np.full(3, 1e-3), "offset": np.zeros(3),
                         "records": [("LASF_Projection", 2112, "OGC WKT", wkt, True)]}
    for ext in ("las", "laz") if HAS_LAZRS else ("las",):
        write_cloud(tmp_path / f"a.{ext}", c)
        raw = (tmp_path / f"a.{ext}").read_bytes()
        start, count = struct.unpack_from("<QI", raw, 235)
        assert count == 1 and raw[start + 60:] == wkt  # the EVLR, where the header says
        back = read_cloud(tmp_path / f"a.{ext}")
        assert back.metadata["las"]["records"] == [("LASF_Projection", 2112, "OGC WKT", wkt, True)]
        assert describe(back.metadata["las"])["crs"] == "WKT"
        np.testing.assert_allclose(back.points, c.points, atol=5e-4)
