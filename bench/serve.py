"""The app under load: 8 concurrent clients send 1,000 photos over loopback; every answer checked.

    .venv/bin/python bench/serve.py [--work DIR] [--clients 8] [--photos 1000]

The project: cat_breeds_web5 with the default params (EfficientNet-Lite0, head), trained first. The
photos sent: the 1,000 of dogs_vs_cats_1k, none of them in the project's cache, so every request
runs the backbone. The server is ``python -m pipeline serve`` as a user starts it; each client keeps
one connection and POSTs raw photo bytes to ``/api/predict``, one photo per request.
- requests/s over the whole run, and p50/p95/p99 latency of the requests;
- every answer compared with ``python -m pipeline predict --format json`` on the same files: the same
  answer and top-k labels, probabilities within 1e-5; none may be lost or wrong;
- the server's resident memory (``/proc/PID/status``: VmRSS, VmHWM) after each quarter of a first
  pass, then after each further pass of the same 1,000 photos (``--passes``): memory must not grow
  with requests;
- Retrain after one relabel from the review page, as the app runs it (in its own process).
With ``--live 300``, instead: the Try page's live preview as one client runs it: 640 x 480 webcam-sized
JPEG frames (the photos of dogs_vs_cats_1k, resized), one request at a time, answers per second and
the latency of each (target: at least 10 answers a second, p95 at most 100 ms). Raw: serve_live.json.
With ``--cache-sizes 1000 4000``, instead: the app's memory against the number of photos in its
cache (bench/scale.py's copies of both shared sets), idle and after 200 requests.
Raw numbers: bench/results/serve.json (serve_sizes.json).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import DATASETS, ROOT, require  # noqa: E402


def memory_mb(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    out = {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}
    out["threads"] = int(fields["Threads"])
    return out


def start(project: Path, env: dict) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--set", "serve.port=0"], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    while True:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("serve exited before listening")
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return server, int(found.group(1))


def send_all(port: int, files: list[Path], clients: int, answers: dict, latencies: list, checkpoints=None,
             tail: bytes = b""):
    """Send every file once, ``clients`` at a time; ``checkpoints``: {count: callback} run when reached;
    ``tail``: bytes appended to each photo (the same pixels, another sha256: never in a cache)."""
    queue = list(enumerate(files))
    lock = threading.Lock()
    done = [0]
    errors = []

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not queue:
                    break
                i, path = queue.pop(0)
            body = path.read_bytes() + tail
            started = time.perf_counter()
            connection.request("POST", f"/api/predict?name={path.name}", body, {"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            text = response.read()
            latency = time.perf_counter() - started
            with lock:
                latencies.append(latency)
                if response.status != 200:
                    errors.append((str(path), response.status, text[:200]))
                else:
                    answers[str(path)] = json.loads(text)[0]
                done[0] += 1
                callback = (checkpoints or {}).get(done[0])
            if callback:
                callback()
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, errors


def retrain_after_a_relabel(port: int) -> dict:
    """Relabel the first label issue as suggested, as the review page does, then time Retrain (the features
    stage, which finds every photo cached, and the head, in the app's process)."""
    def call(method, path, payload=None, token=None):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        headers = {"Content-Type": "application/json", **({"X-CSRF-Token": token} if token else {})}
        connection.request(method, path, json.dumps(payload).encode() if payload is not None else None, headers)
        response = connection.getresponse()
        return response.read().decode()

    token = re.search(r'name="csrf" content="([^"]+)"', call("GET", "/review")).group(1)
    issue = json.loads(call("GET", "/api/review"))["label_issues"][0]
    call("POST", "/api/decide", {"sha256": issue["sha256"], "action": "relabel", "label": issue["suggested"]}, token)
    started = time.perf_counter()
    result = json.loads(call("POST", "/api/retrain", {}, token))
    return {**result, "wall_seconds": time.perf_counter() - started}


def memory_by_cache_size(args) -> None:
    from scale import make_photos  # copies of both shared sets, as bench/scale.py makes them

    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    files = sorted(p for p in (DATASETS / "dogs_vs_cats_1k").rglob("*") if p.is_file())[:200]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for n in args.cache_sizes:
            project = work / f"cache_{n}"
            if not (project / "photos").is_dir():
                make_photos(project / "photos", n)
            (project / "params.yaml").write_text(json.dumps({"data": {"root": "photos"}}))
            subprocess.run([sys.executable, "-m", "pipeline", "train-head", "--with-upstream"], cwd=project, env=env,
                           check=True, capture_output=True)
            server, port = start(project, env)
            try:
                idle = memory_mb(server.pid)
                answers, latencies = {}, []
                send_all(port, files, args.clients, answers, latencies, tail=b"sent-by-bench")  # through the backbone
                rows[n] = {"idle": idle, "after 200 requests": memory_mb(server.pid), "answered": len(answers)}
            finally:
                server.terminate()
                server.wait()
            print(n, json.dumps(rows[n]), flush=True)
    out = ROOT / "bench" / "results" / "serve_sizes.json"
    out.write_text(json.dumps({"command": f"bench/serve.py --cache-sizes {' '.join(map(str, args.cache_sizes))}",
                               "sizes": rows}, indent=2))
    print("| photos in the cache | RSS idle | RSS after 200 requests |\n|---|---|---|")
    for n, row in rows.items():
        print(f"| {n:,} | {row['idle']['VmRSS']:.0f} MB | {row['after 200 requests']['VmRSS']:.0f} MB |")


def live_preview(port: int, files: list[Path], frames: int) -> dict:
    """One client, one frame at a time, as the page's live preview sends them."""
    import io

    from PIL import Image

    encoded = []
    for path in files[:frames]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((640, 480)).save(buffer, format="JPEG", quality=85)
        encoded.append(buffer.getvalue())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, answers = [], 0
    for warm in encoded[:5]:  # the first requests open the backbone
        connection.request("POST", "/api/predict?top_k=3", body=warm, headers={"Content-Type": "image/jpeg"})
        connection.getresponse().read()
    started = time.perf_counter()
    for frame in encoded:
        sent = time.perf_counter()
        connection.request("POST", "/api/predict?top_k=3", body=frame, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        body = response.read()
        latencies.append(time.perf_counter() - sent)
        answers += response.status == 200 and bool(json.loads(body)[0]["answer"])
    seconds = time.perf_counter() - started
    q = statistics.quantiles(sorted(latencies), n=100)
    return {"command": f"bench/serve.py --live {frames}", "frames": len(encoded), "frame_size": "640x480 JPEG q85",
            "answered": answers, "answers_per_second": len(encoded) / seconds,
            "latency_ms": {"p50": 1000 * statistics.median(latencies), "p95": 1000 * q[94], "max": 1000 * max(latencies)}}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="keep the project (cache, model) here (default: a temporary one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=4, help="passes over the photos (memory after each)")
    parser.add_argument("--live", type=int, default=0, help="measure the live preview on this many frames instead")
    parser.add_argument("--cache-sizes", type=int, nargs="*", default=None,
                        help="measure the app's memory against the photos in its cache instead")
    args = parser.parse_args()
    require(DATASETS)
    if args.cache_sizes:
        return memory_by_cache_size(args)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    files = sorted(p for p in (DATASETS / "dogs_vs_cats_1k").rglob("*") if p.is_file())[:args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.work or tmp)
        project.mkdir(parents=True, exist_ok=True)
        (project / "params.yaml").write_text(json.dumps({"data": {"root": str(DATASETS / "cat_breeds_web5")}}))
        subprocess.run([sys.executable, "-m", "pipeline", "train-head", "--with-upstream"], cwd=project, env=env,
                       check=True, capture_output=True)
        if args.live:
            server, port = start(project, env)
            try:
                live = live_preview(port, files, args.live)
            finally:
                server.terminate()
                server.wait()
            (ROOT / "bench" / "results" / "serve_live.json").write_text(json.dumps(live, indent=2))
            print(json.dumps(live, indent=2))
            print(f"\nlive preview: {live['answers_per_second']:.1f} answers/s, p50 {live['latency_ms']['p50']:.0f} ms, "
                  f"p95 {live['latency_ms']['p95']:.0f} ms per 640 x 480 frame")
            return
        expected = {}
        for start_at in range(0, len(files), 250):  # predict as a user runs it, on the same files
            chunk = [str(f) for f in files[start_at:start_at + 250]]
            out = subprocess.run([sys.executable, "-m", "pipeline", "predict", *chunk, "--format", "json"], cwd=project,
                                 env=env, check=True, capture_output=True, text=True)
            expected.update({a["path"]: a for a in json.loads(out.stdout)})
        server, port = start(project, env)
        try:
            memory = {"idle": memory_mb(server.pid)}
            quarter = len(files) // 4
            checkpoints = {quarter * q: (lambda q=q: memory.__setitem__(f"after {quarter * q}", memory_mb(server.pid)))
                           for q in (1, 2, 3, 4)}
            answers, latencies = {}, []
            seconds, errors = send_all(port, files, args.clients, answers, latencies, checkpoints)
            later = []
            for n in range(2, args.passes + 1):
                again, again_latencies = {}, []
                later.append((again, *send_all(port, files, args.clients, again, again_latencies)))
                memory[f"after pass {n} ({n * len(files)})"] = memory_mb(server.pid)
            retrain = retrain_after_a_relabel(port)
            memory["after a retrain"] = memory_mb(server.pid)
        finally:
            server.terminate()
            server.wait()
    wrong = []
    for name, got in list(answers.items()) + [item for again, _, _ in later for item in again.items()]:
        want = expected[name]
        same = got["answer"] == want["answer"] and [p["label"] for p in got["predictions"]] == \
            [p["label"] for p in want["predictions"]] and all(
                abs(a["probability"] - b["probability"]) <= 1e-5
                for a, b in zip(got["predictions"], want["predictions"]))
        if not same:
            wrong.append(name)
    q = statistics.quantiles(sorted(latencies), n=100)
    result = {"command": f"bench/serve.py --clients {args.clients} --photos {len(files)}", "photos": len(files),
              "clients": args.clients, "seconds": seconds, "requests_per_second": len(files) / seconds,
              "latency_ms": {"p50": 1000 * q[49], "p95": 1000 * q[94], "p99": 1000 * q[98]},
              "later_passes": [{"seconds": t, "requests_per_second": len(files) / t, "answered": len(a)}
                               for a, t, _ in later],
              "answered": len(answers), "errors": errors + [e for _, _, errs in later for e in errs],
              "wrong": wrong, "memory_mb": memory,
              "unknown_answers": sum(a["answer"] == "unknown" for a in answers.values()), "retrain": retrain}
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    lost = len(files) * args.passes - len(answers) - sum(len(a) for a, _, _ in later)
    print(f"\n{len(files)} photos, {args.clients} clients: {result['requests_per_second']:.1f} requests/s; latency "
          f"p50 {result['latency_ms']['p50']:.0f} ms, p95 {result['latency_ms']['p95']:.0f} ms, p99 "
          f"{result['latency_ms']['p99']:.0f} ms; lost {lost}, wrong {len(wrong)}; memory (RSS MB) "
          + ", ".join(f"{k}: {v['VmRSS']:.0f}" for k, v in memory.items())
          + f"; retrain after a relabel {retrain['wall_seconds']:.2f} s (val accuracy "
            f"{retrain['val_accuracy_before']} -> {retrain['val_accuracy_after']})")


if __name__ == "__main__":
    main()
