"""Photos as phones save them: HEIC (through pi-heif) and AVIF (through Pillow) wherever photos enter, their
orientation honoured; images in formats not read are reported, never dropped without a word."""
import csv
import io
import logging

import numpy as np
import pytest
from PIL import Image

from pipeline import cli as cli_mod
from pipeline import graph
from pipeline.data import decode
from pipeline.project import open_project
from pipeline.stages import features

from conftest import CLASS_COLOURS, make_params

pillow_heif = pytest.importorskip("pillow_heif")  # writes the HEIC fixtures (tests only: its wheel bundles x265)

ORIENTATION = 0x0112


def halves(width=120, height=80) -> np.ndarray:
    """Left half red, right half blue: any rotation or mirroring shows."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (230, 20, 20)
    array[:, width // 2:] = (20, 20, 230)
    return array


def save_heic(array: np.ndarray, path, orientation: int = 1, quality: int = 95):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    pillow_heif.from_pillow(Image.fromarray(array)).save(path, quality=quality, exif=exif.tobytes())
    return path


def save_avif(array: np.ndarray, path, orientation: int = 1, quality: int = 95):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, format="AVIF", quality=quality, exif=exif.tobytes())
    return path


SAVERS = {"HEIF": save_heic, "AVIF": save_avif}


@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_phone_formats_are_sniffed_by_content_whatever_their_name(tmp_path, fmt):
    path = SAVERS[fmt](halves(), tmp_path / "photo.jpg")  # misnamed: content decides
    assert decode.sniff(path.read_bytes()[:32]) == fmt
    assert decode.decode_rgb(path).shape == (80, 120, 3)


@pytest.mark.parametrize("fmt", sorted(SAVERS))
@pytest.mark.parametrize("orientation, top_left, bottom_left", [
    (1, "red", "red"),  # as stored
    (6, "red", "blue"),  # rotate 90 degrees clockwise: the left (red) half on top
    (8, "blue", "red"),  # rotate 90 degrees counter-clockwise: the right (blue) half on top
    (3, "blue", "blue"),  # 180 degrees
])
def test_the_orientation_a_phone_records_is_applied(tmp_path, fmt, orientation, top_left, bottom_left):
    pixels = decode.decode_rgb(SAVERS[fmt](halves(), tmp_path / f"o{orientation}", orientation))
    colour = {"red": 0, "blue": 2}
    assert pixels.shape[:2] == ((120, 80) if orientation in (6, 8) else (80, 120))
    assert np.argmax(pixels[2, 2]) == colour[top_left]
    assert np.argmax(pixels[-3, 2]) == colour[bottom_left]


def test_heif_rotation_is_stored_as_irot_and_not_applied_twice(tmp_path):
    path = save_heic(halves(), tmp_path / "rotated.heic", orientation=6)
    assert b"irot" in path.read_bytes()  # the rotation lives in the HEIF item, not only in EXIF
    with decode.open_image(path) as image:
        assert image.getexif().get(ORIENTATION, 1) == 1  # libheif applied it; EXIF says nothing more
    assert decode.decode_rgb(path).shape == (120, 80, 3)


def _phone_project(tmp_path, per_class=6):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("misty", "tigger", "neither")):
        for i in range(per_class):
            array = np.clip(np.array(CLASS_COLOURS[name]) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
            folder = tmp_path / "photos" / name
            folder.mkdir(parents=True, exist_ok=True)
            if i % 3 == 0:
                save_heic(array, folder / f"{name}_{i}.heic", quality=90)
            elif i % 3 == 1:
                save_avif(array, folder / f"{name}_{i}.avif", quality=90)
            else:
                Image.fromarray(array).save(folder / f"{name}_{i}.jpg", quality=90)
    return tmp_path


@pytest.mark.parametrize("decode_mode", ["full", "reduced"])
def test_heic_and_avif_are_featurised_like_any_photo_and_agree_with_a_whole_decode(tmp_path, decode_mode):
    project = _phone_project(tmp_path)
    params = make_params(project, features={"decode": decode_mode})
    result = features.run(open_project(params, project))
    assert result.n_rows == 18 and not result.skipped
    # whatever features.decode says, these formats are decoded whole: the cache is what an app's decode gives
    for path in sorted((project / "photos").rglob("*.[ha][ev][ii]*")):
        draft = decode.decode_rgb(path, draft_size=16)
        assert np.array_equal(draft, decode.decode_rgb(io.BytesIO(path.read_bytes())))


def test_predict_and_the_app_read_phone_formats(tmp_path):
    from pipeline.use import predict

    project = _phone_project(tmp_path)
    params = make_params(project)
    graph.run("train-head", open_project(params, project), with_upstream=True)
    photo = save_heic(np.full((60, 80, 3), CLASS_COLOURS["tigger"], np.uint8), project / "new.heic")
    answers = predict.run(open_project(params, project), [str(photo)], 1)
    assert answers[0].answer == "tigger" and answers[0].error is None
    assert decode.thumbnail_jpeg(photo, 32)[:3] == b"\xff\xd8\xff"  # inspect and the app's thumbnails


UNREAD = {  # file name -> (bytes, the format skipped.csv names)
    "scan.tif": (b"II*\x00\x08\x00\x00\x00" + bytes(40), "TIFF"),
    "shot.jxl": (b"\xff\x0a\xfa\x7f" + bytes(40), "JPEG XL"),
    "box.jxl": (b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(40), "JPEG XL"),
    "camera.nef": (b"MM\x00*\x00\x00\x00\x08" + bytes(40), "camera RAW"),
    "camera.cr3": (b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom" + bytes(40), "camera RAW"),
    "fuji.raf": (b"FUJIFILMCCD-RAW 0201" + bytes(40), "camera RAW"),
    "layers.psd": (b"8BPS\x00\x01" + bytes(40), "PSD"),
}


def test_images_in_formats_not_read_are_reported_with_their_format_and_counted(project, caplog):
    for name, (data, _) in UNREAD.items():
        (project / "photos" / "misty" / name).write_bytes(data)
    broken = project / "photos" / "tigger" / "broken.heic"
    broken.write_bytes(save_heic(halves(), project / "whole.heic").read_bytes()[:300])  # a HEIC with no body
    (project / "photos" / "misty" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    (project / "photos" / "misty" / "notes.txt").write_text("Misty, 2024")
    params = make_params(project)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = features.run(open_project(params, project))
    assert result.n_rows == 36
    assert "7 photos in formats not read: 3 camera RAW, 2 JPEG XL, 1 PSD, 1 TIFF" in caplog.text
    with open(project / "reports" / "skipped.csv", newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    for name, (_, fmt) in UNREAD.items():
        row = rows[f"misty/{name}"]
        assert row["format"] == fmt and row["reason"].startswith("an image format not read"), row
    assert rows["tigger/broken.heic"]["format"] == "HEIF"
    assert rows["tigger/broken.heic"]["reason"].startswith("cannot decode")
    assert not any(p.endswith((".DS_Store", "notes.txt")) for p in rows)  # not images: passed over quietly


def test_init_says_what_it_found(tmp_path, capsys):
    photos = tmp_path / "photos"
    for c, (name, count) in enumerate((("misty", 2), ("tigger", 3))):
        (photos / name).mkdir(parents=True)
        for i in range(count):
            save_avif(halves() // (1 + c * 3 + i), photos / name / f"{i}.avif")
    (photos / "misty" / "scan.tif").write_bytes(UNREAD["scan.tif"][0])
    assert cli_mod.main(["init", "--root", "photos", "--params", str(tmp_path / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "2 classes, 5 photos: misty 2, tigger 3" in out
    assert "1 photo in formats not read: 1 TIFF" in out
    text = (tmp_path / "params.yaml").read_text()
    assert "  root: photos " in text and "make demo" not in text
