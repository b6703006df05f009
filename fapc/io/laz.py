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


def decompress(data: bytes, point_offset: int, laszip: bytes, size: int, path: str) -> bytes:
    """The ``size`` bytes of point records that the LAZ file ``data`` compresses."""
    lazrs = _lazrs(path)
    check_chunk_table(data, point_offset, size, path)
    out = bytearray(size)
    src = io.BytesIO(data)  # the chunk table's offset is from the start of the file
    src.seek(point_offset)
    try:
        lazrs.LasZipDecompressor(src, laszip).decompress_many(out)
    except Exception as e:  # lazrs raises its own error types on corrupt data
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


def compression_vlr(fmt: int, n_extra: int, path: str) -> Any:
    """The LASzip VLR (a ``lazrs.LazVlr``) for point format ``fmt`` with ``n_extra`` extra
    bytes per record; its ``record_data()`` is the VLR's payload."""
    return _lazrs(path).LazVlr.new_for_compression(fmt, n_extra)


def compress(out: io.BytesIO, vlr: Any, records: bytes, path: str) -> None:
    """Append the compressed ``records`` to ``out``, which holds the file up to its points:
    the chunk table's offset is written from the start of the file."""
    compressor = _lazrs(path).LasZipCompressor(out, vlr)
    compressor.compress_many(records)
    compressor.done()
    out.seek(0, io.SEEK_END)
