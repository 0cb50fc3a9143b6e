"""The app where it writes, as SQLite tests itself: killed with SIGKILL at random points of its writes
(decisions) and of a retrain, many times, with the seed printed; and 8 clients at once.

After each kill: the corrections file reads whole, every acknowledged decision is in it (none lost,
none doubled), no stray file is where the scan looks, the server starts again on the cache and model
it left. After the clients: no 5xx, every decision acknowledged is the one in the file, and a features
run agrees with the folder."""
import csv
import hashlib
import http.client
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from _server import Server
from test_serve import write_project

from pipeline import params as params_mod
from pipeline.data import corrections

from conftest import CLASS_COLOURS, cached_table, cli, make_image

SEED = int(os.environ.get("PHOTOHEAD_KILL_SEED", "20261203"))
KILLS = 6
CLIENTS = 8
CLIENT_SECONDS = 20


def _action(rng: random.Random, name: str, names: list[str]) -> str:
    """keep, or exclude for one photo in seven: every class keeps enough photos to train on."""
    return rng.choice(["keep", "exclude"]) if names.index(name) % 7 == 0 else "keep"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = write_project(tmp_path_factory.mktemp("hands"))
    for i in range(12):  # the class the clients rename
        make_image(folder / "photos" / "spare" / f"spare_{i:02d}.png", CLASS_COLOURS["neither"], 600_000 + i)
    assert cli(folder, "all").returncode == 0
    return folder


def _photos(project: Path) -> list[str]:
    return sorted(p.relative_to(project).as_posix() for p in (project / "photos").rglob("*.png"))


def _rows(project: Path) -> list[dict]:
    path = project / "corrections.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sigkill_at_random_points_of_decisions_and_retrains_loses_nothing(project):
    print(f"kill loop seed {SEED} (PHOTOHEAD_KILL_SEED reruns it)")
    rng = random.Random(SEED)
    names = [n for n in _photos(project) if "really_tigger" not in n]
    shas = {n: hashlib.sha256((project / n).read_bytes()).hexdigest() for n in names}  # as the app names them
    photos_before = _photos(project)
    acked: dict[str, str] = {}  # photo -> the last action the server acknowledged
    for kill in range(KILLS):
        server = Server(project)
        in_flight: dict[str, str] = {}
        stop = threading.Event()
        failures: list[str] = []

        def hands():
            while not stop.is_set():
                name = rng.choice(names)
                action = _action(rng, name, names)
                in_flight.clear()
                in_flight[name] = action
                try:
                    if rng.random() < 0.15:
                        server.json("/api/retrain", {})
                    else:
                        status, _ = server.json("/api/decide", {"sha256": shas[name], "action": action})
                        if status == 200:
                            acked[name] = action
                except (OSError, http.client.HTTPException):  # the kill cut the connection: this one is in flight
                    return
                except AssertionError as error:  # a 5xx (tests/_server.py)
                    failures.append(f"kill {kill}: {error}"[:3000])
                    return

        worker = threading.Thread(target=hands)
        worker.start()
        time.sleep(rng.uniform(0.3, 3.0))
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        stop.set()
        worker.join(30)
        print(f"kill {kill}: {len(acked)} photos decided so far, one in flight: {in_flight}")
        assert not failures, failures[0]
        rows = _rows(project)
        written = {r["path"]: r["action"] for r in rows}
        assert len(written) == len(rows), f"kill {kill}: a photo named twice in corrections.csv"
        corrections.read(project / "corrections.csv")  # parses whole
        for name, action in acked.items():
            assert written.get(name) in {action, *(a for n, a in in_flight.items() if n == name)}, (kill, name)
        assert _photos(project) == photos_before  # nothing new or missing where the scan looks
        assert not [p for p in (project / "photos").rglob("*") if p.is_file() and p.suffix != ".png"]
    server = Server(project)  # the cache and model it left: the server starts and answers
    assert server.json("/api/health")[0] == 200
    server.stop()
    assert len(acked) >= KILLS  # the loop did write
    assert cli(project, "train-head").returncode == 0  # the next training succeeds


def test_eight_clients_at_once_get_no_5xx_and_lose_no_decision(project):
    names = [n for n in _photos(project) if "really_tigger" not in n and "/spare" not in n]
    shas = {n: hashlib.sha256((project / n).read_bytes()).hexdigest() for n in names}  # as the app names them
    server = Server(project)
    statuses: list[int] = []
    uploaded: dict[str, str] = {}  # sha256 -> class of every photo sent whose answer said added or duplicate
    sent: list[str] = []
    counter = iter(range(10**6))
    lock = threading.Lock()
    last: dict[str, str] = {}
    gone: list[str] = []  # decisions answered 404: photos an earlier decision excluded from the cache
    deadline = time.monotonic() + CLIENT_SECONDS

    errors: list[str] = []  # a 5xx raises in the client's thread (tests/_server.py): kept, not lost with it

    def client(index: int):
        try:
            requests(index)
        except Exception as error:  # noqa: BLE001
            errors.append(f"client {index}: {error}"[:3000])

    def requests(index: int):
        rng = random.Random(SEED + index)
        mine = names[index::CLIENTS]  # each client decides its own photos: the last word per photo is known
        while time.monotonic() < deadline:
            kind = rng.choice(["predict", "decide", "decide", "review", "label", "retrain", "upload", "upload"]
                              + (["rename"] if index == 0 else []))
            if kind == "upload":
                with lock:
                    batch = [_new_photo(next(counter)) for _ in range(rng.randint(1, 4))]
                sent.extend(hashlib.sha256(data).hexdigest() for _, data in batch)
                cls = rng.choice(["misty", "tigger", "neither"])
                status, _ = server.upload(f"/api/classes/{cls}/photos", batch, field="files", token=True)
                if status == 200:
                    uploaded.update({p["sha256"]: cls for p in _["photos"]})
            elif kind == "rename":
                now = next(n for n in ("spare", "spare2") if (project / "photos" / n).is_dir())
                status, _ = server.send("PATCH", f"/api/classes/{now}", {"name": "spare2" if now == "spare" else "spare"})
            elif kind == "predict":
                photo = project / rng.choice(names)
                status, _ = server.upload("/api/predict", [(photo.name, photo.read_bytes())])
            elif kind == "decide":
                name = rng.choice(mine)
                action = _action(rng, name, names)
                status, _ = server.json("/api/decide", {"sha256": shas[name], "action": action})
                if status == 200:
                    last[name] = action
                elif status == 404:
                    gone.append(name)
            elif kind == "retrain":
                status, _ = server.json("/api/retrain", {})
            else:
                status, _ = server.json(f"/api/{kind}")
            statuses.append(status)
            if status == 400:
                refusals.append(f"{kind}: {_}")

    refusals: list[str] = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{CLIENTS} clients, {CLIENT_SECONDS} s: {len(statuses)} requests, statuses "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }")
    assert not errors, errors[0]
    assert not refusals, refusals[:3]
    assert statuses and all(s < 500 for s in statuses) and set(statuses) <= {200, 404, 409}
    assert server.json("/api/health")[0] == 200
    server.stop()
    assert sent and sorted(uploaded) == sorted(set(sent))  # every photo sent is accounted for
    on_disk = _whole_photos(project / "photos")
    assert all(sha in on_disk and on_disk[sha].parent.name == cls for sha, cls in uploaded.items())
    print(f"{len(set(sent))} photos uploaded, renames: {statuses.count(200)} answers 200 in all")
    written = {r["path"]: r["action"] for r in _rows(project)}
    assert last and all(written[n] == a for n, a in last.items())
    assert [n for n in gone if written.get(n) != "exclude"] == [] and statuses.count(404) == len(gone)
    assert cli(project, "features").returncode == 0  # the folder and the cache agree
    table = cached_table(params_mod.load(project / "params.yaml"), project)
    excluded = sum(a == "exclude" for a in written.values())
    assert len(table.paths) == len(_photos(project)) + 10 - excluded > 0  # every photo kept, and the 10 to label


def _new_photo(index: int) -> tuple[str, bytes]:
    import io

    import numpy as np
    from PIL import Image

    colour = list(CLASS_COLOURS.values())[index % 3]
    rng = np.random.default_rng(500_000 + index)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"new_{index}.png", buffer.getvalue()


def _whole_photos(root: Path) -> dict[str, Path]:
    """sha256 -> file of every photo where the scan looks; each written by the app must be whole."""
    found = {}
    for path in root.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if len(path.stem) == 64:  # named by the app: the name is the content's hash, or the photo is torn
            assert path.stem == sha, f"{path} is not whole"
        found[sha] = path
    return found


def test_sigkill_during_uploads_renames_and_training_leaves_whole_photos_and_every_decision(tmp_path):
    """Uploads into classes, renames of one class back and forth, trainings, killed at random points."""
    seed = SEED + 1
    print(f"upload kill loop seed {seed} (PHOTOHEAD_KILL_SEED={SEED} reruns it)")
    rng = random.Random(seed)
    project = write_project(tmp_path / "uploads")
    spare = project / "photos" / "spare"
    for i in range(12):
        make_image(spare / f"spare_{i:02d}.png", CLASS_COLOURS["neither"], 600_000 + i)
    decided = "spare_00.png"
    corrections.record(project / "corrections.csv", [corrections.Correction(f"photos/spare/{decided}", "exclude")])
    acked: dict[str, str] = {}  # sha256 -> class, of every photo an answer said is in (added or duplicate)
    counter = iter(range(10**6))
    for kill in range(KILLS):
        server = Server(project)
        rows = corrections.read(project / "corrections.csv")
        named = [key for key in rows if key.endswith(decided)]
        assert len(named) == 1, f"kill {kill}: the decision is named {len(named)} times after a restart: {named}"
        failures: list[str] = []
        stop = threading.Event()

        def hands():
            while not stop.is_set():
                roll = rng.random()
                try:
                    if roll < 0.6:
                        cls = rng.choice(["misty", "tigger", "neither"])
                        batch = [_new_photo(next(counter)) for _ in range(rng.randint(1, 6))]
                        status, body = server.upload(f"/api/classes/{cls}/photos", batch, field="files", token=True)
                        if status == 200:
                            for photo in body["photos"]:
                                acked[photo["sha256"]] = cls
                    elif roll < 0.85:
                        now = next(n for n in ("spare", "spare2") if (project / "photos" / n).is_dir())
                        server.send("PATCH", f"/api/classes/{now}", {"name": "spare2" if now == "spare" else "spare"})
                    else:
                        server.send("POST", "/api/train")
                except (OSError, http.client.HTTPException, StopIteration):  # the kill cut the connection
                    return
                except AssertionError as error:  # a 5xx
                    failures.append(f"kill {kill}: {error}"[:3000])
                    return

        worker = threading.Thread(target=hands)
        worker.start()
        time.sleep(rng.uniform(0.3, 3.0))
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        stop.set()
        worker.join(30)
        assert not failures, failures[0]
        photos = _whole_photos(project / "photos")
        lost = [sha for sha in acked if sha not in photos]
        assert not lost, f"kill {kill}: {len(lost)} acknowledged photos missing"
        folders = [n for n in ("spare", "spare2") if (project / "photos" / n).is_dir()]
        assert len(folders) == 1 and len(list((project / "photos" / folders[0]).iterdir())) == 12
        rows = corrections.read(project / "corrections.csv")
        assert rows.get(f"photos/{folders[0]}/{decided}", corrections.Correction("", "")).action == "exclude", \
            f"kill {kill}: the decision on {decided} is lost"
        print(f"kill {kill}: {len(acked)} photos acknowledged, the spare class is {folders[0]}")
    assert len(acked) >= KILLS
    server = Server(project)
    job = server.send("POST", "/api/train")
    if job[0] == 409:  # the start's own first training runs
        job = (202, {"job": server.json("/api/train")[1]["job"]["id"]})
    finished = server.wait_job(job[1]["job"])
    server.stop()
    assert finished["state"] == "done", finished["message"]
    assert cli(project, "features").returncode == 0  # the folder and the cache agree
    table = cached_table(params_mod.load(project / "params.yaml"), project)
    assert len(table.paths) == len(_whole_photos(project / "photos")) - 1 + 10  # the excluded one; to label
