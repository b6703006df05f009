"""LAZ, compressed LAS, through ``lazrs`` (a binding of the LASzip codec in Rust):
decompressing a file's points into the records :mod:`fapc.io.las` reads, and compressing the
records it lays out. ``lazrs`` is imported only here, when a LAZ file is met."""

from __future__ import annotations

import io
import struct
from typing import Any

from fapc.errors import FapcError, FormatError

LASZIP = ("laszip encoded", 22204)  # the LASzip VLR's user and record id
LAZ_RATIO = 1000  # LAZ data holds at most this many times its size in point records


def _lazrs(path: str) -> Any:
    try:
        import lazrs
    except ImportError:
        raise FapcError("LAZ needs the lazrs package (pip install lazrs)", path=path) from None
    return lazrs


def decompress(data: bytes, point_offset: int, laszip: bytes, count: int, rec_len: int,
               path: str) -> bytes:
    """The ``count`` point records of ``rec_len`` bytes that the LAZ file ``data``
    compresses."""
    size = count * rec_len
    lazrs = _lazrs(path)
    check_chunk_table(data, point_offset, size, path)
    out = bytearray(size)
    src = io.BytesIO(data)  # the chunk table's offset is from the start of the file
    src.seek(point_offset)
    try:
        check_layers(lazrs, data, point_offset, laszip, count, rec_len, path)
        lazrs.LasZipDecompressor(src, laszip).decompress_many(out)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # on corrupt data lazrs raises its own errors, and a panic in
        # its Rust code arrives as pyo3's PanicException, which is not an Exception
        if isinstance(e, FormatError):
            raise
        msg = f"corrupt LAZ data ({type(e).__name__}: {e})".splitlines()[0]
        raise FormatError(msg[:300], path=path) from None
    return bytes(out)


def check_chunk_table(data: bytes, point_offset: int, size: int, path: str) -> None:
    """Refuse a LAZ chunk table that claims more chunks than the file could hold: lazrs
    allocates the table before reading it, and an allocation that fails aborts the process
    (a corrupt count once asked for 60 GB), which would end a whole batch."""
    if len(data) - point_offset < 8:
        raise FormatError("corrupt LAZ data (no offset to the chunk table)", path=path)
    table_at = struct.unpack_from("<q", data, point_offset)[0]
    if table_at == -1:  # written without a table (streaming); lazrs reads on sequentially
        return
    if not point_offset + 8 <= table_at <= len(data) - 8:
        raise FormatError("corrupt LAZ data (the chunk table lies outside the file)", path=path)
    chunks = struct.unpack_from("<I", data, table_at + 4)[0]
    if chunks > min(size, len(data)) + 1:
        raise FormatError(f"corrupt LAZ data (the chunk table claims {chunks} chunks)",
                          path=path)


# layers per chunk of each layered item type (LASzip 1.4's point formats 6-10): Point14,
# RGB14, RGBNIR14, Wavepacket14; Byte14 (type 14) has one layer per extra byte
_LAYERS = {10: 9, 11: 1, 12: 2, 13: 1}
_BYTE14 = 14


def check_layers(lazrs: Any, data: bytes, point_offset: int, laszip: bytes, count: int,
                 rec_len: int, path: str) -> None:
    """For layered LAZ (point formats 6-10), refuse a chunk whose layer sizes overrun the
    chunk: lazrs allocates each layer at its stated size before reading it, so one corrupt
    size could take gigabytes (1.4 GB for a 2 KB file, seen by our fuzz test)."""
    if len(laszip) < 34:
        return  # lazrs refuses it
    n_items = struct.unpack_from("<H", laszip, 32)[0]
    if len(laszip) < 34 + 6 * n_items:
        return
    items = [struct.unpack_from("<HH", laszip, 34 + 6 * i) for i in range(n_items)]
    n_layers = sum(size if t == _BYTE14 else _LAYERS.get(t, 0) for t, size in items)
    if not n_layers or struct.unpack_from("<q", data, point_offset)[0] == -1:
        return  # not layered, or no chunk table to find the chunks by
    src = io.BytesIO(data)
    src.seek(point_offset)
    table = lazrs.read_chunk_table(src, lazrs.LazVlr(laszip))  # [(points, bytes)] per chunk
    if count and sum(points for points, _ in table) < count:
        raise FormatError(f"corrupt LAZ data (its chunk table holds fewer than its {count} "
                          "points)", path=path)
    pos = point_offset + 8
    for points, nbytes in table:
        end = pos + nbytes
        if end > len(data):
            raise FormatError("corrupt LAZ data (a chunk runs past the end of the file)",
                              path=path)
        if points:
            head = pos + rec_len + 4  # the chunk's first point, raw, then its point count
            if head + 4 * n_layers > end or head + 4 * n_layers + sum(
                    struct.unpack_from(f"<{n_layers}I", data, head)) > end:
                raise FormatError("corrupt LAZ data (a chunk's layers overrun it)", path=path)
        pos = end


def compression_vlr(fmt: int, n_extra: int, path: str) -> Any:
    """The LASzip VLR (a ``lazrs.LazVlr``) for point format ``fmt`` with ``n_extra`` extra
    bytes per record; its ``record_data()`` is the VLR's payload."""
    return _lazrs(path).LazVlr.new_for_compression(fmt, n_extra)


def compress(out: Any, vlr: Any, records: bytes | memoryview, path: str) -> None:
    """Append the compressed ``records`` to ``out`` (a seekable binary file that holds the
    file up to its points: the chunk table's offset is written from the start of the file)."""
    compressor = _lazrs(path).LasZipCompressor(out, vlr)
    compressor.compress_many(records)
    compressor.done()
    out.seek(0, io.SEEK_END)
