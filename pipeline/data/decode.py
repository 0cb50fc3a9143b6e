"""Recognise images by content and decode them to the backbone's input.

Each format the tool reads is one entry of the decoder registry (``register``): how to tell it from
its first bytes, the file names it usually has, whether a large photo can be decoded at a reduced
DCT scale, and the Pillow plugin that reads it when Pillow does not itself (HEIC: ``pi-heif``, a
decoder-only build of libheif, registered on first use). Formats that are images but that the tool
does not read (TIFF, JPEG XL, camera RAW, ...) are recognised too (``unread_format``), so that such a
file is reported, never passed over. ``sniff`` asks every entry, so a PNG named ``.jpg`` is a PNG and a text file
named ``.jpg`` is not an image. ``decode_rgb`` applies EXIF orientation and converts every mode
(grayscale, palette, alpha, CMYK, 16-bit) to 8-bit RGB; HEIF's own rotation and mirroring
(``irot``, ``imir``) are applied by libheif while decoding. Large JPEGs are decoded at a reduced DCT
scale (``draft``): never decode pixels only to throw them away. No TensorFlow here.

A file is bad when the decoder refuses its bytes: an error raised inside Pillow or OpenCV. An error
raised by this module's own code is a bug, and keeps its traceback: it must never mark good photos
bad. ``VERSION`` goes with every bad mark a cache keeps, so a new decoder retries them.
"""
from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import PipelineError

# Bump when a file that failed to decode might decode now (a new decoder, a fixed bug): bad marks made by
# another version are retried.
VERSION = 4  # 3: HEIF and AVIF; 4: HEIF and AVIF held to their declared extents (features.max_pixels)

# Images over this many pixels are refused from their header, before any pixel is decoded
# (decompression bombs). Pillow's own check is switched off so that this one, with its message,
# is the one that acts: Pillow's would fire first, at twice its limit, with another message.
MAX_PIXELS = 120_000_000
Image.MAX_IMAGE_PIXELS = None

# Part of the features cache key (by features.decode): a change here changes the pixels the backbone sees.
DECODE_METHODS = {"full": "pillow-full+fit-to-size-box-area-v2", "draft": "pillow-draft+fit-to-size-box-area-v2",
                  "reduced": "pillow-draft-2x+fit-to-size-box-area-v2"}


class ImageError(PipelineError, ValueError):
    """An image that cannot be used; the message is the reason, for the log and skipped.csv."""


@dataclass(frozen=True)
class Decoder:
    """One image format the tool reads."""

    format: str  # Pillow's name of the format (and of the formats it opens as, in ``aliases``)
    sniff: Callable[[bytes], bool]  # from the file's first 32 bytes
    suffixes: tuple[str, ...]  # the names its files usually have (a file so named that is not one is reported)
    aliases: tuple[str, ...] = ()  # other names Pillow gives the same decoder's images (MPO: a JPEG with more frames)
    draft: bool = False  # can be decoded at a reduced DCT scale (Pillow's ``draft``)
    plugin: Callable[[], None] | None = None  # registers the Pillow plugin that reads it (called once, first use)


DECODERS: dict[str, Decoder] = {}


def register(decoder: Decoder) -> Decoder:
    if decoder.format in DECODERS:
        raise ValueError(f"decoder {decoder.format!r} is registered twice")
    DECODERS[decoder.format] = decoder
    return decoder


@contextlib.contextmanager
def registered(decoder: Decoder):
    """``decoder`` in the registry for the ``with`` block only (tests, plug-ins)."""
    register(decoder)
    try:
        yield decoder
    finally:
        DECODERS.pop(decoder.format, None)


register(Decoder("JPEG", lambda head: head.startswith(b"\xff\xd8\xff"), (".jpg", ".jpeg", ".jpe", ".jfif"),
                 aliases=("MPO",), draft=True))
register(Decoder("PNG", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"), (".png",)))
register(Decoder("WEBP", lambda head: head[:4] == b"RIFF" and head[8:12] == b"WEBP", (".webp",)))
register(Decoder("GIF", lambda head: head.startswith((b"GIF87a", b"GIF89a")), (".gif",)))
register(Decoder("BMP", lambda head: head.startswith(b"BM") and len(head) >= 26, (".bmp", ".dib")))


def _brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media file (HEIF, AVIF, MP4, ...) from its ``ftyp``
    box, as far as the first bytes hold them; empty for any other file."""
    if head[4:8] != b"ftyp":
        return set()
    end = min(int.from_bytes(head[:4], "big"), len(head))
    return {head[8:12]} | {head[i:i + 4] for i in range(16, end - 3, 4)}


AVIF_BRANDS = {b"avif", b"avis"}
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}


def _pi_heif() -> None:
    # pi-heif, not pillow-heif: the same libheif for reading, without the GPL x265 encoder in its wheels
    import pi_heif

    pi_heif.register_heif_opener()
    _DECODER_CODE.append(str(Path(pi_heif.__file__).parent))


register(Decoder("AVIF", lambda head: bool(_brands(head) & AVIF_BRANDS), (".avif",)))
register(Decoder("HEIF", lambda head: bool(_brands(head) & HEIF_BRANDS) and not _brands(head) & AVIF_BRANDS,
                 (".heic", ".heif", ".hif"), plugin=_pi_heif))


@dataclass(frozen=True)
class Unread:
    """An image format the tool recognises but does not read: reported, with what to do instead."""

    name: str
    sniff: Callable[[bytes, str], bool]  # (first 32 bytes, lower-case suffix)


_RAW_SUFFIXES = {".cr2", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".pef", ".raw", ".rwl", ".3fr", ".erf",
                 ".kdc", ".mrw", ".srw", ".x3f"}
_TIFF = (b"II*\x00", b"MM\x00*")
UNREAD = (
    # TIFF-based camera RAW files (CR2, NEF, ARW, DNG, ...) tell themselves apart from TIFF by name only
    Unread("camera RAW", lambda head, suffix: (head.startswith(_TIFF) and suffix in _RAW_SUFFIXES)
           or head.startswith((b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"IIU\x00", b"MMOR"))
           or b"crx " in _brands(head)),
    Unread("TIFF", lambda head, suffix: head.startswith(_TIFF)),
    Unread("JPEG XL", lambda head, suffix: head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"))),
    Unread("JPEG 2000", lambda head, suffix: head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"))),
    Unread("PSD", lambda head, suffix: head.startswith(b"8BPS")),
    Unread("HEIF sequence or other ISO media", lambda head, suffix: bool(_brands(head))
           and suffix in (".heic", ".heif", ".hif", ".avif")),
    Unread("ICO", lambda head, suffix: head.startswith(b"\x00\x00\x01\x00") and suffix == ".ico"),
)


def unread_format(head: bytes, suffix: str) -> str | None:
    """The name of the image format of a file that ``sniff`` does not read (TIFF, JPEG XL, camera RAW,
    PSD, ...), or None when its content is not an image this module knows of."""
    return next((u.name for u in UNREAD if u.sniff(head, suffix.lower())), None)


def image_suffixes() -> set[str]:
    return {suffix for decoder in DECODERS.values() for suffix in decoder.suffixes}


def sniff(head: bytes) -> str | None:
    """The image format from a file's first bytes, or None when it is not an image we read."""
    return next((decoder.format for decoder in DECODERS.values() if decoder.sniff(head)), None)


def decoder_of(pillow_format: str | None) -> Decoder | None:
    return next((d for d in DECODERS.values() if pillow_format == d.format or pillow_format in d.aliases), None)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit or 32-bit integer gray: scale to 8 bits rather than clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        # Transparent pixels become white, as on most pages such images are shown on.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def check_header(image: Image.Image, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an opened (not yet decoded) image whose format or size this tool does not take: over
    ``max_pixels`` (``features.max_pixels``) from the size its header declares, before a pixel is decoded."""
    if decoder_of(image.format) is None:
        raise ImageError(f"unsupported format {image.format}")
    _check_pixels(*image.size, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{width}x{height} pixels is over the {max_pixels:,} limit of features.max_pixels "
                         "(decompression bomb?)")


def check_iso_media(source, max_pixels: int = MAX_PIXELS) -> None:
    """A HEIF or AVIF file (``source``: a path or bytes in a file object) held to every size its ``ispe``
    boxes declare, before its decoder opens it: that is what libheif and libavif allocate for, whatever
    size the plugin reports at open (another box's, or none when the decoder refuses to identify it)."""
    if not _brands(_head(source, 32)):  # not ISO media: nothing more is read
        return
    head = _head(source, 1 << 18)  # the meta box that holds them comes before the coded data
    at = head.find(b"ispe")
    while 0 <= at and at + 16 <= len(head):
        _check_pixels(*struct.unpack(">II", head[at + 8:at + 16]), max_pixels)  # after version and flags
        at = head.find(b"ispe", at + 4)


def _head(source, limit: int) -> bytes:
    if hasattr(source, "getvalue"):
        return source.getvalue()[:limit]
    with open(source, "rb") as f:
        return f.read(limit)


_DECODER_CODE = [str(Path(Image.__file__).parent)]  # and each plugin's, once registered
_READY: set[str] = set()


def open_image(path) -> Image.Image:
    """``Image.open``, with the plugins of the registered decoders that need one registered first."""
    for decoder in DECODERS.values():
        if decoder.plugin is not None and decoder.format not in _READY:
            decoder.plugin()
            _READY.add(decoder.format)
    return Image.open(path)


def _raised_by_decoder(error: BaseException) -> bool:
    """Whether ``error`` comes from a decoder refusing the bytes (the innermost frame is Pillow's), rather
    than from this module's own code (a bug)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(tuple(_DECODER_CODE))


def decode_rgb(path, draft_size: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright, the whole photo; resizing to the input size is ``FitToSize``.
    ``path``: a file, or its bytes in a file object (a Ray worker's case): the same reasons either way.
    With ``draft_size``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides at least that many pixels: several times faster on 12 MP photos, but not the pixels an
    app that decodes the whole photo gets (docs: the figures). Raises ImageError with the reason."""
    try:
        check_iso_media(path, max_pixels)
        with open_image(path) as image:
            check_header(image, max_pixels)
            shrink = reduces(image, draft_size)
            if decoder_of(image.format).draft and image.mode == "RGB" and not shrink:
                pixels = _opencv_jpeg(path)
                if pixels is not None:
                    return pixels
            if shrink:
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(_to_rgb(image), dtype=np.uint8)
    except PermissionError:
        raise ImageError("permission denied") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (OSError, ValueError, SyntaxError, EOFError, RuntimeError) as error:  # RuntimeError: libheif's
        if isinstance(error, ImageError) or not _raised_by_decoder(error):
            raise
        raise ImageError(f"cannot decode: {_without_name(str(error), path)}") from None


def reduces(image: Image.Image, draft_size: int) -> bool:
    """Whether ``decode_rgb(..., draft_size)`` decodes this opened image at a reduced DCT scale: a JPEG at
    least twice ``draft_size`` on both sides (Pillow's ``draft`` rule), so its pixels are not an app's."""
    width, height = image.size
    decoder = decoder_of(image.format)
    return bool(draft_size) and decoder is not None and decoder.draft and min(width, height) >= 2 * draft_size


def _opencv_jpeg(path) -> np.ndarray | None:
    """A colour JPEG decoded whole by OpenCV: the same libjpeg-turbo pixels as Pillow's (tested equal),
    EXIF orientation applied, straight into a numpy array (Pillow stores RGB in 4 bytes a pixel and
    copies it out: for a 12 MP photo, 0.13 s against 0.09 s here). None when OpenCV cannot read it."""
    import cv2

    if hasattr(path, "getvalue"):
        data = path.getvalue()
    else:
        with open(path, "rb") as f:
            data = f.read()
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    return pixels if pixels is not None and pixels.ndim == 3 else None


def _without_name(message: str, path) -> str:
    """Pillow names the file in some messages: the reason alone reads the same for a path and for bytes."""
    message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", message)
    message = message.replace(f"'{path}'", "the file").replace(str(path), "the file")
    message = message.replace("cannot identify image file the file", "not an image any decoder here identifies")
    return " ".join(message.split())  # one line: libheif's messages end in a newline


def thumbnail_jpeg(path, side: int, quality: int = 80, max_pixels: int = MAX_PIXELS) -> bytes:
    """The photo upright, fitted into ``side`` x ``side``, as JPEG bytes (decoded at a reduced DCT scale
    where it can be). ImageError when it cannot be read; OSError when the file cannot be opened."""
    import io

    try:
        check_iso_media(path, max_pixels)
        with open_image(path) as image:
            check_header(image, max_pixels)
            image.draft("RGB", (side, side))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            return buffer.getvalue()
    except (OSError, ValueError, SyntaxError, EOFError, RuntimeError) as error:  # RuntimeError: libheif's
        if isinstance(error, (ImageError, FileNotFoundError, PermissionError)) or not _raised_by_decoder(error):
            raise
        raise ImageError(f"cannot decode: {_without_name(str(error), path)}") from None
