"""PCD reader and writer (DATA ascii, binary, binary_compressed), all fields kept.

``normal_x normal_y normal_z`` become the normals; ``VIEWPOINT`` is kept as the sensor
position; every other field (``rgb`` packed floats, ``intensity``, ``curvature`` ...) is an
attribute with its stored dtype. Fields with ``COUNT`` > 1 become ``(N, C)`` attributes.
"""

from __future__ import annotations

import os

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FormatError

_NORMALS = ("normal_x", "normal_y", "normal_z")
_MAX_HEADER = 1 << 16


def lzf_decompress(src: bytes, size: int) -> bytes:
    """Decompress an LZF stream to exactly ``size`` bytes (raises ``ValueError`` if corrupt)."""
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        i += 1
        if c < 32:
            run = c + 1
            if i + run > n:
                raise ValueError("literal run past the end of the input")
            out += src[i:i + run]
            i += run
        else:
            length = c >> 5
            if length == 7:
                if i >= n:
                    raise ValueError("back-reference past the end of the input")
                length += src[i]
                i += 1
            if i >= n:
                raise ValueError("back-reference past the end of the input")
            ref = len(out) - ((c & 0x1F) << 8) - src[i] - 1
            i += 1
            length += 2
            if ref < 0:
                raise ValueError("back-reference before the start of the output")
            if ref + length <= len(out):
                out += out[ref:ref + length]
            else:  # overlapping copy: repeat the period
                period = out[ref:]
                while length > 0:
                    take = period[:length]
                    out += take
                    length -= len(take)
                    period = period + take
        if len(out) > size:
            raise ValueError("output larger than declared")
    if len(out) != size:
        raise ValueError(f"decompressed {len(out)} bytes, header says {size}")
    return bytes(out)


def _parse_header(data: bytes, path: str) -> tuple[dict[str, list[str]], int]:
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0 or pos > _MAX_HEADER:
            raise FormatError("PCD header has no DATA line", path=path)
        line = data[pos:nl].decode("latin-1").strip()
        pos = nl + 1
        if not line or line.startswith("#"):
            continue
        key, *vals = line.split()
        header[key.upper()] = vals
        if key.upper() == "DATA":
            return header, pos


def read_pcd(path: str | os.PathLike) -> PointCloud:
    """Read a PCD file (v0.5 to v0.7)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if not (data.startswith(b"#") or data.startswith(b"VERSION") or data.startswith(b"FIELDS")):
        raise FormatError("not a PCD file", path=path)
    h, offset = _parse_header(data, path)
    try:
        fields = h["FIELDS"]
        sizes = [int(s) for s in h.get("SIZE", ["4"] * len(fields))]
        types = [t.upper() for t in h.get("TYPE", ["F"] * len(fields))]
        counts = [int(c) for c in h.get("COUNT", ["1"] * len(fields))]
        if "POINTS" in h:
            npts = int(h["POINTS"][0])
        else:
            npts = int(h["WIDTH"][0]) * int(h.get("HEIGHT", ["1"])[0])
        mode = h["DATA"][0].lower()
        kinds = {"F": "f", "I": "i", "U": "u"}
        dtypes = [np.dtype(kinds[t] + str(s)) for t, s in zip(types, sizes, strict=False)]
    except (KeyError, ValueError, IndexError, TypeError):
        raise FormatError("bad PCD header (FIELDS/SIZE/TYPE/COUNT/POINTS)", path=path) from None
    if not (len(fields) == len(sizes) == len(types) == len(counts)) or npts < 0 or min(counts) < 1:
        raise FormatError("PCD header: FIELDS, SIZE, TYPE and COUNT disagree", path=path)
    cols: dict[str, np.ndarray] = {}
    row_bytes = sum(dt.itemsize * c for dt, c in zip(dtypes, counts, strict=False))
    if mode == "ascii":
        text = data[offset:].decode("latin-1").split()
        ncol = sum(counts)
        if len(text) < npts * ncol:
            raise FormatError(f"truncated: header declares {npts} points, fewer rows follow",
                              path=path)
        if len(text) > npts * ncol:
            raise FormatError("header does not match the data: more values than POINTS",
                              path=path)
        try:
            table = np.array(text, dtype=np.float64).reshape(npts, ncol)
        except ValueError:
            raise FormatError("non-numeric value in PCD data", path=path) from None
        j = 0
        for name, dt, c in zip(fields, dtypes, counts, strict=False):
            cols[name] = table[:, j:j + c].astype(dt).reshape(npts, c) if c > 1 else \
                table[:, j].astype(dt)
            j += c
    elif mode == "binary":
        need = npts * row_bytes
        if len(data) - offset < need:
            raise FormatError(f"truncated: header declares {npts} points ({need} bytes), "
                              f"{len(data) - offset} bytes follow", path=path)
        dt = np.dtype([(f"f{i}", "<" + d.str[1:], (c,)) for i, (d, c) in
                       enumerate(zip(dtypes, counts, strict=False))])
        rows = np.frombuffer(data, dt, npts, offset)
        for i, (name, c) in enumerate(zip(fields, counts, strict=False)):
            v = np.ascontiguousarray(rows[f"f{i}"])
            cols[name] = v if c > 1 else v[:, 0]
    elif mode == "binary_compressed":
        if len(data) - offset < 8:
            raise FormatError("truncated compressed PCD block", path=path)
        csize, usize = np.frombuffer(data, "<u4", 2, offset)
        if usize != npts * row_bytes:
            raise FormatError("header does not match the data: uncompressed size "
                              f"{usize} != {npts} points x {row_bytes} bytes", path=path)
        if offset + 8 + int(csize) > len(data):
            raise FormatError("truncated compressed PCD block", path=path)
        try:
            raw = lzf_decompress(data[offset + 8:offset + 8 + int(csize)], int(usize))
        except ValueError as e:
            raise FormatError(f"corrupt compressed PCD data ({e})", path=path) from None
        pos = 0
        for name, d, c in zip(fields, dtypes, counts, strict=False):  # column-major blocks
            n_bytes = npts * d.itemsize * c
            v = np.frombuffer(raw, "<" + d.str[1:], npts * c, pos).reshape(npts, c)
            pos += n_bytes
            cols[name] = v.copy() if c > 1 else v[:, 0].copy()
    else:
        raise FormatError(f"unknown PCD DATA mode {mode!r}", path=path)
    for c in "xyz":
        if c not in cols:
            raise FormatError(f"PCD has no '{c}' field", path=path)
    pdt = np.float64 if any(cols[c].dtype == np.float64 for c in "xyz") else np.float32
    points = np.stack([cols.pop(c).astype(pdt) for c in "xyz"], 1)
    normals = None
    if all(n in cols for n in _NORMALS):
        normals = np.stack([cols.pop(n) for n in _NORMALS], 1)
    attrs = {k: v for k, v in cols.items() if k != "_"}
    viewpoint = None
    if "VIEWPOINT" in h and len(h["VIEWPOINT"]) >= 3:
        try:
            viewpoint = np.array([float(v) for v in h["VIEWPOINT"][:3]])
        except ValueError:
            viewpoint = None
    return PointCloud(points=points, normals=normals, attributes=attrs, viewpoint=viewpoint)


def write_pcd(path: str | os.PathLike, cloud: PointCloud, *, ascii: bool = False) -> None:
    """Write ``cloud`` as PCD v0.7 (``DATA binary`` unless ``ascii``)."""
    cols: list[tuple[str, np.ndarray]] = [(c, cloud.points[:, i]) for i, c in enumerate("xyz")]
    if cloud.normals is not None:
        cols += [(c, cloud.normals[:, i]) for i, c in enumerate(_NORMALS)]
    cols += list(cloud.attributes.items())
    fixed = []
    for name, a in cols:
        if a.dtype.kind == "b":
            a = a.astype(np.uint8)
        if a.dtype.kind not in "iuf":
            raise ValueError(f"attribute {name!r} has dtype {a.dtype}, which PCD cannot hold")
        fixed.append((name, a))
    n = len(cloud)
    vp = cloud.viewpoint if cloud.viewpoint is not None else np.zeros(3)
    header = [
        "# .PCD v0.7 - Point Cloud Data file format (written by fapc)",
        "VERSION 0.7",
        "FIELDS " + " ".join(name for name, _ in fixed),
        "SIZE " + " ".join(str(a.dtype.itemsize) for _, a in fixed),
        "TYPE " + " ".join({"f": "F", "i": "I", "u": "U"}[a.dtype.kind] for _, a in fixed),
        "COUNT " + " ".join(str(1 if a.ndim == 1 else a.shape[1]) for _, a in fixed),
        f"WIDTH {n}",
        "HEIGHT 1",
        "VIEWPOINT {} {} {} 1 0 0 0".format(*(repr(float(v)) for v in vp)),
        f"POINTS {n}",
        f"DATA {'ascii' if ascii else 'binary'}",
    ]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if ascii:
            parts, fmts = [], []
            for _, a in fixed:
                a2 = a.reshape(n, -1)
                parts.append(a2.astype(object))
                f_ = "%d" if a.dtype.kind in "iu" else ("%.9g" if a.dtype.itemsize <= 4 else "%.17g")
                fmts += [f_] * a2.shape[1]
            if n:
                np.savetxt(f, np.concatenate(parts, 1), fmt=fmts)
        else:
            dt = np.dtype([(f"f{i}", "<" + a.dtype.str[1:], (1 if a.ndim == 1 else a.shape[1],))
                           for i, (_, a) in enumerate(fixed)])
            rows = np.empty(n, dt)
            for i, (_, a) in enumerate(fixed):
                rows[f"f{i}"] = a.reshape(n, -1)
            f.write(rows.tobytes())
