"""Decoding and resizing, each checked against known values or an independent implementation."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.decode import ImageError, decode_rgb, sniff
from pipeline.data.resize import fit_to_size


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # Top half red, bottom half blue, stored with orientation 6 (rotate 90 degrees clockwise to view):
    # upright, red is on the right and blue on the left.
    array = np.zeros((40, 20, 3), np.uint8)
    array[:20] = (255, 0, 0)
    array[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, Image.fromarray(array), "sideways.jpg", exif=exif, quality=95)
    pixels = decode_rgb(path, 16)
    assert pixels.shape == (20, 40, 3)
    assert pixels[10, 5, 2] > 200 and pixels[10, 5, 0] < 60  # left: blue
    assert pixels[10, 34, 0] > 200 and pixels[10, 34, 2] < 60  # right: red


COLOUR = (120, 60, 200)


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    path = save(tmp_path, Image.new("RGB", (32, 32), COLOUR).convert("CMYK"), "cmyk.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    pixels = decode_rgb(path, 8)
    assert np.abs(pixels.reshape(-1, 3).mean(axis=0) - COLOUR).max() < 8  # an inverted CMYK would be far off


def test_palette_png_gives_the_palette_colours(tmp_path):
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, *COLOUR] + [0] * 762)
    image.putpixel((0, 0), 0)
    pixels = decode_rgb(save(tmp_path, image, "palette.png"), 4)
    assert tuple(pixels[5, 5]) == COLOUR and tuple(pixels[0, 0]) == (0, 0, 0)


def test_one_bit_png_is_black_and_white(tmp_path):
    image = Image.new("1", (8, 4), 0)
    for x in range(4):
        for y in range(4):
            image.putpixel((x, y), 1)
    pixels = decode_rgb(save(tmp_path, image, "bits.png"), 2)
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == 0).all()


def test_grayscale_becomes_equal_channels(tmp_path):
    pixels = decode_rgb(save(tmp_path, Image.new("L", (6, 6), 77), "gray.png"), 2)
    assert (pixels == 77).all() and pixels.shape == (6, 6, 3)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    image = Image.fromarray(np.full((20, 30), 40000, np.uint16))
    pixels = decode_rgb(save(tmp_path, image, "deep.png"), 8)
    assert abs(int(pixels[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_transparency_is_composited_on_white(tmp_path):
    clear = decode_rgb(save(tmp_path, Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "clear.png"), 4)
    assert (clear == 255).all()
    half = decode_rgb(save(tmp_path, Image.new("RGBA", (10, 10), (0, 0, 0, 128)), "half.png"), 4)
    assert np.abs(half.astype(int) - 127).max() <= 1  # black at 50% over white
    gray_alpha = decode_rgb(save(tmp_path, Image.new("LA", (10, 10), (0, 0)), "la.png"), 4)
    assert (gray_alpha == 255).all()


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    pixels = decode_rgb(path, 6)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def pil_box(image: np.ndarray, size: int) -> np.ndarray:
    """PIL's box filter on each channel in float32: at an exact multiple, the mean of each block."""
    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), "F").resize((size, size), Image.BOX))
                for c in range(3)]
    return np.stack(channels, axis=-1)


@pytest.mark.parametrize("side, size", [(448, 224), (96, 32), (224, 224), (300, 100)])
def test_resize_equals_pil_box_filter_at_exact_multiples(side, size):
    from pipeline.data.resize_layer import single_image_resizer

    image = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    expected = pil_box(image, size)
    np.testing.assert_allclose(fit_to_size(image, size), expected, atol=2e-3)  # OpenCV twin
    np.testing.assert_allclose(single_image_resizer(size, "squash")(image), expected, atol=2e-3)  # TensorFlow layer


def area_then_linear(image: np.ndarray, size: int) -> np.ndarray:
    """An independent FitToSize in plain numpy and Python loops, in the photo's own pixel units:
    complete f-pixel blocks averaged, then output pixel i is the mean of the photo over
    [i n / size, (i + 1) n / size), block by block (the span past the last complete block reads the
    last one); growing axes use bilinear interpolation with half-pixel centres."""
    x = image.astype(np.float64)

    def axis_matrix(n):
        f = max(1, n // size)
        blocks = n // f
        m = np.zeros((size, blocks))
        for i in range(size):
            if n >= size:
                low, high = i * n / size, (i + 1) * n / size
                for j in range(-(-n // f) + 1):
                    overlap = max(0.0, min(high, (j + 1) * f) - max(low, j * f))
                    m[i, min(j, blocks - 1)] += overlap / (high - low)
            else:
                source = min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1)
                lower = int(np.floor(source))
                m[i, lower] += 1 - (source - lower)
                m[i, min(lower + 1, n - 1)] += source - lower
        return m, f, blocks

    (rows_m, fy, rows), (cols_m, fx, cols) = axis_matrix(x.shape[0]), axis_matrix(x.shape[1])
    boxed = x[:rows * fy, :cols * fx].reshape(rows, fy, cols, fx, 3).mean(axis=(1, 3))
    return np.einsum("ih,hwc,jw->ijc", rows_m, boxed, cols_m)


@pytest.mark.parametrize("shape", [(375, 500), (447, 449), (100, 60), (378, 504), (1512, 2016), (7, 300), (3024, 4032)])
def test_resize_equals_an_independent_area_and_bilinear_resize(shape):
    from pipeline.data.resize_layer import single_image_resizer

    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = area_then_linear(image, 32)
    np.testing.assert_allclose(fit_to_size(image, 32), expected, atol=2e-3)
    np.testing.assert_allclose(single_image_resizer(32, "squash")(image), expected, atol=2e-3)


def test_a_shrunk_decode_and_a_whole_decode_resize_alike():
    """What makes an app's full-size decode agree with the pipeline's DCT-scaled one: every output pixel
    averages the same span of the photo, whatever resolution it was decoded at."""
    from skimage import data

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((4032, 3024), Image.BICUBIC), np.float64)
    photo = np.clip(photo + np.random.default_rng(0).normal(0, 3, photo.shape), 0, 255).astype(np.uint8)
    shrunk = photo.reshape(378, 8, 504, 8, 3).mean(axis=(1, 3)).round().astype(np.uint8)  # a 1/8 DCT decode's DC
    difference = np.abs(fit_to_size(photo, 224) - fit_to_size(shrunk, 224)).mean()
    assert difference < 1.2  # on the 0..255 scale; a bilinear last step over a cropped box grid gave 1.95


def test_crop_keeps_the_centre_square():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255  # the centre square is white, the sides black
    assert (fit_to_size(image, 50, "crop") == 255).all()
    assert fit_to_size(image, 50, "squash")[:, :10].max() == 0


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


@pytest.mark.parametrize("width, height", [(30000, 30000), (12000, 10001)])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(width, height))

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError) as error:
        decode_rgb(path, 8)
    assert str(error.value) == (f"{width}x{height} pixels is over the 120,000,000 limit of features.max_pixels "
                                "(decompression bomb?)")


def test_sniff():
    assert sniff(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff(b"GIF89a....") == "GIF"
    assert sniff(b"\x89PNG\r\n\x1a\n") == "PNG"
    assert sniff(b"BM" + b"\0" * 30) == "BMP"
    assert sniff(b"hello world") is None
    assert sniff(b"") is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_as_pillow_shows_it(orientation):
    """Colour JPEGs are decoded by OpenCV (faster on 12 MP photos): pixel for pixel what Pillow's
    exif_transpose gives, for each of the 8 EXIF orientations."""
    import io

    from PIL import ImageOps

    base = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    base.save(buffer, "JPEG", exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).convert("RGB"))
    np.testing.assert_array_equal(decode_rgb(io.BytesIO(buffer.getvalue())), expected)


@pytest.mark.parametrize("size", [(447, 600), (448, 600), (895, 1200), (896, 896), (1800, 3000), (300, 4000)])
def test_reduced_decode_shrinks_exactly_the_jpegs_pillow_shrinks_and_leaves_the_rest_whole(tmp_path, size):
    """decode: reduced asks for twice a 224 input (448): a JPEG is decoded at 1/2, 1/4 or 1/8 exactly when
    ``reduces`` says so (predict relies on it to know which cached rows saw the whole photo), and at least
    448 pixels survive on each side; any other photo is decoded whole, pixel for pixel."""
    from pipeline.data.decode import reduces

    height, width = size
    path = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
    whole, reduced = decode_rgb(path), decode_rgb(path, 448)
    with Image.open(path) as image:
        shrinks = reduces(image, 448)
    assert whole.shape == (height, width, 3)
    if shrinks:
        assert min(reduced.shape[:2]) >= 448 and reduced.shape[0] in (height // 2, height // 4, height // 8,
                                                                      -(-height // 2), -(-height // 4), -(-height // 8))
    else:
        np.testing.assert_array_equal(reduced, whole)
    assert shrinks == (min(height, width) >= 896)
