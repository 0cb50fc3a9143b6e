"""The whole API as its own OpenAPI description documents it, fuzzed by schemathesis (its CLI, a real
HTTP server): every route, with the page's token so that state-changing routes are reached.

No 5xx, no hang (a response time limit), every status code and body as documented; afterwards the server
still answers, every photo is still in the project, nothing outside it was written, and its memory
stayed bounded."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _server import Server
from test_serve import write_project

from conftest import cli

EXAMPLES = 25  # per operation and phase: the run stays within about a minute on 2 cores


def _photos(project: Path) -> set[str]:
    """The content of every photo under data.root, the classes deleted into its .trash included."""
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (project / "photos").rglob("*") if p.is_file()}


def _outside(project: Path, reports: Path) -> dict[str, float]:
    """Every file beside the project (but the run's own reports): what the run must never touch."""
    return {str(p): p.stat().st_mtime_ns for p in project.parent.rglob("*")
            if p.is_file() and project not in p.parents and reports not in p.parents}


def _rss_kb(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS")).split()[1])


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    project = write_project(tmp_path_factory.mktemp("fuzzed"))
    assert cli(project, "all").returncode == 0
    server = Server(project)
    yield project, server
    server.stop()


def test_every_route_answers_as_documented_under_schemathesis(fuzzed, tmp_path):
    project, server = fuzzed
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        if os.environ.get("CI"):
            pytest.fail("schemathesis is missing in CI; make setup installs it (requirements.lock)")
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    # a training and an export first: their libraries (TensorFlow's converters) are loaded once, not growth
    for route in ("/api/train", "/api/export"):
        assert server.wait_job(server.send("POST", route)[1]["job"], 600)["state"] == "done"
    before, outside, rss_before = _photos(project), _outside(project, tmp_path), _rss_kb(server.process.pid)
    config = Path(__file__).with_name("schemathesis.toml")
    run = subprocess.run([st, "--config-file", str(config), "run", f"{server.url}/api/openapi.json", "--checks", "all",
                          "--header", f"X-CSRF-Token: {server.token}", "--header", f"Origin: {server.url}",
                          "--max-examples", str(EXAMPLES), "--generation-deterministic",  # the same cases every run
                          "--max-response-time", "30", "--request-timeout", "60", "--workers", "1",
                          "--report", "junit", "--report-dir", str(tmp_path), "--no-color"],
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + "".join(server.stderr)[-4000:]
    assert server.json("/api/health")[0] == 200  # still serving
    assert before <= _photos(project)  # every photo is still in the project (a deleted class's in .trash)
    assert _outside(project, tmp_path) == outside  # nothing written outside it
    assert not [p for p in (project / "photos").rglob("*") if p.is_file() and ".." in p.relative_to(project).parts]
    assert _rss_kb(server.process.pid) < rss_before + 300_000  # memory bounded (kB)
