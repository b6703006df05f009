"""E57 (ASTM E2807), the exchange format of terrestrial laser scanners: read only.

An E57 file holds one or more scans (``data3D``), each with its points in the scanner's own
coordinates (cartesian or spherical) and a pose (a unit quaternion and a translation) that
places it in the file's coordinates. :func:`read_e57` returns every scan's valid points in
the file's coordinates, one cloud, with:

- ``intensity`` (float32) and ``red``, ``green``, ``blue`` where every scan carries them
  (uint8 for 8-bit colours, uint16 for 16-bit ones: values as the scanner wrote them);
- ``scan_index`` (uint16 or uint32): which scan each point came from;
- ``metadata["e57"]``: ``origins (S, 3)``, each scan's sensor position in the file's
  coordinates (its pose's translation), and ``names``; with one scan, ``viewpoint`` too.

:func:`point_viewpoints` gives each point its scan's sensor position, which is what
``--orient viewpoint`` uses for such a file (normals face the scanner that saw the point).

Points flagged invalid (``cartesianInvalidState`` or ``sphericalInvalidState`` not 0) are
left out. The binary format (paged with checksums, bit-packed compressed vectors) is read by
libE57Format, the reference implementation, through the ``pye57`` package (the optional
extra ``fapc[e57]``): imported here only when an E57 file is read. Writing E57 is not offered:
the standard has no normals field outside an extension pye57 does not write; an E57 input
becomes a PLY output by default.
"""

from __future__ import annotations

import numpy as np

from fapc.cloud import PointCloud
from fapc.errors import FormatError

SIGNATURE = b"ASTM-E57"
CARTESIAN = ("cartesianX", "cartesianY", "cartesianZ")
SPHERICAL = ("sphericalRange", "sphericalAzimuth", "sphericalElevation")
COLOURS = (("colorRed", "red"), ("colorGreen", "green"), ("colorBlue", "blue"))


def quaternion_matrix(q: np.ndarray) -> np.ndarray:
    """The rotation ``(3, 3)`` of a quaternion ``(w, x, y, z)`` (normalised first; a zero
    quaternion is refused)."""
    q = np.asarray(q, np.float64)
    if q.shape != (4,):
        raise ValueError(f"a quaternion has 4 elements (w, x, y, z), got shape {q.shape}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"not a rotation quaternion: {q.tolist()}")
    w, x, y, z = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def spherical_to_cartesian(rae: np.ndarray) -> np.ndarray:
    """E57's spherical coordinates ``(N, 3)``: range, azimuth (from +x toward +y) and
    elevation (from the xy-plane toward +z), in radians -> ``(N, 3)`` cartesian."""
    r, az, el = rae[:, 0], rae[:, 1], rae[:, 2]
    return np.stack([r * np.cos(el) * np.cos(az), r * np.cos(el) * np.sin(az), r * np.sin(el)], 1)


def _pye57():
    try:
        import pye57
    except ImportError:
        raise FormatError("reading E57 needs the pye57 package (pip install 'fapc[e57]')") \
            from None
    return pye57


def _field_dtype(libe57, proto, name: str) -> type:
    """The numpy type a point field is read into: float64 for coordinates, int8 for the
    invalid states, float32 for intensity, and for colours uint8, uint16 or uint32 by the
    field's own maximum (scanners write 8- or 16-bit colours; both are kept as they are)."""
    if name in CARTESIAN or name in SPHERICAL:
        return np.float64
    if name.endswith("InvalidState"):
        return np.int8
    node = proto.get(name)
    if name.startswith("color") and node.type() == libe57.E57_INTEGER:
        top = libe57.IntegerNode(node).maximum()
        return np.uint8 if top <= 0xFF else np.uint16 if top <= 0xFFFF else np.uint32
    return np.float32


def _read_fields(e57, header) -> dict[str, np.ndarray]:
    """The point fields this reader uses, read through our own buffers (pye57's fixed
    8-bit colour buffers refuse 16-bit colours)."""
    from pye57 import libe57

    proto = libe57.StructureNode(header.points.prototype())
    present = set(header.point_fields)
    # one coordinate system (a scan may store both): cartesian where it is complete
    coords = (*CARTESIAN, "cartesianInvalidState") if present.issuperset(CARTESIAN) else \
        (*SPHERICAL, "sphericalInvalidState")
    wanted = (*coords, "intensity", *(src for src, _ in COLOURS))
    count = header.point_count
    data: dict[str, np.ndarray] = {}
    buffers = libe57.VectorSourceDestBuffer()
    for name in wanted:
        if name in present:
            data[name] = np.empty(count, _field_dtype(libe57, proto, name))
            buffers.append(libe57.SourceDestBuffer(e57.image_file, name, data[name], count,
                                                   True, True))
    if count:
        header.points.reader(buffers).read()
    return data


def _scan(e57, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, str]:
    """One scan: points ``(M, 3)`` in the file's coordinates, attributes, the sensor
    position ``(3,)`` and the scan's name."""
    header = e57.get_header(index)
    data = _read_fields(e57, header)
    if all(f in data for f in CARTESIAN):
        local = np.stack([data[f] for f in CARTESIAN], 1)  # (M, 3)
        invalid = data.get("cartesianInvalidState")
    elif all(f in data for f in SPHERICAL):
        local = spherical_to_cartesian(np.stack([data[f] for f in SPHERICAL], 1))
        invalid = data.get("sphericalInvalidState")
    else:
        raise FormatError(f"scan {index} has neither cartesian nor spherical coordinates")
    keep = np.ones(len(local), bool) if invalid is None else invalid == 0
    if header.has_pose():
        rot = quaternion_matrix(np.asarray(header.rotation))
        origin = np.asarray(header.translation, np.float64).reshape(3)
    else:
        rot, origin = np.eye(3), np.zeros(3)
    pts = local[keep] @ rot.T + origin  # (M, 3): scanner's coordinates -> the file's
    attrs: dict[str, np.ndarray] = {}
    if "intensity" in data:
        attrs["intensity"] = data["intensity"][keep]
    if all(src in data for src, _ in COLOURS):
        for src, name in COLOURS:
            attrs[name] = data[src][keep]
    try:
        name = str(header["name"].value())
    except Exception:  # the name is optional in the standard
        name = f"scan {index}"
    return pts, attrs, origin, name


def _corrupt(e: Exception) -> FormatError:
    """libE57Format's own reason (checksum, truncation, bad XML), in one line."""
    lines = str(e).strip().splitlines()
    return FormatError(f"corrupt E57 file ({(lines[0] if lines else type(e).__name__)[:200]})")


def read_e57(path: str) -> PointCloud:
    """Every scan of the E57 file at ``path``, in the file's coordinates (see the module)."""
    with open(path, "rb") as f:
        if f.read(8) != SIGNATURE:
            raise FormatError("not an E57 file")
    pye57 = _pye57()
    try:
        e57 = pye57.E57(path)
    except Exception as e:
        raise _corrupt(e) from None
    try:
        n_scans = e57.scan_count
        if n_scans == 0:
            raise FormatError("the E57 file holds no scans")
        parts = [_scan(e57, i) for i in range(n_scans)]
    except FormatError:
        raise
    except Exception as e:  # a page's checksum, a truncated section, a bad node
        raise _corrupt(e) from None
    finally:
        e57.close()
    points = np.concatenate([p for p, _, _, _ in parts])  # (N, 3) float64
    sizes = [len(p) for p, _, _, _ in parts]
    index_dtype = np.uint16 if n_scans <= np.iinfo(np.uint16).max else np.uint32
    attributes: dict[str, np.ndarray] = {}
    for name in ("intensity", "red", "green", "blue"):
        if all(name in a for _, a, _, _ in parts):  # only where every scan has it
            # (scans with 8- and 16-bit colours together: the wider type, values unchanged)
            attributes[name] = np.concatenate([a[name] for _, a, _, _ in parts])
    attributes["scan_index"] = np.repeat(np.arange(n_scans, dtype=index_dtype), sizes)
    origins = np.stack([o for _, _, o, _ in parts])  # (S, 3)
    return PointCloud(points=points, attributes=attributes,
                      viewpoint=origins[0].copy() if n_scans == 1 else None,
                      metadata={"e57": {"origins": origins,
                                        "names": [n for _, _, _, n in parts]}})


def point_viewpoints(cloud: PointCloud) -> np.ndarray | None:
    """Each point's sensor position ``(N, 3)`` for a cloud read from a multi-scan E57 file
    (its scan's origin), else the cloud's single ``viewpoint (3,)``, else None."""
    e57 = cloud.metadata.get("e57")
    index = cloud.attributes.get("scan_index")
    if e57 is not None and index is not None:
        origins = np.asarray(e57["origins"], np.float64)
        if len(origins) and int(index.max(initial=0)) < len(origins):
            return origins[index.astype(np.intp)]
    return cloud.viewpoint
