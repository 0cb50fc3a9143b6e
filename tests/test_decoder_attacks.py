"""Decoders under attack, for every format read (JPEG, PNG, WEBP, GIF, BMP, HEIC, AVIF): headers that promise
60,000 x 60,000 pixels, a decompression bomb, truncated bodies, polyglots, a HEIF whose ftyp box lies, absurd
EXIF. Each is refused before its pixels are decoded (features.max_pixels) with a one-line reason: an
ImageError in the decoder, a skipped.csv row in the features stage, a one-line 400 in the app, which
keeps serving with its memory bounded. The files are made by tests/attacks.py, never downloaded."""
import csv
import io
import resource

import attacks
import pytest
import yaml
from _server import Server

from pipeline.data import decode
from pipeline.project import open_project
from pipeline.stages import features

from conftest import cli, make_dataset, make_params

HOSTILE = {
    **{f"huge{attacks.SUFFIX[f]}": (lambda f=f: attacks.huge_header(f), "over the") for f in attacks.FORMATS},
    **{f"cut{attacks.SUFFIX[f]}": (lambda f=f: attacks.truncated(f), "cannot decode") for f in attacks.FORMATS},
    "bomb.png": (attacks.bomb, "over the 120,000,000 limit"),
    "lying.heic": (attacks.lying_ftyp, "cannot decode"),
}
HARMLESS = {  # read as the photos they are: the rest of the file, or the absurd field, is not used
    "polyglot.jpg": attacks.jpeg_with_zip,
    "orientation.jpg": lambda: attacks.absurd_exif("orientation"),
    "exif_size.jpg": lambda: attacks.absurd_exif("size"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_is_refused_in_one_line_before_decoding(name):
    make, reason = HOSTILE[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(decode.ImageError) as refused:
        decode.decode_rgb(io.BytesIO(make()))
    message = str(refused.value)
    assert reason in message and "\n" not in message and len(message) < 300, message
    # nothing near the declared size was allocated (60,000 x 60,000 RGB would be 10 GB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 600_000  # kB


@pytest.mark.parametrize("name", sorted(HARMLESS))
def test_polyglots_and_absurd_exif_are_read_as_the_photo_they_are(name):
    assert decode.decode_rgb(io.BytesIO(HARMLESS[name]())).shape == (48, 64, 3)


@pytest.mark.parametrize("fmt", attacks.FORMATS)
def test_the_limit_is_the_params_own_for_every_decoder(fmt):
    data = attacks.photo(fmt, (64, 64))  # 4,096 pixels
    assert decode.decode_rgb(io.BytesIO(data), max_pixels=4096).shape == (64, 64, 3)
    with pytest.raises(decode.ImageError, match="64x64 pixels is over the 4,095 limit of features.max_pixels"):
        decode.decode_rgb(io.BytesIO(data), max_pixels=4095)


def _plant(folder):
    for name, (make, _) in HOSTILE.items():
        (folder / "misty" / name).write_bytes(make())
    (folder / "tigger" / "not_a_heic.heic").write_bytes(attacks.zip_with_jpeg())


def test_the_features_stage_skips_each_with_its_row_and_keeps_the_rest(tmp_path):
    make_dataset(tmp_path / "photos", per_class=12)
    _plant(tmp_path / "photos")
    params = make_params(tmp_path, data={"max_bad_fraction": 0.5})
    result = features.run(open_project(params, tmp_path))
    assert result.n_rows == 36
    with open(tmp_path / "reports" / "skipped.csv", newline="") as f:
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(f)}
    for name, (_, reason) in HOSTILE.items():
        assert reason in rows[name]["reason"] and "\n" not in rows[name]["reason"], name
    assert "not_a_heic.heic" in rows  # named as a photo, but an archive: said, not silently dropped


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = tmp_path_factory.mktemp("attacked")
    make_dataset(project / "photos", per_class=12)
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"root": "photos"},
                                                          "features": {"backbone": "tiny", "batch_size": 8}}))
    assert cli(project, "features").returncode == 0 and cli(project, "train-head").returncode == 0
    server = Server(project)
    yield server
    server.stop()


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def test_the_app_answers_each_in_one_line_and_keeps_serving(served):
    rss = []
    for name, (make, reason) in HOSTILE.items():
        status, body = served.upload("/api/predict", [(name, make())])
        assert status == 400 and body["error"].startswith(f"{name}: ") and reason in body["error"], (name, body)
        assert "\n" not in body["error"]
        rss.append(_rss_kb(served.process.pid))
    for name, make in HARMLESS.items():
        status, body = served.upload("/api/predict", [(name, make())])
        assert status == 200 and body[0]["error"] is None, (name, body)
    assert served.json("/api/health")[0] == 200
    assert max(rss) - rss[0] < 300_000  # kB: no hostile file grew the server by its promised size
