"""The app (``python -m pipeline serve``), as a real server process on a loopback port, over real HTTP."""
import csv
import io
import json
import re
import threading

import numpy as np
import pytest
import yaml
from _server import Server
from PIL import Image

from pipeline import params as params_mod
from pipeline.app import active
from pipeline.data import corrections
from pipeline.project import open_project
from pipeline.stages import ladder

from conftest import CLASS_COLOURS, cached_table, cli, make_dataset, make_image

PLANTED = "photos/misty/really_tigger.png"  # a tigger-coloured photo filed under misty


def write_project(folder):
    make_dataset(folder / "photos", per_class=14)
    make_image(folder / PLANTED, CLASS_COLOURS["tigger"], 90_001)
    for i in range(10):
        colour = list(CLASS_COLOURS.values())[i % 3]
        make_image(folder / "to_label" / f"new_{i:02d}.png", colour, 91_000 + i)
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "data": {"root": "photos", "unlabelled": "to_label", "train_fraction": 0.6, "val_fraction": 0.2,
                 "test_fraction": 0.2},
        "features": {"backbone": "tiny", "batch_size": 8},
        "serve": {"max_upload_mb": 1},
    }))
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    project = write_project(tmp_path_factory.mktemp("served"))
    assert cli(project, "all").returncode == 0  # the report exists, as after 'make demo'
    server = Server(project)
    yield server
    server.stop()


def photo_bytes(path):
    return path.read_bytes()


def predict_cli(project, files):
    result = cli(project, "predict", *map(str, files), "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def without_path(answers):
    return [{k: v for k, v in a.items() if k not in ("path", "sha256", "neighbours")} for a in answers]


def test_the_api_answers_as_predict_does(served, tmp_path):
    project = served.project
    fresh = make_image(tmp_path / "fresh.png", CLASS_COLOURS["neither"], 95_000)
    odd = tmp_path / "odd.png"  # unlike any training photo: answered unknown
    Image.fromarray(np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (40, 1))).convert("RGB").save(odd)
    files = [project / "photos" / "misty" / "misty_00.png", fresh, odd]
    status, answers = served.upload("/api/predict", [(f.name, photo_bytes(f)) for f in files])
    assert status == 200
    assert [a["path"] for a in answers] == [f.name for f in files]
    assert without_path(answers) == without_path(predict_cli(project, files))
    assert answers[0]["cached"] and not answers[1]["cached"]
    # raw bytes, and the neighbours the try page shows
    status, _, text = served.request("/api/predict?neighbours=3", photo_bytes(fresh), {"Content-Type": "image/png"},
                                     "POST")
    raw = json.loads(text)
    assert status == 200 and without_path(raw) == without_path(answers[1:2])
    assert len(raw[0]["neighbours"]) == 3
    assert all(re.fullmatch(r"[0-9a-f]{64}", n["sha256"]) for n in raw[0]["neighbours"])
    assert raw[0]["neighbours"][0]["label"] == "neither"  # a neither-coloured photo is nearest neither photos
    status, _, body = served.request(f"/photo/{raw[0]['neighbours'][0]['sha256']}?size=96")
    assert status == 200 and body  # the neighbour's thumbnail, by content hash


def test_the_api_gives_as_many_labels_as_top_k_asks(served):
    """Each top_k gives that many labels, the most probable first, as predict --top-k does; the default is
    predict.top_k's (3), and more than there are classes gives them all."""
    photo = served.project / "photos" / "tigger" / "tigger_00.png"
    for top_k, wanted in ((None, 3), (1, 1), (2, 2), (50, 3)):
        query = "" if top_k is None else f"?top_k={top_k}"
        status, answers = served.upload(f"/api/predict{query}", [(photo.name, photo_bytes(photo))])
        listed = [p["probability"] for p in answers[0]["predictions"]]
        assert status == 200 and len(listed) == wanted and listed == sorted(listed, reverse=True), top_k
        wanted_by_cli = ["--top-k", str(top_k)] if top_k else []
        result = cli(served.project, "predict", str(photo), "--format", "json", *wanted_by_cli)
        assert without_path(answers) == without_path(json.loads(result.stdout)), top_k


def test_health_names_the_model_backbone_and_classes(served):
    status, health = served.json("/api/health")
    assert status == 200
    assert health["backbone"] == "tiny" and health["classes"] == ["misty", "neither", "tigger"]
    assert health["rung"] == "head" and re.fullmatch(r"[0-9a-f]{64}", health["model_key"])


OUTSIDE = re.compile(r"(?:https?:)?//(?!localhost\b|127\.0\.0\.1\b)[a-z0-9.-]+\.[a-z]{2,}", re.I)


def test_no_page_or_asset_names_an_outside_host(served):
    from pipeline.app import server

    checked = []
    for path in ["/", "/review", "/label", "/report", "/photos?true=misty&predicted=misty", "/api/openapi.json",
                 *[f"/static/{p.name}" for p in server.STATIC.iterdir() if not p.name.endswith(".html")]]:
        status, headers, body = served.get(path)
        assert status == 200, path
        found = [m for m in OUTSIDE.findall(body) if "w3.org" not in m]  # SVG/XML namespaces name no host to fetch
        assert not found, f"{path} names {found}"
        checked.append(path)
    assert len(checked) >= 9
    assert OUTSIDE.search("https://cdn.example.com/x.js") and OUTSIDE.search("//fonts.example.org/a.woff2")
    for online in ("/docs", "/redoc"):  # FastAPI's Swagger and ReDoc pages load their scripts from a CDN: off
        assert served.get(online)[0] == 404


def test_a_foreign_host_or_origin_is_refused(served):
    assert served.get("/api/health", Host="evil.example:%d" % served.port)[0] == 400  # DNS rebinding
    assert served.get("/api/health", Host="localhost:%d" % served.port)[0] == 200
    sha = _sha_of(served.project, "misty/misty_03.png")
    decision = {"sha256": sha, "action": "keep"}
    assert served.json("/api/decide", decision, token=False)[0] == 403  # no token: not from the app's pages
    status, body = served.json("/api/decide", decision, Origin="http://evil.example")
    assert status == 403 and "evil.example" in body["error"]
    assert served.json("/api/decide", decision, **{"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert served.json("/api/retrain", {}, token=False)[0] == 403
    assert served.json("/api/decide", {"path": "photos/misty/misty_03.png", "action": "exclude"})[0] == 422
    assert corrections.read(served.project / "corrections.csv").get("photos/misty/misty_03.png") is None
    for bad in ("../../etc/passwd", "..%2F..%2Fparams.yaml", "0" * 64):
        assert served.get(f"/photo/{bad}")[0] in (400, 404)


def test_bad_uploads_get_one_line_and_the_server_keeps_serving(served, tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(jpeg, "JPEG")
    bomb = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(bomb, "PNG", optimize=True)
    cases = {"notes.txt": (b"not a photo at all\n", "not an image"),
             "cut.jpg": (jpeg.getvalue()[:len(jpeg.getvalue()) // 3], "truncated"),
             "bomb.png": (bomb.getvalue(), "decompression bomb")}
    for name, (data, reason) in cases.items():
        status, body = served.upload("/api/predict", [(name, data)])
        assert status == 400 and list(body) == ["error"], name
        assert body["error"].startswith(f"{name}: ") and reason in body["error"] and "\n" not in body["error"]
    too_big = {"error": "request body over 1 MB (serve.max_upload_mb)"}
    over = 1024 * 1024 + 10
    # refused from the declared length, before the body is read
    assert raw_post(served.port, {"Content-Length": str(over)}, [b"\xff" * 65536]) == (413, too_big)
    # no declared length (chunked): refused once that many bytes have arrived
    chunks = [b"%x\r\n" % 65536 + b"\xff" * 65536 + b"\r\n"] * 17 + [b"0\r\n\r\n"]
    assert raw_post(served.port, {"Transfer-Encoding": "chunked"}, chunks) == (413, too_big)
    assert served.get("/api/health")[0] == 200


def raw_post(port, headers, chunks):
    """(status, JSON body) of a POST to /api/predict sent by hand: the server may answer and close before
    the whole body is sent, as it should for one too large."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"127.0.0.1:{port}", "Content-Type": "image/jpeg",
                                                     **headers}.items())
        sock.sendall(f"POST /api/predict HTTP/1.1\r\n{head}\r\n".encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
                if b"\r\n\r\n" in received and received.split(b"\r\n\r\n", 1)[1].endswith(b"}"):
                    break
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _sha_of(project, path):
    table = cached_table(params_mod.load(project / "params.yaml"), project)
    return table.sha256[table.paths.tolist().index(path)]


def test_two_tabs_deciding_at_once_lose_no_decision(served):
    names = [f"{c}/{c}_{i:02d}.png" for c in ("neither",) for i in range(4, 14)]
    shas = [_sha_of(served.project, n) for n in names]
    results = []

    def tab(chunk):
        for sha in chunk:
            results.append(served.json("/api/decide", {"sha256": sha, "action": "keep"})[0])

    tabs = [threading.Thread(target=tab, args=(shas[i::2],)) for i in range(2)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    assert results == [200] * len(names)
    made = corrections.read(served.project / "corrections.csv")
    assert all(made[f"photos/{n}"].action == "keep" for n in names)


def test_review_sends_a_page_of_each_kind_and_counts_them_all(served):
    status, whole = served.review("?limit=5000")
    status_one, page = served.review("?limit=1")
    assert status == status_one == 200
    for kind in ("label_issues", "near_duplicates", "outliers"):
        assert page[kind] == whole[kind][:1] and page["totals"][kind] == whole["totals"][kind] == len(whole[kind])
    assert sum(whole["totals"].values()) > 1  # the page is smaller than the whole here
    assert served.review("?limit=0")[0] == 422


def test_review_offers_the_classes_the_model_finds_likely_for_each_photo(served):
    """The relabel keys 1-9 are the model's most likely classes for the photo, best first (they were the first
    nine classes by name: at 102 classes, Faces, Faces_easy, Leopards, ... for every photo)."""
    _, review = served.review("?limit=5000")
    items = [f for kind in ("label_issues", "near_duplicates", "outliers") for f in review[kind]]
    assert items
    for f in items[:6]:
        photo = (served.project / "photos" / f["path"]).read_bytes()
        _, [answer] = served.upload("/api/predict?top_k=3", [(f["path"], photo)])
        assert f["likely"] == [p["label"] for p in answer["predictions"]], f["path"]


def test_findings_are_computed_in_the_background_with_a_notice(served):
    status, first = served.json("/api/review")
    assert status == 200 and ("computing" in first)  # answered at once, computing or done
    assert served.review("")[1]["computing"] is False


def test_a_relabel_from_the_review_page_is_used_by_the_next_train_head(served):
    status, review = served.review("")
    assert status == 200
    planted = [f for f in review["label_issues"] if f["path"] == PLANTED.removeprefix("photos/")]
    assert planted and planted[0]["suggested"] == "tigger"
    assert all(n["label"] == "tigger" for n in planted[0]["neighbours_suggested"])
    # the photo in question is never shown as its own neighbour (it would read as evidence for its label)
    shown = planted[0]["neighbours_given"] + planted[0]["neighbours_suggested"]
    assert planted[0]["neighbours_given"] and all(n["sha256"] != planted[0]["sha256"] for n in shown)
    status, done = served.json("/api/decide", {"sha256": planted[0]["sha256"], "action": "relabel", "label": "tigger"})
    assert status == 200 and done["path"] == PLANTED
    with open(served.project / "corrections.csv", newline="") as f:
        assert {"path": PLANTED, "action": "relabel", "label": "tigger", "note": ""} in list(csv.DictReader(f))
    status, after = served.review("")
    assert PLANTED.removeprefix("photos/") not in [f["path"] for f in after["label_issues"]]  # decided: gone
    status, retrained = served.json("/api/retrain", {})
    assert status == 200 and retrained["trained"]
    # the report describes the model now served (it once stayed the previous model's until 'make evaluate')
    run_info = json.loads((served.project / "reports" / "run.json").read_text())
    assert run_info["model"]["key"] == served.json("/api/health")[1]["model_key"]
    result = cli(served.project, "train-head")  # the next train-head: the model the app trained, with the relabel
    assert result.returncode == 0 and "train_head: cache hit" in result.stderr
    params = params_mod.load(served.project / "params.yaml")
    table = cached_table(params, served.project)  # the labels these params give now
    labels = dict(zip(table.paths.tolist(), table.labels.tolist()))
    assert labels["misty/really_tigger.png"] == "tigger"
    assert (served.project / PLANTED).is_file()  # the photo itself never moved


def test_the_label_page_order_and_retrain(served):
    status, queue = served.json("/api/label")
    assert status == 200 and queue["remaining"] == 10 and len(queue["photos"]) == 10
    params = params_mod.load(served.project / "params.yaml")
    table = cached_table(params, served.project)
    splits, shas, x = table.splits, table.sha256, table.features.reshape(len(table.sha256), -1)
    pool, train = np.flatnonzero(splits == "unlabelled"), np.flatnonzero(splits == "train")
    # the order the tool's own function gives from the cache and the served model's probabilities
    _, health = served.json("/api/health")
    project = open_project(params, served.project)
    with ladder.chosen(project).load(project) as trained:
        proba, _ = trained.classifier.answer(x[pool].astype(np.float32))
    expected, regime = active.order(x[pool], x[train], 3, proba, batch=3)
    assert queue["regime"] == regime == "uncertain"  # 3+ labelled photos per class: uncertain ones, spread out
    assert [p["sha256"] for p in queue["photos"]] == [shas[pool[i]] for i in expected]
    margins = np.sort(proba, axis=1)[:, -1] - np.sort(proba, axis=1)[:, -2]
    assert margins[expected[3:]].tolist() == sorted(margins[expected[3:]])  # after the first batch: by margin
    first = queue["photos"][:2]
    for photo in first:
        label = photo["suggested"][0]["label"]
        assert served.json("/api/decide", {"sha256": photo["sha256"], "action": "relabel", "label": label})[0] == 200
    status, retrained = served.json("/api/retrain", {})
    assert status == 200 and retrained["train_photos_after"] == retrained["train_photos_before"] + 2
    assert {"val_accuracy_before", "val_accuracy_after", "seconds"} <= set(retrained)
    status, again = served.json("/api/label")
    assert again["remaining"] == 8 and not {p["sha256"] for p in first} & {p["sha256"] for p in again["photos"]}
    assert served.json("/api/health")[1]["unlabelled"] == 8 and health["unlabelled"] == 10


def test_report_cells_link_to_the_photos_they_count(served):
    status, _, page = served.get("/report")
    assert status == 200 and "data-true=" in page and "data-class=" in page
    with open(served.project / "reports" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = sum(r["actual"] == "misty" and r["predicted"] == "misty" for r in rows)
    status, _, photos = served.get("/photos?true=misty&predicted=misty")
    assert status == 200 and photos.count("<figure>") == wanted > 0
    assert served.get("/photos?cls=tigger")[0] == 200  # the links themselves: tests/test_browser.py


def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path):
    import socket

    project = write_project(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli(project, "serve", "--set", f"serve.port={port}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: serve: cannot listen on 127.0.0.1:{port} (Address "
                                                      "already in use); set serve.port to a free port (0: any)")
    assert not (project / "cache" / "features").exists()  # said before any work


def test_every_page_shares_one_layout_and_a_missing_report_is_a_page(served):
    navs = {}
    for path in ["/", "/review", "/label", "/photos?true=misty&predicted=misty"]:
        status, _, page = served.get(path)
        assert status == 200
        navs[path] = re.search(r"<nav>(.*?)</nav>", page).group(1)
        assert page.count("<nav>") == 1
    assert len({re.sub(r' class="here"', "", nav) for nav in navs.values()}) == 1  # the same links everywhere
    assert '<a class="here" href="/review">' in navs["/review"] and '<a class="here" href="/">' in navs["/"]
    report = served.project / "reports" / "index.html"
    report.rename(report.with_suffix(".away"))
    try:
        status, _, page = served.get("/report")
    finally:
        report.with_suffix(".away").rename(report)
    assert status == 404 and "<nav>" in page and "photohead evaluate" in page


def test_the_app_answers_phone_photos_as_predict_does(served, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    colour = np.clip(np.array(CLASS_COLOURS["tigger"]) + np.random.default_rng(3).normal(0, 20, (40, 48, 3)), 0, 255)
    array = colour.astype(np.uint8)
    heic, avif = tmp_path / "phone.heic", tmp_path / "phone.avif"
    pillow_heif.from_pillow(Image.fromarray(array)).save(heic, quality=90)
    Image.fromarray(array).save(avif, format="AVIF", quality=90)
    status, answers = served.upload("/api/predict", [(f.name, f.read_bytes()) for f in (heic, avif)])
    assert status == 200, answers
    assert without_path(answers) == without_path(predict_cli(served.project, [heic, avif]))
    assert [a["answer"] for a in answers] == ["tigger", "tigger"]
