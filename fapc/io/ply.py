"""PLY reader and writer (ascii, binary little and big endian), any vertex properties.

Every vertex property is kept by name and dtype; ``x y z`` become the points and
``nx ny nz`` the normals. A ``face`` element with a ``vertex_indices`` list gives
triangles (polygons are fanned); other elements (e.g. ``range_grid``) are read past.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FormatError

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int",
          "u4": "uint", "f4": "float", "f8": "double"}
_MAX_HEADER = 1 << 20
_NORMAL_NAMES = ("nx", "ny", "nz")


@dataclass
class _Prop:
    name: str
    dtype: str  # numpy code without byte order, e.g. "f4"
    count_dtype: str | None = None  # set for list properties


@dataclass
class _Element:
    name: str
    count: int
    props: list[_Prop]


def _parse_header(data: bytes, path: str) -> tuple[str, list[_Element], int]:
    if not data.startswith(b"ply"):
        raise FormatError("not a PLY file (no 'ply' magic)", path=path)
    end = data.find(b"end_header", 0, _MAX_HEADER)
    if end < 0:
        raise FormatError("PLY header has no end_header", path=path)
    nl = data.find(b"\n", end)
    body = len(data) if nl < 0 else nl + 1
    fmt = None
    elements: list[_Element] = []
    for raw in data[:end].decode("latin-1").splitlines()[1:]:
        tok = raw.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        try:
            if tok[0] == "format":
                fmt = tok[1]
            elif tok[0] == "element":
                count = int(tok[2])
                if count < 0:
                    raise ValueError
                elements.append(_Element(tok[1], count, []))
            elif tok[0] == "property":
                if not elements:
                    raise ValueError
                if tok[1] == "list":
                    elements[-1].props.append(_Prop(tok[4], _TYPES[tok[3]], _TYPES[tok[2]]))
                else:
                    elements[-1].props.append(_Prop(tok[2], _TYPES[tok[1]]))
            else:
                raise ValueError
        except (ValueError, IndexError, KeyError):
            raise FormatError(f"bad PLY header line {raw.strip()!r}", path=path) from None
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise FormatError(f"unknown PLY format {fmt!r}", path=path)
    return fmt, elements, body


def _binary_element(
    data: bytes, offset: int, el: _Element, order: str, path: str
) -> tuple[np.ndarray | None, list[np.ndarray] | None, int]:
    """Read one binary element; returns (structured rows or None, list rows or None, new offset)."""
    remaining = len(data) - offset
    lists = [p for p in el.props if p.count_dtype is not None]
    if not lists:
        dt = np.dtype([(p.name, order + p.dtype) for p in el.props])
        need = dt.itemsize * el.count
        if need > remaining:
            raise FormatError(
                f"truncated: header declares {el.count} {el.name} rows "
                f"({need} bytes) but only {remaining} bytes follow", path=path)
        return np.frombuffer(data, dt, el.count, offset), None, offset + need
    if el.count == 0:
        return None, [np.zeros((0, 0), np.int64)], offset
    # Fast path: every list has the length found in the first row (triangles, usually).
    first_counts = []
    off = offset
    try:
        for p in el.props:
            if p.count_dtype is not None:
                c = int(np.frombuffer(data, order + p.count_dtype, 1, off)[0])
                first_counts.append(c)
                off += np.dtype(p.count_dtype).itemsize + c * np.dtype(p.dtype).itemsize
            else:
                off += np.dtype(p.dtype).itemsize
    except ValueError:
        raise FormatError(f"truncated in the {el.name} element", path=path) from None
    fields = []
    it = iter(first_counts)
    for i, p in enumerate(el.props):
        if p.count_dtype is not None:
            c = next(it)
            fields.append((f"_n{i}", order + p.count_dtype))
            fields.append((f"_l{i}", order + p.dtype, (c,)))
        else:
            fields.append((f"_s{i}", order + p.dtype))
    dt = np.dtype(fields)
    if dt.itemsize * el.count <= remaining:
        rows = np.frombuffer(data, dt, el.count, offset)
        ok = all(
            np.all(rows[f"_n{i}"] == c)
            for (i, p), c in zip(
                [(i, p) for i, p in enumerate(el.props) if p.count_dtype is not None],
                first_counts, strict=False,
            )
        )
        if ok:
            li = next(i for i, p in enumerate(el.props) if p.count_dtype is not None)
            return None, [np.asarray(rows[f"_l{li}"], np.int64)], offset + dt.itemsize * el.count
    # Slow path: variable-length lists, one row at a time (bounded by the bytes present).
    out: list[np.ndarray] = []
    off = offset
    for _ in range(el.count):
        first_list = None
        for p in el.props:
            if p.count_dtype is not None:
                cs = np.dtype(p.count_dtype).itemsize
                if off + cs > len(data):
                    raise FormatError(f"truncated in the {el.name} element", path=path)
                c = int(np.frombuffer(data, order + p.count_dtype, 1, off)[0])
                off += cs
                size = c * np.dtype(p.dtype).itemsize
                if c < 0 or off + size > len(data):
                    raise FormatError(f"truncated in the {el.name} element", path=path)
                if first_list is None:
                    first_list = np.frombuffer(data, order + p.dtype, c, off).astype(np.int64)
                off += size
            else:
                off += np.dtype(p.dtype).itemsize
        out.append(first_list if first_list is not None else np.zeros(0, np.int64))
    if off > len(data):
        raise FormatError(f"truncated in the {el.name} element", path=path)
    return None, out, off


def _polygons_to_triangles(polys: list[np.ndarray] | np.ndarray) -> np.ndarray:
    if isinstance(polys, np.ndarray) or (len(polys) == 1 and np.asarray(polys[0]).ndim == 2):
        arr = np.asarray(polys if isinstance(polys, np.ndarray) else polys[0])
        if arr.ndim == 2 and arr.shape[1] >= 3:
            tris = [arr[:, [0, i, i + 1]] for i in range(1, arr.shape[1] - 1)]
            return np.concatenate(tris).astype(np.int64)
        return np.zeros((0, 3), np.int64)
    tris = [np.stack([np.full(len(p) - 2, p[0]), p[1:-1], p[2:]], 1) for p in polys if len(p) >= 3]
    return np.concatenate(tris).astype(np.int64) if tris else np.zeros((0, 3), np.int64)


def _split_vertex(rows: np.ndarray, props: list[_Prop], path: str) -> PointCloud:
    names = [p.name for p in props]
    for c in ("x", "y", "z"):
        if c not in names:
            raise FormatError(f"PLY vertex element has no '{c}' property", path=path)
    xyz_types = {rows.dtype[c].kind + str(rows.dtype[c].itemsize) for c in "xyz"}
    pdt = np.float64 if "f8" in xyz_types or not xyz_types <= {"f4"} else np.float32
    points = np.stack([rows[c].astype(pdt) for c in "xyz"], 1)
    normals = None
    if all(n in names for n in _NORMAL_NAMES):
        normals = np.stack([rows[n] for n in _NORMAL_NAMES], 1).astype(
            np.result_type(*[rows.dtype[n] for n in _NORMAL_NAMES]))
    skip = {"x", "y", "z"} | (set(_NORMAL_NAMES) if normals is not None else set())
    attrs = {p.name: np.ascontiguousarray(rows[p.name]).astype(rows.dtype[p.name].newbyteorder("="))
             for p in props if p.name not in skip}
    return PointCloud(points=points, normals=normals, attributes=attrs)


def read_ply(path: str | os.PathLike) -> PointCloud:
    """Read a PLY file. Points ``(N, 3)`` keep float32/float64 as stored."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    fmt, elements, offset = _parse_header(data, path)
    vertex = next((e for e in elements if e.name == "vertex"), None)
    if vertex is None:
        raise FormatError("PLY file has no vertex element", path=path)
    if any(p.count_dtype is not None for p in vertex.props):
        raise FormatError("list properties on vertices are not supported", path=path)
    cloud = None
    faces = None
    if fmt == "ascii":
        cloud, faces = _read_ascii_body(data, offset, elements, vertex, path)
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        for el in elements:
            rows, lists, offset = _binary_element(data, offset, el, order, path)
            if el is vertex:
                cloud = _split_vertex(rows, el.props, path)
            elif el.name == "face" and lists is not None:
                faces = _polygons_to_triangles(lists)
        trailing = data[offset:]
        if trailing.strip():
            raise FormatError(
                f"header does not match the data: {len(trailing)} bytes follow the "
                f"declared elements", path=path)
    assert cloud is not None
    if faces is not None and len(faces):
        if faces.min() < 0 or faces.max() >= len(cloud):
            raise FormatError("face indices out of range", path=path)
        cloud.faces = faces
    return cloud


def _read_ascii_body(data, offset, elements, vertex, path):
    lines = data[offset:].decode("latin-1").splitlines()
    lines = [ln for ln in lines if ln.strip()]
    pos = 0
    cloud = None
    faces = None
    for el in elements:
        if pos + el.count > len(lines):
            raise FormatError(
                f"truncated: header declares {el.count} {el.name} rows but only "
                f"{len(lines) - pos} lines remain", path=path)
        chunk = lines[pos:pos + el.count]
        pos += el.count
        if el is vertex:
            tokens = " ".join(chunk).split()
            if len(tokens) != el.count * len(el.props):
                raise FormatError(
                    f"vertex rows do not match the header's {len(el.props)} properties",
                    path=path)
            try:
                table = np.array(tokens, dtype=np.float64).reshape(el.count, len(el.props))
            except ValueError:
                raise FormatError("non-numeric value in vertex data", path=path) from None
            dt = np.dtype([(p.name, p.dtype) for p in el.props])
            rows = np.empty(el.count, dt)
            for i, p in enumerate(el.props):
                rows[p.name] = table[:, i]
            cloud = _split_vertex(rows, el.props, path)
        elif el.name == "face" and el.props and el.props[0].count_dtype is not None:
            polys = []
            for ln in chunk:
                try:
                    vals = [int(float(t)) for t in ln.split()]
                except ValueError:
                    raise FormatError("non-numeric value in face data", path=path) from None
                if not vals or len(vals) < vals[0] + 1:
                    raise FormatError("face row shorter than its count", path=path)
                polys.append(np.asarray(vals[1:vals[0] + 1], np.int64))
            faces = _polygons_to_triangles(polys)
    if pos != len(lines):
        raise FormatError(
            f"header does not match the data: {len(lines) - pos} rows follow the declared "
            f"elements", path=path)
    return cloud, faces


def _vertex_table(cloud: PointCloud) -> list[tuple[str, np.ndarray]]:
    cols: list[tuple[str, np.ndarray]] = [(c, cloud.points[:, i]) for i, c in enumerate("xyz")]
    if cloud.normals is not None:
        cols += [(c, cloud.normals[:, i]) for i, c in enumerate(_NORMAL_NAMES)]
    for name, arr in cloud.attributes.items():
        if arr.ndim == 1:
            cols.append((name, arr))
        else:
            cols += [(f"{name}_{j}", arr[:, j]) for j in range(arr.shape[1])]
    out = []
    for name, arr in cols:
        if arr.dtype.kind == "b":
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind not in "iuf" or arr.dtype.itemsize > 8:
            raise ValueError(f"attribute {name!r} has dtype {arr.dtype}, which PLY cannot hold")
        elif arr.dtype.itemsize == 8 and arr.dtype.kind in "iu":
            arr = arr.astype(arr.dtype.kind + "4")  # PLY has no 64-bit integers
        elif arr.dtype.itemsize == 2 and arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        out.append((name, arr))
    return out


def write_ply(path: str | os.PathLike, cloud: PointCloud, *, ascii: bool = False) -> None:
    """Write ``cloud`` as PLY (binary little endian unless ``ascii``); faces are written too."""
    cols = _vertex_table(cloud)
    n = len(cloud)
    fmt = "ascii" if ascii else "binary_little_endian"
    header = ["ply", f"format {fmt} 1.0", "comment written by fapc", f"element vertex {n}"]
    header += [f"property {_NAMES[a.dtype.kind + str(a.dtype.itemsize)]} {name}" for name, a in cols]
    faces = cloud.faces if cloud.faces is not None and len(cloud.faces) else None
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if ascii:
            fmts = [_ascii_fmt(a.dtype) for _, a in cols]
            table = np.empty((n, len(cols)), dtype=object) if n else None
            if n:
                for j, (_, a) in enumerate(cols):
                    table[:, j] = a
                np.savetxt(f, table, fmt=fmts)
            if faces is not None:
                np.savetxt(f, np.column_stack([np.full(len(faces), 3), faces]), fmt="%d")
        else:
            dt = np.dtype([(name, "<" + a.dtype.kind + str(a.dtype.itemsize)) for name, a in cols])
            rows = np.empty(n, dt)
            for name, a in cols:
                rows[name] = a
            f.write(rows.tobytes())
            if faces is not None:
                fdt = np.dtype([("n", "u1"), ("v", "<i4", (3,))])
                frows = np.empty(len(faces), fdt)
                frows["n"] = 3
                frows["v"] = faces
                f.write(frows.tobytes())


def _ascii_fmt(dtype: np.dtype) -> str:
    if dtype.kind in "iu":
        return "%d"
    return "%.9g" if dtype.itemsize <= 4 else "%.17g"
