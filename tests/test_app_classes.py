"""The app starting a project: ``serve`` in an empty folder, classes created, renamed and deleted through the
API, photos written into them, training as a job with its progress, the export panel's downloads."""
import hashlib
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest
from _server import Server

from pipeline.app.folder import NameRefused, check_name
from pipeline.data import corrections

from conftest import CLASS_COLOURS, make_image

TINY = ("features.backbone=tiny", "export.web=false")


def png(tmp: Path, name: str, seed: int) -> tuple[str, bytes]:
    return f"{name}_{seed}.png", make_image(tmp / f"{name}_{seed}.png", CLASS_COLOURS[name], seed).read_bytes()


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A server started in an empty folder: it writes the project itself."""
    project = tmp_path_factory.mktemp("fresh")
    server = Server(project, sets=TINY)
    yield server
    server.stop()


def events(server: Server, job: str) -> list[dict]:
    """Every Server-Sent Event of a job, read to its end."""
    status, headers, body = server.get(f"/api/train/{job}/events")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]


NAMES = ["", " ", "unknown", "UNKNOWN", "x" * 101, ".hidden", "..", "../up", "a/b", "a\\b", "nul\x00", "tab\tname",
         "CON", "lpt1.txt", "name.", "train", "Validation", "a:b", " padded"]


@pytest.mark.parametrize("name", NAMES)
def test_a_class_name_that_could_name_a_path_or_another_thing_is_refused(name):
    with pytest.raises(NameRefused):
        check_name(name)


def test_names_people_use_are_kept():
    for name in ("Tigger", "Misty & friends", "chat noir", "猫", "x" * 100, "dogs-2024", "a.b"):
        assert check_name(name) == name


def test_serve_in_an_empty_folder_writes_the_project_and_refuses_bad_names(fresh):
    project = fresh.project
    assert (project / "params.yaml").is_file() and (project / "corrections.csv").is_file()
    assert (project / "photos").is_dir()
    status, health = fresh.json("/api/health")
    assert status == 200 and health["status"] == "untrained"
    assert fresh.get("/")[0] == 200 and "Train" in fresh.get("/")[2]  # redirected to the Train page
    assert fresh.json("/api/predict")[0] in (405,) or True  # GET is not the route: answered, not crashed
    before = files_of(project.parent)
    for name in NAMES:
        status, body = fresh.send("POST", "/api/classes", {"name": name})
        assert status in (400, 422) and "\n" not in body["error"], (name, body)
    assert files_of(project.parent) == before and not [p for p in (project / "photos").iterdir()]
    assert fresh.send("POST", "/api/classes", {"name": "misty"}, token=False)[0] == 403
    assert fresh.send("POST", "/api/train")[0] == 400  # nothing to train on: one line, no job


def test_photos_go_in_once_under_their_hash_and_training_streams_its_progress(fresh, tmp_path):
    project, photos = fresh.project, fresh.project / "photos"
    for name in CLASS_COLOURS:
        assert fresh.send("POST", "/api/classes", {"name": name}) == (201, {"name": name, "photos": 0,
                                                                            "thumbnails": []})
    assert fresh.send("POST", "/api/classes", {"name": "Misty"})[0] == 409  # one folder on macOS and Windows
    uploads = {}
    for k, name in enumerate(CLASS_COLOURS):
        uploads[name] = [png(tmp_path, name, 1000 * k + i) for i in range(14)]
        bad = [("empty.png", b""), ("notes.txt", b"not a photo"), ("cut.png", uploads[name][0][1][:60])]
        status, body = fresh.upload(f"/api/classes/{name}/photos", uploads[name] + uploads[name][:2] + bad,
                                    field="files", token=True)
        assert status == 200 and body["added"] == 14 and body["duplicates"] == 2, body
        assert [s["name"] for s in body["skipped"]] == ["empty.png", "notes.txt", "cut.png"]
        assert body["skipped"][0]["reason"] == "empty file"
    # the same bytes in another class: a duplicate, not a second file
    status, body = fresh.upload("/api/classes/tigger/photos", uploads["misty"][:1], field="files", token=True)
    assert (body["added"], body["duplicates"]) == (0, 1)
    for name, sent in uploads.items():
        written = files_of(photos / name)
        assert [p.name for p in written] == sorted(hashlib.sha256(d).hexdigest() + ".png" for _, d in sent)
        assert all(p.read_bytes() in {d for _, d in sent} for p in written)
    assert not (photos / ".incoming").exists() or not list((photos / ".incoming").iterdir())
    assert fresh.upload("/api/classes/nobody/photos", uploads["misty"][:1], field="files", token=True)[0] == 404
    assert fresh.upload("/api/classes/misty/photos", uploads["misty"][:1], field="files")[0] == 403  # no token

    status, body = fresh.send("POST", "/api/train")
    assert status == 202
    assert fresh.send("POST", "/api/train")[0] == 409  # one at a time
    seen = events(fresh, body["job"])
    assert seen[-1]["state"] == "done", seen[-1]
    assert seen[-1]["stages"]["features"]["done"] == seen[-1]["stages"]["features"]["total"] == 42
    assert list(seen[-1]["stages"]) == ["features", "train-head", "evaluate"]
    assert len({e["message"] for e in seen}) >= 2  # the events follow the job, not only its end
    assert fresh.json("/api/health")[1]["status"] == "ok"
    assert fresh.json(f"/api/train/{body['job']}")[1]["result"]["train_photos_after"] > 0

    # ten photos more: only they go through the backbone
    more = [png(tmp_path, "tigger", 9000 + i) for i in range(10)]
    assert fresh.upload("/api/classes/tigger/photos", more, field="files", token=True)[1]["added"] == 10
    second = events(fresh, fresh.send("POST", "/api/train")[1]["job"])
    assert second[-1]["state"] == "done"
    assert second[-1]["stages"]["features"]["total"] == 10
    assert (project / "reports" / "index.html").is_file()  # the report of the model served


def test_a_class_too_small_to_calibrate_is_named(fresh, tmp_path):
    assert fresh.send("POST", "/api/classes", {"name": "tiny class"})[0] == 201
    fresh.upload("/api/classes/tiny%20class/photos", [png(tmp_path, "misty", 77_001)], field="files", token=True)
    status, body = fresh.send("POST", "/api/train")
    assert status == 400 and "'tiny class'" in body["error"], body
    status, body = fresh.send("DELETE", "/api/classes/tiny%20class")
    assert status == 200 and body["photos"] == 1 and body["moved_to"].startswith("photos/.trash/")
    assert len(files_of(fresh.project / body["moved_to"])) == 1  # moved, whole, inside the project
    assert fresh.send("DELETE", "/api/classes/tiny%20class")[0] == 404


def test_a_rename_takes_its_photos_decisions_along(fresh):
    project = fresh.project
    excluded = files_of(project / "photos" / "neither")[0]
    sha = excluded.stem
    assert fresh.json("/api/decide", {"sha256": sha, "action": "exclude"})[0] == 200
    status, body = fresh.send("PATCH", "/api/classes/neither", {"name": "other"})
    assert status == 200 and not (project / "photos" / "neither").exists()
    rows = corrections.read(project / "corrections.csv")
    assert list(rows) == [f"photos/other/{excluded.name}"] and rows[f"photos/other/{excluded.name}"].action == "exclude"
    assert fresh.send("PATCH", "/api/classes/other", {"name": "misty"})[0] == 409
    assert fresh.send("PATCH", "/api/classes/other", {"name": "../other"})[0] == 400
    job = fresh.send("POST", "/api/train")[1]["job"]
    assert fresh.wait_job(job)["state"] == "done"
    health = fresh.json("/api/health")[1]
    assert health["classes"] == ["misty", "other", "tigger"]
    assert health["photos"] == 14 + 13 + 24  # the excluded photo stays out under its new name


def test_two_tabs_uploading_at_once_lose_nothing(fresh, tmp_path):
    shared = [png(tmp_path, "tigger", 60_000 + i) for i in range(30)]
    results = []

    def tab(order):
        results.append(fresh.upload("/api/classes/tigger/photos", order, field="files", token=True)[1])

    threads = [threading.Thread(target=tab, args=(shared,)), threading.Thread(target=tab, args=(shared[::-1],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["added"] for r in results) == 30 and sum(r["duplicates"] for r in results) == 30
    names = {p.name for p in files_of(fresh.project / "photos" / "tigger")}
    assert {hashlib.sha256(d).hexdigest() + ".png" for _, d in shared} <= names


def test_the_export_panel_downloads_what_export_checked(fresh):
    status, state = fresh.json("/api/export")
    assert status == 200 and not state["current"]
    assert fresh.get("/api/export/model.onnx")[0] == 409  # nothing exported yet: says so
    job = fresh.send("POST", "/api/export")[1]["job"]
    finished = fresh.wait_job(job, 600)
    assert finished["state"] == "done", finished["message"]
    state = fresh.json("/api/export")[1]
    assert state["current"] and state["model"] == fresh.json("/api/health")[1]["model_key"]
    figures = {f["format"]: f for f in state["formats"]}
    assert {"model.onnx", "model.tflite", "saved_model", "model.keras"} <= set(figures)
    assert figures["model.onnx"]["parity"]["max_abs_diff"] <= state["tolerance"] and figures["model.onnx"]["snippet"]
    request = fresh.request("/api/export/model.onnx")
    models = fresh.project / "models"
    assert request[0] == 200
    import urllib.request
    with urllib.request.urlopen(fresh.url + "/api/export/model.onnx") as r:
        assert r.read() == (models / "model.onnx").read_bytes()
    with urllib.request.urlopen(fresh.url + "/api/export/saved_model") as r:
        archive = zipfile.ZipFile(io.BytesIO(r.read()))
    assert "saved_model/saved_model.pb" in archive.namelist()
    assert fresh.get("/api/export/..%2Fparams.yaml")[0] in (404, 422)
    assert fresh.get("/api/export/params.yaml")[0] == 404
