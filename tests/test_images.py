import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, decode_rgb, sniff


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # Left half red, right half blue, stored sideways with orientation 6 (rotate 90 degrees clockwise to view).
    array = np.zeros((40, 20, 3), np.uint8)
    array[:20] = (255, 0, 0)
    array[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, Image.fromarray(array), "sideways.jpg", exif=exif, quality=95)
    pixels = decode_rgb(path, 16)
    assert pixels.shape == (20, 40, 3)
    pixels = load_rgb(path, 16)
    assert pixels[8, 2, 2] > 200 and pixels[8, 2, 0] < 60  # shown upright: blue on the left
    assert pixels[8, 13, 0] > 200 and pixels[8, 13, 2] < 60


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.new("RGB", (30, 20), (120, 60, 200))
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 30), 40000, np.uint16))
    else:
        image = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = save(tmp_path, image, f"img.{fmt.lower()}", format=fmt)
    pixels = decode_rgb(path, 8)
    assert pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 8 and pixels.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(pixels[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1  # scaled, not clipped at 255


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    pixels = decode_rgb(save(tmp_path, image, "clear.png"), 4)
    assert (pixels == 255).all()


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    pixels = decode_rgb(path, 6)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def load_rgb(path, size, mode="squash"):
    from pipeline.preprocessing import single_image_resizer

    return single_image_resizer(size, mode)(decode_rgb(path, size))


def test_squash_and_crop(tmp_path):
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, :20] = 255  # white left third
    path = save(tmp_path, Image.fromarray(array), "wide.png")
    assert load_rgb(path, 10, "squash")[:, 0].mean() > 200  # squashed: the left edge is white
    assert load_rgb(path, 10, "crop")[:, 0].mean() < 50  # cropped to the centre: black


def test_fit_to_size_is_a_box_filter_then_bilinear():
    from pipeline.preprocessing import single_image_resizer

    # a 4x4 checkerboard of 0/255 shrunk by 4 in each direction: the box filter gives the mean, 127.5
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(board[..., None], 3, axis=2)
    out = single_image_resizer(16, "squash")(image)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 127.5, atol=1e-4)  # no aliasing: plain bilinear would give 0s or 255s
    same = single_image_resizer(64, "squash")(image)
    np.testing.assert_allclose(same, image, atol=1e-4)  # the input size: unchanged


def test_truncated_jpeg_is_an_image_error(tmp_path):
    path = save(tmp_path, Image.new("RGB", (64, 64), (9, 9, 9)), "whole.jpg", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageError, match="cannot decode"):
        decode_rgb(cut, 8)


def png_header_only(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_rgb(path, 8)


def test_sniff():
    assert sniff(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff(b"GIF89a....") == "GIF"
    assert sniff(b"hello world") is None
    assert sniff(b"") is None
