"""The decoder registry, bad marks that a new decoder retries, and bugs that never mark a photo bad."""
import numpy as np
import pytest
from PIL import Image

from pipeline.data import decode
from pipeline.project import open_project
from pipeline.stages import features
from pipeline.store import table

from conftest import CLASS_COLOURS, CountingBackbone, make_image, make_params


def test_every_registered_format_is_sniffed_by_content(tmp_path):
    for fmt, suffix in (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".gif"), ("BMP", ".bmp")):
        path = make_image(tmp_path / f"photo{suffix}", (10, 200, 30), 1, fmt=fmt)
        assert decode.sniff(path.read_bytes()[:32]) == fmt
        assert suffix in decode.image_suffixes()
    assert decode.sniff(b"II*\x00" + bytes(28)) is None  # TIFF: not registered


def test_a_throwaway_decoder_is_read_everywhere_the_scan_looks(project):
    for i in range(3):
        array = np.full((30, 30, 3), CLASS_COLOURS["misty"], np.uint8) + np.uint8(i)
        Image.fromarray(array).save(project / "photos" / "misty" / f"scan_{i}.tif", format="TIFF")
    params = make_params(project)
    before = features.run(open_project(params, project))
    reported = [s for s in before.skipped if s.path.endswith(".tif")]
    assert len(reported) == 3 and {s.format for s in reported} == {"TIFF"} and before.n_rows == 36  # not read yet
    tiff = decode.Decoder("TIFF", lambda head: head[:4] in (b"II*\x00", b"MM\x00*"), (".tif", ".tiff"))
    with decode.registered(tiff):
        after = features.run(open_project(params, project))
        assert after.n_new == 3 and after.n_rows == 39 and not after.skipped
    assert "TIFF" not in decode.DECODERS


def test_a_bad_mark_of_another_decoder_version_is_tried_again(project, monkeypatch):
    truncated = project / "photos" / "misty" / "truncated.jpg"
    good = make_image(project / "tmp.jpg", CLASS_COLOURS["misty"], 7, size=(400, 300))
    truncated.write_bytes(good.read_bytes()[:900])
    good.unlink()
    params = make_params(project)
    first = features.run(open_project(params, project))
    assert [s.path for s in first.skipped] == ["misty/truncated.jpg"]
    counter = CountingBackbone(monkeypatch)
    features.run(open_project(params, project))
    assert counter.images == 0  # the same decoder: the bad mark holds
    monkeypatch.setattr(table, "DECODER_VERSION", decode.VERSION + 1)  # a new decoder
    again = features.run(open_project(params, project))
    assert [s.path for s in again.skipped] == ["misty/truncated.jpg"]  # tried again, and still refused
    assert again.n_rows == 36
    assert table.read_index(first.path)[1]  # marked again, by the new version


def test_a_bug_in_the_decoding_code_keeps_its_traceback_and_marks_nothing(project, monkeypatch):
    def broken(image):
        raise ValueError("a bug, not a bad photo")

    monkeypatch.setattr(decode, "_to_rgb", broken)
    with pytest.raises(ValueError, match="a bug, not a bad photo") as error:
        decode.decode_rgb(make_image(project / "one.png", (1, 2, 3), 0))
    assert not isinstance(error.value, decode.ImageError)
    with pytest.raises(ValueError, match="a bug"):
        features.run(open_project(make_params(project), project))
    cache = open_project(make_params(project), project).features_file()
    assert not cache.exists() or not table.read_index(cache)[1]  # no photo marked bad by the bug
