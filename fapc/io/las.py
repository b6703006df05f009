"""LAS and LAZ reader and writer (LAS 1.0 to 1.4, point formats 0 to 10), every field kept.

Reading: positions are the stored integers times the header's scale plus its offset, in
float64, so georeferenced coordinates keep the file's precision. Each standard field becomes
an attribute (lower-case names: ``intensity``, ``return_number``, ``number_of_returns``,
``classification``, ``synthetic``, ``key_point``, ``withheld``, ``overlap``,
``scanner_channel``, ``scan_direction_flag``, ``edge_of_flight_line``, ``scan_angle_rank`` or
``scan_angle``, ``user_data``, ``point_source_id``, ``gps_time``, ``red``, ``green``, ``blue``,
``nir`` and the waveform packet's fields). Extra bytes described by the Extra Bytes VLR become
attributes under their names (scaled and offset where the descriptor says; members named
``name[0]``, ``name[1]`` ... join into one ``(N, C)`` attribute); extra bytes named
``NormalX NormalY NormalZ`` (also ``normal_x ...`` or ``nx ny nz``) become the normals. The
point format, scale, offset and the (E)VLRs, a coordinate system among them, are kept in
``cloud.metadata["las"]``.

Writing (always LAS 1.4): a cloud read from LAS keeps its point format, scale, offset and
records, so a scan comes back with the same integers and coordinate system, plus the new
fields; any other cloud gets point format 6 (7 when it has ``red green blue``; 8-bit colours
are widened to LAS's 16 bits) and, per axis, a power-of-ten scale fine enough for its extent.
Normals are written as extra bytes ``NormalX NormalY NormalZ``; every attribute that is not a
standard field of the point format becomes extra bytes of its own type, and so does one whose
values do not fit its field (a float ``intensity``, a ``classification`` past 255: read back,
it comes as ``intensity_extra``, beside the standard field left at 0).

LAZ (compressed LAS, ``.laz``) is read and written through ``lazrs`` (a binding of the LASzip
codec in Rust): it decompresses the points into the same records, which this module then
reads, and compresses the records this module lays out.
"""

from __future__ import annotations

import datetime
import os
import struct
from typing import Any

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FapcError, FormatError
from fapc.io import laz
from fapc.io.las_extra import TYPE_CODES, cstr, decode_extra, descriptor, extra_fields, pad, unique_names

_HEADER_FMT = "<4sHH16sBB32s32sHHHIIBHI5I12d"  # the 227 bytes every version has
_HEADER_SIZE_14 = 375
_VLR_FMT = "<H16sHH32s"  # 54 bytes
_EVLR_FMT = "<H16sHQ32s"  # 60 bytes
_NORMAL_NAMES = (("normalx", "normaly", "normalz"), ("normal_x", "normal_y", "normal_z"),
                 ("nx", "ny", "nz"))

_XYZ = [("X", "<i4"), ("Y", "<i4"), ("Z", "<i4")]
_LEGACY = _XYZ + [("intensity", "<u2"), ("_bits", "u1"), ("_class", "u1"),
                  ("scan_angle_rank", "i1"), ("user_data", "u1"), ("point_source_id", "<u2")]
_EXTENDED = _XYZ + [("intensity", "<u2"), ("_returns", "u1"), ("_flags", "u1"),
                    ("classification", "u1"), ("user_data", "u1"), ("scan_angle", "<i2"),
                    ("point_source_id", "<u2"), ("gps_time", "<f8")]
_GPS = [("gps_time", "<f8")]
_RGB = [("red", "<u2"), ("green", "<u2"), ("blue", "<u2")]
_NIR = [("nir", "<u2")]
_WAVE = [("wavepacket_index", "u1"), ("wavepacket_offset", "<u8"), ("wavepacket_size", "<u4"),
         ("return_point_wave_location", "<f4"), ("x_t", "<f4"), ("y_t", "<f4"), ("z_t", "<f4")]
POINT_FIELDS: dict[int, list[tuple[str, str]]] = {
    0: _LEGACY, 1: _LEGACY + _GPS, 2: _LEGACY + _RGB, 3: _LEGACY + _GPS + _RGB,
    4: _LEGACY + _GPS + _WAVE, 5: _LEGACY + _GPS + _RGB + _WAVE,
    6: _EXTENDED, 7: _EXTENDED + _RGB, 8: _EXTENDED + _RGB + _NIR,
    9: _EXTENDED + _WAVE, 10: _EXTENDED + _RGB + _NIR + _WAVE,
}
# bit fields: (attribute, packed field, shift, bits) per family
_LEGACY_BITS = [("return_number", "_bits", 0, 3), ("number_of_returns", "_bits", 3, 3),
                ("scan_direction_flag", "_bits", 6, 1), ("edge_of_flight_line", "_bits", 7, 1),
                ("classification", "_class", 0, 5), ("synthetic", "_class", 5, 1),
                ("key_point", "_class", 6, 1), ("withheld", "_class", 7, 1)]
_EXTENDED_BITS = [("return_number", "_returns", 0, 4), ("number_of_returns", "_returns", 4, 4),
                  ("synthetic", "_flags", 0, 1), ("key_point", "_flags", 1, 1),
                  ("withheld", "_flags", 2, 1), ("overlap", "_flags", 3, 1),
                  ("scanner_channel", "_flags", 4, 2), ("scan_direction_flag", "_flags", 6, 1),
                  ("edge_of_flight_line", "_flags", 7, 1)]


# names no extra-bytes field may take (readers such as laspy refuse a file where they meet)
_RESERVED = {"x", "y", "z"} | {n.lower() for f in POINT_FIELDS.values() for n, _ in f} | \
    {b[0] for b in _LEGACY_BITS + _EXTENDED_BITS}


def _bits(fmt: int) -> list[tuple[str, str, int, int]]:
    return _LEGACY_BITS if fmt < 6 else _EXTENDED_BITS


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """A summary of ``cloud.metadata["las"]`` for people: point format, scale, offset, and
    the coordinate system's kind (``"WKT"``, ``"GeoTIFF"`` or None) by its records."""
    kinds = {2112: "WKT", 34735: "GeoTIFF"}
    crs = next((kinds[r[1]] for r in meta.get("records", [])
                if r[0] == "LASF_Projection" and r[1] in kinds), None)
    return {"point_format": int(meta["point_format"]),
            "scale": [float(v) for v in meta["scale"]],
            "offset": [float(v) for v in meta["offset"]], "crs": crs}


def read_las(path: str | os.PathLike) -> PointCloud:
    """Read a LAS or LAZ file (see the module's docstring)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"LASF"):
        raise FormatError("not a LAS file (no LASF signature)", path=path)
    if len(data) < 227:
        raise FormatError("truncated LAS header", path=path)
    h = struct.unpack_from(_HEADER_FMT, data, 0)
    (_, _, global_encoding, _, major, minor, _, _, _, _, header_size, point_offset, n_vlrs,
     fmt_id, rec_len, legacy_count) = h[:16]
    scale, offset = np.array(h[21:24]), np.array(h[24:27])
    compressed = bool(fmt_id & 0x80)
    fmt = fmt_id & 0x3F
    if fmt not in POINT_FIELDS:
        raise FormatError(f"unknown LAS point format {fmt}", path=path)
    count = legacy_count
    if (major, minor) >= (1, 4) and header_size >= _HEADER_SIZE_14 and len(data) >= 375:
        evlr_start, n_evlrs, count = struct.unpack_from("<QIQ", data, 235)
    else:
        evlr_start, n_evlrs = 0, 0
    if not np.all(np.isfinite(scale)) or np.any(scale == 0) or not np.all(np.isfinite(offset)):
        raise FormatError("LAS header has a zero or non-finite scale or offset", path=path)
    base = np.dtype(POINT_FIELDS[fmt]).itemsize
    if rec_len < base:
        raise FormatError(f"LAS point record length {rec_len} is shorter than point format "
                          f"{fmt}'s {base} bytes", path=path)
    if header_size < 227 or point_offset < header_size or point_offset > len(data):
        raise FormatError("bad LAS header (header size or offset to the points)", path=path)
    stored = len(data) - point_offset
    if count * rec_len > (stored * laz.LAZ_RATIO if compressed else stored):
        raise FormatError(f"truncated: the header declares {count} points "
                          f"({count * rec_len} bytes), {stored} bytes follow", path=path)
    records = []  # (user_id, record_id, description, payload, extended)
    pos = header_size
    for _ in range(n_vlrs):
        if pos + 54 > point_offset:
            raise FormatError("LAS variable-length records run into the point data", path=path)
        _, user, rid, length, desc = struct.unpack_from(_VLR_FMT, data, pos)
        if pos + 54 + length > point_offset:
            raise FormatError("LAS variable-length records run into the point data", path=path)
        records.append((cstr(user), rid, cstr(desc), data[pos + 54:pos + 54 + length], False))
        pos += 54 + length
    if n_evlrs and evlr_start >= point_offset + (0 if compressed else count * rec_len):
        pos = evlr_start
        for _ in range(n_evlrs):
            if pos + 60 > len(data):
                break  # a damaged tail: the points are still good
            _, user, rid, length, desc = struct.unpack_from(_EVLR_FMT, data, pos)
            if pos + 60 + length > len(data):
                break
            records.append((cstr(user), rid, cstr(desc), data[pos + 60:pos + 60 + length],
                            True))
            pos += 60 + length
    extra = extra_fields(records, rec_len - base, base)
    std = np.dtype(POINT_FIELDS[fmt])
    names = list(std.names) + [e[0] for e in extra]
    formats = [std.fields[n][0] for n in std.names] + [e[1] for e in extra]
    offsets = [std.fields[n][1] for n in std.names] + [e[2] for e in extra]
    dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": rec_len})
    if compressed:
        laszip = next((r for r in records if (r[0], r[1]) == laz.LASZIP), None)
        if laszip is None:
            raise FormatError("LAZ file without its LASzip record", path=path)
        buf, start = laz.decompress(data, point_offset, laszip[3], count, rec_len, path), 0
    else:
        buf, start = data, point_offset
    rows = np.frombuffer(buf, dt, count, start)
    points = np.stack([rows[c].astype(np.float64) * scale[i] + offset[i]
                       for i, c in enumerate("XYZ")], 1)
    attrs: dict[str, np.ndarray] = {}
    for name, packed, shift, nbits in _bits(fmt):
        attrs[name] = ((rows[packed] >> shift) & ((1 << nbits) - 1)).astype(np.uint8)
    for name, _ in POINT_FIELDS[fmt][3:]:
        if not name.startswith("_"):
            attrs[name] = rows[name].astype(rows.dtype[name].newbyteorder("="))
    extras = decode_extra(rows, extra)
    normals = None
    lower = {k.lower(): k for k in extras}
    for trio in _NORMAL_NAMES:
        if all(t in lower for t in trio):
            normals = np.stack([extras.pop(lower[t]) for t in trio], 1)
            break
    for name, arr in extras.items():
        key = name
        while key in attrs:
            key += "_extra"
        attrs[key] = arr
    kept = [r for r in records if (r[0], r[1]) not in (("LASF_Spec", 4), laz.LASZIP)]
    meta = {"point_format": fmt, "scale": scale, "offset": offset,
            "global_encoding": global_encoding, "records": kept}
    return PointCloud(points=points, normals=normals, attributes=attrs, metadata={"las": meta})


def write_las(path: str | os.PathLike, cloud: PointCloud, *, compress: bool = False) -> None:
    """Write ``cloud`` as LAS 1.4, or LAZ with ``compress`` (see the module's docstring)."""
    path = os.fspath(path)
    pts = np.asarray(cloud.points, np.float64)
    if not np.isfinite(pts).all():
        raise FapcError("LAS cannot store NaN/inf coordinates (use --drop-invalid)", path=path)
    n = len(pts)
    meta: dict[str, Any] = dict(cloud.metadata.get("las") or {})
    attrs = dict(cloud.attributes)
    fmt = meta.get("point_format")
    if fmt is None:
        fmt = 7 if _colours(attrs) else 6
    fmt = int(fmt)
    if fmt not in POINT_FIELDS:
        raise FapcError(f"unknown LAS point format {fmt} in the cloud's metadata", path=path)
    scale, offset = _quantisation(pts, meta)
    ints = np.round((pts - offset) / scale)
    if len(ints) and (ints.min() < -(2**31) or ints.max() > 2**31 - 1):
        raise FapcError("coordinates do not fit LAS's 32-bit integers at the file's scale",
                        path=path)
    # the standard fields of this point format, from the attributes of that name that fit
    # them; one that does not (a float intensity, a label past 255) goes into extra bytes
    std = _standard_values(fmt, attrs)
    extra_cols: list[tuple[str, np.ndarray]] = []
    if cloud.normals is not None:
        nrm = np.asarray(cloud.normals)
        nrm = nrm if nrm.dtype in (np.float32, np.float64) else nrm.astype(np.float32)
        extra_cols += [("NormalX", nrm[:, 0]), ("NormalY", nrm[:, 1]), ("NormalZ", nrm[:, 2])]
    for name, arr in attrs.items():
        if name in std:
            continue
        arr = np.asarray(arr)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        if (arr.dtype.kind, arr.dtype.itemsize) not in TYPE_CODES:
            raise FapcError(f"attribute {name!r} of type {arr.dtype} cannot be LAS extra bytes",
                            path=path)
        if arr.ndim == 1:
            extra_cols.append((name, arr))
        else:
            extra_cols += [(f"{name}[{j}]", arr[:, j]) for j in range(arr.shape[1])]
    fields = POINT_FIELDS[fmt]
    names = [f for f, _ in fields] + [f"e{i}" for i in range(len(extra_cols))]
    formats = [t for _, t in fields] + [np.dtype(a.dtype).newbyteorder("<").str
                                        for _, a in extra_cols]
    rows = np.zeros(n, np.dtype({"names": names, "formats": formats}))
    for i, c in enumerate("XYZ"):
        rows[c] = ints[:, i]
    for name, packed, shift, nbits in _bits(fmt):
        default = 1 if name in ("return_number", "number_of_returns") else 0
        v = std.get(name, np.full(n, default))
        rows[packed] |= ((v & ((1 << nbits) - 1)) << shift).astype(np.uint8)
    for name, _ in fields[3:]:
        if name in std:
            rows[name] = std[name]
    for i, (_, arr) in enumerate(extra_cols):
        rows[f"e{i}"] = arr
    extra_cols = unique_names(extra_cols, _RESERVED)
    records = [r for r in meta.get("records", [])
               if (r[0], r[1]) not in (("LASF_Spec", 4), laz.LASZIP)]
    if extra_cols:
        records.insert(0, ("LASF_Spec", 4, "extra bytes",
                           b"".join(descriptor(nm, a.dtype) for nm, a in extra_cols), False))
    laz_vlr = None
    if compress:
        laz_vlr = laz.compression_vlr(
            fmt, rows.dtype.itemsize - np.dtype(POINT_FIELDS[fmt]).itemsize, path)
        records.append((*laz.LASZIP, "by fapc", bytes(laz_vlr.record_data()), False))
    vlrs = [r for r in records if not r[4] and len(r[3]) < 65536]
    evlrs = [r for r in records if r not in vlrs]
    vlr_bytes = b"".join(struct.pack(_VLR_FMT, 0, pad(r[0], 16), r[1], len(r[3]),
                                     pad(r[2], 32)) + r[3] for r in vlrs)
    evlr_bytes = b"".join(struct.pack(_EVLR_FMT, 0, pad(r[0], 16), r[1], len(r[3]),
                                      pad(r[2], 32)) + r[3] for r in evlrs)
    point_offset = _HEADER_SIZE_14 + len(vlr_bytes)
    rec_len = rows.dtype.itemsize
    returns = np.asarray(std.get("return_number", np.ones(n)), np.int64)
    by_return = [int((returns == r).sum()) for r in range(1, 16)]
    legacy = fmt < 6 and n < 2**32
    encoding = int(meta.get("global_encoding", 0)) | (0b10000 if fmt >= 6 else 0)
    today = datetime.datetime.now(datetime.timezone.utc).timetuple()
    lo = ints.min(0) * scale + offset if n else np.zeros(3)
    hi = ints.max(0) * scale + offset if n else np.zeros(3)
    from fapc import __version__

    header = struct.pack(
        _HEADER_FMT, b"LASF", 0, encoding, b"\0" * 16, 1, 4, pad("fapc", 32),
        pad(f"fapc {__version__}", 32), today.tm_yday, today.tm_year, _HEADER_SIZE_14,
        point_offset, len(vlrs), fmt | (0x80 if laz_vlr else 0), rec_len, n if legacy else 0,
        *[c if legacy else 0 for c in by_return[:5]],
        *scale, *offset, hi[0], lo[0], hi[1], lo[1], hi[2], lo[2])
    head = bytearray(header + struct.pack("<QQIQ15Q", 0, 0, len(evlrs), n, *by_return))
    with open(path, "w+b") as f:  # straight to the file: no second copy of the records
        f.write(head + vlr_bytes)
        if laz_vlr is None:
            f.write(memoryview(rows).cast("B"))
        else:
            laz.compress(f, laz_vlr, memoryview(rows).cast("B"), path)
        if evlrs:
            struct.pack_into("<Q", head, 235, f.tell())  # the start of the first EVLR
            f.write(evlr_bytes)
            f.seek(0)
            f.write(head)


def _standard_values(fmt: int, attrs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The attributes that can fill point format ``fmt``'s standard fields: by name, 1-D,
    and within the field's range (integers for integer fields; any numbers for float ones);
    as int64 or float64."""
    ranges: dict[str, tuple[float, float] | None] = {
        name: (0, (1 << nbits) - 1) for name, _, _, nbits in _bits(fmt)}
    for name, t in POINT_FIELDS[fmt][3:]:
        if not name.startswith("_"):
            kind = np.dtype(t)
            ranges[name] = (np.iinfo(kind).min, np.iinfo(kind).max) if kind.kind in "iu" else None
    out: dict[str, np.ndarray] = {}
    for name, rng in ranges.items():
        v = np.asarray(attrs.get(name, np.zeros((0, 0))))
        if v.ndim != 1 or v.dtype.kind not in "iufb":
            continue
        if rng is None:
            out[name] = v.astype(np.float64)
            continue
        if v.dtype.kind == "f" and not np.all(np.mod(v, 1) == 0):
            continue  # not integer-valued (NaN included)
        if len(v) and (v.min() < rng[0] or v.max() > rng[1]):
            continue
        out[name] = v.astype(np.int64)
    return out


def _colours(attrs: dict[str, np.ndarray]) -> bool:
    """Whether ``attrs`` holds LAS colours (16-bit ``red green blue``); 8-bit ones (PLY's usual
    colours) are widened in place first (x 257: 255 -> 65535)."""
    rgb = ("red", "green", "blue")
    if not all(c in attrs and np.asarray(attrs[c]).ndim == 1 for c in rgb):
        return False
    if all(np.asarray(attrs[c]).dtype == np.uint8 for c in rgb):
        for c in rgb:
            attrs[c] = np.asarray(attrs[c]).astype(np.uint16) * 257
    return all(np.asarray(attrs[c]).dtype == np.uint16 for c in rgb)


def _quantisation(pts: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``scale (3,)``, ``offset (3,)``: the cloud's own where it came from LAS, else per axis
    the extent's midpoint and the largest power of ten that keeps the whole extent within
    LAS's 32-bit integers (at least 1e-9; 1e-3 for a flat axis)."""
    if "scale" in meta and "offset" in meta:
        return np.asarray(meta["scale"], np.float64), np.asarray(meta["offset"], np.float64)
    if not len(pts):
        return np.full(3, 1e-3), np.zeros(3)
    lo, hi = pts.min(0), pts.max(0)
    extent = hi - lo
    with np.errstate(divide="ignore"):
        scale = 10.0 ** np.ceil(np.log10(extent / (2.0**32 - 4)))
    scale = np.where(extent > 0, np.maximum(scale, 1e-9), 1e-3)
    offset = np.round((lo + hi) / 2 / scale) * scale
    return scale, offset
