"""The app under load: 8 concurrent clients send 1,000 photos over loopback; every answer checked.

    .venv/bin/python bench/serve.py [--work DIR] [--clients 8] [--photos 1000]

The project: cat_breeds_web5 with the default params (EfficientNet-Lite0, head), trained first. The
photos sent: the 1,000 of dogs_vs_cats_1k, none of them in the project's cache, so every request
runs the backbone. Two servers, ``python -m pipeline serve`` as a user starts it: the default
(``serve.batch: 32``: requests that arrive together share a backbone call) and ``serve.batch: 1``
(one request at a time), sent the photos in alternating passes. Each client keeps one connection
and POSTs raw photo bytes to ``/api/predict``, one photo per request.
- requests/s of each pass (and the median per server), p50/p95/p99 latency over every request;
- every answer compared with ``python -m pipeline predict --format json`` on the same files: the same
  answer and top-k labels, probabilities within 1e-5; none may be lost or wrong;
- the server's resident memory (``/proc/PID/status``: VmRSS, VmHWM) after each quarter of a first
  pass, then after each further pass of the same 1,000 photos (``--passes``): memory must not grow
  with requests;
- Retrain after one relabel from the review page, as the app runs it (in its own process).
Raw numbers: bench/results/serve.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _photos import DATASETS, require  # noqa: E402

DEFAULT_BATCH = 32  # serve.batch's default


def memory_mb(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def start(project: Path, env: dict, batch: int) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--set", "serve.port=0", "--set",
                               f"serve.batch={batch}"], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    while True:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError("serve exited before listening")
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return server, int(found.group(1))


def send_all(port: int, files: list[Path], clients: int, answers: dict, latencies: list, checkpoints=None):
    """Send every file once, ``clients`` at a time; ``checkpoints``: {count: callback} run when reached."""
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
            body = path.read_bytes()
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


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="keep the project (cache, model) here (default: a temporary one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=4, help="passes over the photos (memory after each)")
    args = parser.parse_args()
    require(DATASETS)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    files = sorted(p for p in (DATASETS / "dogs_vs_cats_1k").rglob("*") if p.is_file())[:args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.work or tmp)
        project.mkdir(parents=True, exist_ok=True)
        (project / "params.yaml").write_text(json.dumps({"data": {"root": str(DATASETS / "cat_breeds_web5")}}))
        subprocess.run([sys.executable, "-m", "pipeline", "train-head", "--with-upstream"], cwd=project, env=env,
                       check=True, capture_output=True)
        expected = {}
        for start_at in range(0, len(files), 250):  # predict as a user runs it, on the same files
            out = subprocess.run([sys.executable, "-m", "pipeline", "predict", *map(str, files[start_at:start_at + 250]),
                                  "--format", "json"], cwd=project, env=env, check=True, capture_output=True, text=True)
            expected.update({a["path"]: a for a in json.loads(out.stdout)})
        servers = {batch: start(project, env, batch) for batch in (1, DEFAULT_BATCH)}
        runs = {batch: [] for batch in servers}  # per pass: (answers, seconds, errors, latencies)
        memory = {}
        try:
            pid = servers[DEFAULT_BATCH][0].pid
            memory["idle"] = memory_mb(pid)
            quarter = len(files) // 4
            for n in range(1, args.passes + 1):
                for batch, (server, port) in servers.items():  # alternating: the machine's drift hits both alike
                    checkpoints = {quarter * q: (lambda q=q: memory.__setitem__(f"after {quarter * q}", memory_mb(pid)))
                                   for q in (1, 2, 3)} if n == 1 and batch == DEFAULT_BATCH else None
                    answers, latencies = {}, []
                    seconds, errors = send_all(port, files, args.clients, answers, latencies, checkpoints)
                    runs[batch].append((answers, seconds, errors, latencies))
                memory[f"after pass {n} ({n * len(files)})"] = memory_mb(pid)
            retrain = retrain_after_a_relabel(servers[DEFAULT_BATCH][1])
            memory["after a retrain"] = memory_mb(pid)
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait()
    wrong, lost, errors = [], 0, []
    for batch, passes in runs.items():
        for answers, _, errs, _ in passes:
            lost += len(files) - len(answers)
            errors += errs
            for name, got in answers.items():
                want = expected[name]
                same = got["answer"] == want["answer"] and [p["label"] for p in got["predictions"]] == \
                    [p["label"] for p in want["predictions"]] and all(
                        abs(a["probability"] - b["probability"]) <= 1e-5
                        for a, b in zip(got["predictions"], want["predictions"]))
                if not same:
                    wrong.append((batch, name))

    def summary(passes):
        latencies = sorted(x for _, _, _, lat in passes for x in lat)
        q = statistics.quantiles(latencies, n=100)
        rates = [len(files) / seconds for _, seconds, _, _ in passes]
        return {"requests_per_second": rates, "median_requests_per_second": statistics.median(rates),
                "latency_ms": {"p50": 1000 * q[49], "p95": 1000 * q[94], "p99": 1000 * q[98]}}

    result = {"command": f"bench/serve.py --clients {args.clients} --photos {len(files)} --passes {args.passes}",
              "photos": len(files), "clients": args.clients, "passes": args.passes,
              "batched": summary(runs[DEFAULT_BATCH]), "one_at_a_time": summary(runs[1]),
              "requests": sum(len(a) for passes in runs.values() for a, _, _, _ in passes), "lost": lost,
              "errors": errors, "wrong": wrong, "memory_mb": memory, "retrain": retrain,
              "unknown_answers": sum(a["answer"] == "unknown" for a in runs[DEFAULT_BATCH][0][0].values())}
    result["speedup_of_batching"] = (result["batched"]["median_requests_per_second"] /
                                     result["one_at_a_time"]["median_requests_per_second"])
    out = ROOT / "bench" / "results" / "serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    b, o = result["batched"], result["one_at_a_time"]
    print(f"\n{len(files)} photos x {args.passes} passes, {args.clients} clients: serve.batch {DEFAULT_BATCH} "
          f"{b['median_requests_per_second']:.1f} requests/s (median), p50/p95/p99 {b['latency_ms']['p50']:.0f}/"
          f"{b['latency_ms']['p95']:.0f}/{b['latency_ms']['p99']:.0f} ms; serve.batch 1 "
          f"{o['median_requests_per_second']:.1f} requests/s, p50/p95/p99 {o['latency_ms']['p50']:.0f}/"
          f"{o['latency_ms']['p95']:.0f}/{o['latency_ms']['p99']:.0f} ms; batching {result['speedup_of_batching']:.2f}x; "
          f"lost {lost}, wrong {len(wrong)}, errors {len(errors)}; memory (RSS MB) "
          + ", ".join(f"{k}: {v['VmRSS']:.0f}" for k, v in memory.items())
          + f"; retrain after a relabel {retrain['wall_seconds']:.2f} s (val accuracy {retrain['val_accuracy_before']} -> "
            f"{retrain['val_accuracy_after']})")


if __name__ == "__main__":
    main()
