"""Fuzzing every reader with truncated, mutated and hostile files (bounded time).

Each input must give a FormatError/FapcError (one line) or a valid cloud: never another
exception, a hang, or an allocation far beyond the file's size.
"""

from __future__ import annotations

import resource
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fapc.cloud import PointCloud
from fapc.errors import FapcError
from fapc.io import read_cloud, write_cloud

_SEEDS = {}


def _seed_files(tmp_path_factory) -> dict[str, bytes]:
    if not _SEEDS:
        d = tmp_path_factory.mktemp("seeds")
        rng = np.random.default_rng(0)
        c = PointCloud(points=rng.normal(size=(20, 3)).astype(np.float32),
                       normals=rng.normal(size=(20, 3)).astype(np.float32),
                       attributes={"intensity": rng.random(20).astype(np.float32),
                                   "label": np.arange(20, dtype=np.int32)})
        for name, ascii in [("a.ply", True), ("b.ply", False), ("c.pcd", True), ("d.pcd", False),
                            ("e.xyz", False), ("f.csv", False), ("g.npz", False),
                            ("l.las", False), ("m.laz", False)]:
            write_cloud(d / name, c, ascii=ascii)
            _SEEDS[name] = (d / name).read_bytes()
        _SEEDS["h.obj"] = b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
        _SEEDS["j.off"] = b"OFF\n4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 2 1\n3 0 1 3\n3 0 3 2\n3 1 2 3\n"
        tri = [(0, 0, 0), (1, 0, 0), (0, 1, 0)]
        stl = b"\0" * 80 + struct.pack("<I", 2)
        for _ in range(2):
            stl += struct.pack("<3f", 0, 0, 1) + b"".join(struct.pack("<3f", *v) for v in tri)
            stl += b"\0\0"
        _SEEDS["k.stl"] = stl
        np.save(d / "i.npy", rng.normal(size=(10, 3)))
        _SEEDS["i.npy"] = (d / "i.npy").read_bytes()
    return _SEEDS


def _check(path, size: int) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        cloud = read_cloud(path)
        assert np.asarray(cloud.points).shape[1] == 3
    except FapcError as e:
        assert "\n" not in str(e)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200_000 + size // 10, grown_kb  # no allocation far beyond the file


_mutation = st.tuples(st.sampled_from(["truncate", "flip", "insert", "zero"]),
                      st.floats(0, 1), st.binary(min_size=1, max_size=8))


@settings(max_examples=600, deadline=2000, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["a.ply", "b.ply", "c.pcd", "d.pcd", "e.xyz", "f.csv", "g.npz",
                             "h.obj", "i.npy", "j.off", "k.stl", "l.las", "m.laz"]),
       mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_files_never_crash(tmp_path_factory, name, mutations):
    data = bytearray(_seed_files(tmp_path_factory)[name])
    for kind, where, blob in mutations:
        pos = int(where * max(len(data) - 1, 0))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip" and data:
            data[pos] ^= blob[0]
        elif kind == "insert":
            data[pos:pos] = blob
        elif kind == "zero":
            data[pos:pos + len(blob)] = b"\0" * len(blob)
    p = tmp_path_factory.mktemp("m") / name
    p.write_bytes(bytes(data))
    _check(p, len(data))


def test_regression_truncated_npy_header(tmp_path_factory):
    """Found by the fuzzer: numpy raised tokenize.TokenError on this header."""
    data = bytearray(_seed_files(tmp_path_factory)["i.npy"])
    del data[int(0.75 * (len(data) - 1)):]
    pos = int(0.25 * (len(data) - 1))
    data[pos:pos + 2] = b"\0\0"
    p = tmp_path_factory.mktemp("r") / "i.npy"
    p.write_bytes(bytes(data))
    _check(p, len(data))


def test_hostile_headers(tmp_path):
    cases = {
        "huge.ply": b"ply\nformat binary_little_endian 1.0\nelement vertex 4000000000000\n"
                    b"property double x\nproperty double y\nproperty double z\nend_header\n",
        "hugefaces.ply": b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n"
                         b"property float y\nproperty float z\nelement face 999999999\n"
                         b"property list uchar int vertex_indices\nend_header\n" + b"\0" * 12
                         + b"\xff" + b"\0" * 8,
        "neg.ply": b"ply\nformat ascii 1.0\nelement vertex -5\nproperty float x\nend_header\n",
        "huge.pcd": b"VERSION 0.7\nFIELDS x y z\nSIZE 8 8 8\nTYPE F F F\nCOUNT 1 1 1\n"
                    b"WIDTH 999999999999\nHEIGHT 1\nPOINTS 999999999999\nDATA binary\n",
        "bomb.pcd": b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 9\n"
                    b"HEIGHT 1\nPOINTS 9\nDATA binary_compressed\n" + struct.pack("<II", 3, 108)
                    + b"\xe0\xff\x00",
        "deep.obj": b"v 0 0 0\n" + b"g " + b"(" * 100000 + b"\nf 1 1 1\n",
        "garbage.ply": bytes(range(256)) * 10,
        "garbage.xyz": bytes(range(256)) * 10,
        "header_only.pcd": b"# .PCD v0.7\nVERSION 0.7\n",
        "nan_hdr.ply": b"ply\nformat ascii 1.0\nelement vertex nan\nend_header\n",
        "huge.off": b"OFF\n1000000000 1000000000 0\n0 0 0\n",
        "huge.stl": b"\0" * 80 + struct.pack("<I", 4_000_000_000) + b"\0" * 100,
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        _check(p, len(data))
