"""LAS extra bytes (the Extra Bytes VLR, LASF_Spec record 4): reading the descriptors into
fields of the point records and decoding them into attributes, and writing descriptors for the
attributes :mod:`fapc.io.las` stores that way."""

from __future__ import annotations

import struct

import numpy as np

DESCRIPTOR = 192  # bytes per Extra Bytes descriptor
EXTRA_TYPES = {1: "u1", 2: "i1", 3: "<u2", 4: "<i2", 5: "<u4", 6: "<i4", 7: "<u8", 8: "<i8",
               9: "<f4", 10: "<f8"}  # data_type -> dtype
TYPE_CODES = {(np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in EXTRA_TYPES.items()}


def extra_fields(records: list, n_bytes: int, base: int
                 ) -> list[tuple[str, str, int, float, float, int]]:
    """``(name, dtype, byte offset, scale, offset, options)`` of each described extra-bytes
    field; bytes nobody describes become one ``extra_bytes`` field of raw ``uint8``."""
    out: list[tuple[str, str, int, float, float, int]] = []
    at = 0
    for user, rid, _, payload, _ in records:
        if user != "LASF_Spec" or rid != 4:
            continue
        for k in range(len(payload) // DESCRIPTOR):
            d = payload[k * DESCRIPTOR:(k + 1) * DESCRIPTOR]
            dtype_code, options = d[2], d[3]
            name = cstr(d[4:36]) or f"extra_{k}"
            sc, off = struct.unpack_from("<d", d, 112)[0], struct.unpack_from("<d", d, 136)[0]
            if dtype_code == 0:
                size, t = options, f"V{max(options, 1)}"
            elif dtype_code in EXTRA_TYPES:
                t = EXTRA_TYPES[dtype_code]
                size = np.dtype(t).itemsize
            else:
                break  # deprecated or reserved types: the rest stays undescribed
            if size == 0 or at + size > n_bytes:
                break
            out.append((f"e{len(out)}:{name}", t, base + at, sc, off, options if dtype_code else 0))
            at += size
        break
    if at < n_bytes:
        out.append((f"e{len(out)}:extra_bytes", f"V{n_bytes - at}", base + at, 1.0, 0.0, 0))
    return out


def decode_extra(rows: np.ndarray, extra: list) -> dict[str, np.ndarray]:
    """Extra-bytes fields as attributes; ``name[0]``, ``name[1]`` ... of one type join."""
    cols: dict[str, np.ndarray] = {}
    for key, t, _, sc, off, options in extra:
        name = key.split(":", 1)[1]
        v = rows[key]
        if t.startswith("V"):
            v = np.frombuffer(np.ascontiguousarray(v).tobytes(), np.uint8).reshape(len(rows), -1)
        else:
            v = np.ascontiguousarray(v).astype(np.dtype(t).newbyteorder("="))
            if options & 0b11000:  # scale and/or offset apply
                v = v.astype(np.float64) * (sc if options & 0b1000 else 1.0) + \
                    (off if options & 0b10000 else 0.0)
        while name in cols:
            name += "_"
        cols[name] = v
    out: dict[str, np.ndarray] = {}
    names = list(cols)
    i = 0
    while i < len(names):
        name = names[i]
        if name.endswith("[0]"):
            stem, j = name[:-3], 1
            while (i + j < len(names) and names[i + j] == f"{stem}[{j}]"
                   and cols[names[i + j]].dtype == cols[name].dtype
                   and cols[names[i + j]].ndim == 1):
                j += 1
            if j > 1 and cols[name].ndim == 1 and stem not in cols:
                out[stem] = np.stack([cols[names[i + m]] for m in range(j)], 1)
                i += j
                continue
        out[name] = cols[name]
        i += 1
    return out


def unique_names(cols: list[tuple[str, np.ndarray]], reserved: set[str]
                 ) -> list[tuple[str, np.ndarray]]:
    """Extra-bytes names as written: none in ``reserved`` (the lower-case names of the
    standard fields: readers such as laspy refuse a file where the two meet), none twice
    (ignoring case), 32 bytes at most; a clash gets ``_extra`` appended (``_extra2`` ...)."""
    taken = set(reserved)
    out: list[tuple[str, np.ndarray]] = []
    for name, arr in cols:
        base = name.encode("ascii", "replace")[:32].decode("ascii")
        cand, k = base, 1
        while cand.lower() in taken:
            suffix = "_extra" if k == 1 else f"_extra{k}"
            cand, k = base[:32 - len(suffix)] + suffix, k + 1
        taken.add(cand.lower())
        out.append((cand, arr))
    return out


def descriptor(name: str, dtype: np.dtype) -> bytes:
    """One 192-byte Extra Bytes descriptor (no scale, offset, min, max or no-data)."""
    d = bytearray(DESCRIPTOR)
    d[2] = TYPE_CODES[(np.dtype(dtype).kind, np.dtype(dtype).itemsize)]
    d[4:36] = pad(name, 32)
    return bytes(d)


def cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1").strip()


def pad(text: str, size: int) -> bytes:
    raw = text.encode("ascii", "replace")[:size]
    return raw + b"\0" * (size - len(raw))
