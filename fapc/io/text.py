"""Text formats: XYZ, XYZN, PTS, TXT, CSV (whitespace, comma or semicolon separated).

Header lines are tolerated: a leading line of names (``x y z nx ny nz intensity``, with or
without ``#`` or ``//``) names the columns; a PTS count line is skipped. Without names, the
columns are ``x y z``, then normals when the file is ``.xyzn`` (or the next three columns
are unit vectors), then PTS's ``intensity red green blue``, else ``scalar_<j>``.
"""

from __future__ import annotations

import os
import re

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FormatError

_MAX_HEADER_LINES = 64
_NUM = re.compile(r"^[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|nan|inf|infinity)$",
                  re.IGNORECASE)
_NORMAL_ALIASES = {"nx": 0, "ny": 1, "nz": 2, "normal_x": 0, "normal_y": 1, "normal_z": 2}


def _is_numeric_line(tokens: list[str]) -> bool:
    return bool(tokens) and all(_NUM.match(t) for t in tokens)


def read_text(path: str | os.PathLike) -> PointCloud:
    """Read a whitespace-, comma- or semicolon-separated point table (positions as float64;
    with semicolons, a comma is read as the decimal mark)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw[:4096]:
        raise FormatError("binary data in a text point file", path=path)
    text = raw.decode("latin-1")
    if any(";" in ln for ln in text[:4096].splitlines() if not ln.lstrip().startswith(("#", "/"))):
        # semicolon-separated, as spreadsheets in comma-decimal locales write them
        text = text.replace(",", ".").replace(";", " ")  # "1,5;2,0" -> "1.5 2.0"
    sep_comma = "," in text[:4096]
    lines = text.splitlines()
    names: list[str] | None = None
    start = 0
    for i, line in enumerate(lines[:_MAX_HEADER_LINES]):
        s = line.strip()
        if not s:
            start = i + 1
            continue
        toks = s.replace(",", " ").split()
        if _is_numeric_line(toks) and not (ext == ".pts" and i == 0 and len(toks) == 1):
            break
        stripped = s.lstrip("#/").replace(",", " ").split()
        if stripped and all(re.match(r"^[A-Za-z_][\w.]*$", t) for t in stripped):
            names = [t.lower() for t in stripped]
        start = i + 1
    else:
        if len(lines) > _MAX_HEADER_LINES:
            raise FormatError("no numeric rows in the first lines", path=path)
    body = "\n".join(lines[start:])
    if sep_comma:
        body = body.replace(",", " ")
    first = next((ln.replace(",", " ").split() for ln in lines[start:] if ln.strip()), None)
    if first is None:
        raise FormatError("no points in the file", path=path)
    ncol = len(first)
    tokens = body.split()
    if ncol < 3:
        raise FormatError(f"rows have {ncol} columns, need at least x y z", path=path)
    if len(tokens) % ncol:
        raise FormatError(f"ragged rows: {len(tokens)} values are not a multiple of {ncol} "
                          "columns", path=path)
    try:
        table = np.array(tokens, dtype=np.float64).reshape(-1, ncol)
    except ValueError:
        raise FormatError("non-numeric value in the point rows", path=path) from None
    if names is not None and len(names) != ncol:
        names = None
    return _table_to_cloud(table, names, ext)


def _table_to_cloud(table: np.ndarray, names: list[str] | None, ext: str) -> PointCloud:
    ncol = table.shape[1]
    if names is not None and all(c in names for c in "xyz"):
        pts = table[:, [names.index(c) for c in "xyz"]]
        used = {names.index(c) for c in "xyz"}
        nidx = [next((j for j, nm in enumerate(names) if _NORMAL_ALIASES.get(nm) == a), None)
                for a in range(3)]
        normals = None
        if all(j is not None for j in nidx):
            normals = table[:, nidx]
            used |= set(nidx)
        attrs = {names[j]: table[:, j].copy() for j in range(ncol) if j not in used}
        return PointCloud(points=pts, normals=normals, attributes=attrs)
    pts = table[:, :3]
    rest = 3
    normals = None
    if ncol >= 6:
        cand = table[:, 3:6]
        unit = np.abs(np.linalg.norm(cand, axis=1) - 1) < 1e-3
        if ext == ".xyzn" or (ext != ".pts" and len(cand) and unit.mean() > 0.99):
            normals, rest = cand, 6
    extra = table[:, rest:]
    attrs: dict[str, np.ndarray] = {}
    pts_names = ["intensity", "red", "green", "blue"] if ext == ".pts" else []
    for j in range(extra.shape[1]):
        name = pts_names[j] if j < len(pts_names) and extra.shape[1] in (1, 4) else f"scalar_{j}"
        attrs[name] = extra[:, j].copy()
    return PointCloud(points=np.ascontiguousarray(pts), normals=normals, attributes=attrs)


def write_text(path: str | os.PathLike, cloud: PointCloud) -> None:
    """Write ``x y z [nx ny nz] attributes...``; a header names the columns when any
    attribute follows the normals (``.csv``: always, comma separated)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    names = ["x", "y", "z"]
    cols = [cloud.points]
    fmts = [_fmt(cloud.points.dtype)] * 3
    if cloud.normals is not None:
        names += ["nx", "ny", "nz"]
        cols.append(cloud.normals)
        fmts += [_fmt(cloud.normals.dtype)] * 3
    for name, a in cloud.attributes.items():
        a2 = a.reshape(len(cloud), -1)
        names += [name] if a.ndim == 1 else [f"{name}_{j}" for j in range(a2.shape[1])]
        cols.append(a2)
        fmts += [_fmt(a.dtype)] * a2.shape[1]
    delim = "," if ext == ".csv" else " "
    header = ""
    if ext == ".csv":
        header = ",".join(names)
    elif cloud.attributes:
        header = "# " + " ".join(names)
    table = np.concatenate([c.astype(object) for c in cols], 1) if len(cloud) else \
        np.zeros((0, len(names)))
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        np.savetxt(f, table, fmt=fmts, delimiter=delim)


def _fmt(dtype: np.dtype) -> str:
    if dtype.kind in "iub":
        return "%d"
    return "%.9g" if dtype.itemsize <= 4 else "%.17g"
