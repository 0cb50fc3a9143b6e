"""Hostile image files, made here (never downloaded): for every format the tool reads, a header that
promises 60,000 x 60,000 pixels (WEBP: its most, 16,384 square), a truncated body, and the other tricks
of the reliability page (a decompression bomb, polyglots, a HEIF whose ftyp box lies, absurd EXIF)."""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

HUGE = 60_000


def _photo(fmt: str, size=(64, 48)) -> bytes:
    array = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.from_bytes(mode="RGB", size=size, data=array.tobytes()).save(buffer, quality=90)
    else:
        Image.fromarray(array).save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def photo(fmt: str, size=(64, 48)) -> bytes:
    """An ordinary small photo of ``fmt`` (JPEG, PNG, WEBP, GIF, BMP, HEIF, AVIF)."""
    return _photo(fmt, size)


def _png_huge(data: bytes) -> bytes:
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", HUGE, HUGE)
    chunk = b"IHDR" + bytes(ihdr)
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def _jpeg_huge(data: bytes) -> bytes:
    out = bytearray(data)
    i = 2
    while i < len(out):
        marker, length = out[i + 1], struct.unpack(">H", out[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: precision, height, width
            out[i + 5:i + 9] = struct.pack(">HH", HUGE, HUGE)
            return bytes(out)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _gif_huge(data: bytes) -> bytes:
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", HUGE, HUGE)  # the logical screen
    descriptor = out.index(b"\x2c", 13)  # the image descriptor
    out[descriptor + 5:descriptor + 9] = struct.pack("<HH", HUGE, HUGE)
    return bytes(out)


def _bmp_huge(data: bytes) -> bytes:
    out = bytearray(data)
    out[18:26] = struct.pack("<ii", HUGE, HUGE)
    return bytes(out)


def _webp_huge(data: bytes) -> bytes:
    out = bytearray(data)
    at = out.index(b"VP8L") + 8 + 1  # after the chunk header and the signature byte: 14 bits each, minus one
    bits = struct.unpack("<I", out[at:at + 4])[0]
    bits = (bits & ~0x0FFFFFFF) | (16383 << 14) | 16383
    out[at:at + 4] = struct.pack("<I", bits)
    return bytes(out)


def _isobmff_huge(data: bytes) -> bytes:
    """The ispe box (image spatial extents) of a HEIF or AVIF file claims 60,000 x 60,000."""
    out = bytearray(data)
    at = out.index(b"ispe")
    out[at + 8:at + 16] = struct.pack(">II", HUGE, HUGE)  # after version and flags
    return bytes(out)


_HUGE = {"JPEG": _jpeg_huge, "PNG": _png_huge, "GIF": _gif_huge, "BMP": _bmp_huge, "WEBP": _webp_huge,
         "HEIF": _isobmff_huge, "AVIF": _isobmff_huge}
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "HEIF": ".heic",
          "AVIF": ".avif"}
FORMATS = tuple(_HUGE)


def huge_header(fmt: str) -> bytes:
    return _HUGE[fmt](_photo(fmt))


def truncated(fmt: str) -> bytes:
    data = _photo(fmt, (256, 192))
    return data[:len(data) // 3]


def bomb() -> bytes:
    """A PNG of 12,000 x 12,000 zeros: about 90 KB on disk, 432 MB once decoded."""
    buffer = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def jpeg_with_zip() -> bytes:
    """A JPEG that is also a ZIP (the archive appended: unzip reads it from the end)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("payload.txt", "not a photo")
    return _photo("JPEG") + archive.getvalue()


def zip_with_jpeg() -> bytes:
    """A ZIP with a JPEG after it: it begins as an archive, so it is not an image."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x")
    return archive.getvalue() + _photo("JPEG")


def lying_ftyp() -> bytes:
    """An ftyp box that says HEIC, and a PNG after it."""
    box = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return struct.pack(">I", len(box) + 4) + box + _photo("PNG")


def absurd_exif(kind: str) -> bytes:
    """A JPEG whose EXIF orientation is out of range (kind 'orientation'), or whose EXIF claims sizes far
    beyond the image (kind 'size')."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), np.uint8))
    exif = Image.Exif()
    if kind == "orientation":
        exif[0x0112] = 65535
    else:
        exif[0xA002], exif[0xA003] = 4_000_000_000, 4_000_000_000  # PixelXDimension, PixelYDimension
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()
