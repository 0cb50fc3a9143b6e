"""Installed like an app: the wheel of this project gives a ``photohead`` command that runs every stage and
serve from any folder that holds a params file, with the package's own files (pages, params template)."""
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile

import pytest

from conftest import ROOT, make_dataset


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from the working tree and installed (without its dependencies, which the test
    environment has) under a prefix of its own: a console script and a package that is not the clone."""
    folder = tmp_path_factory.mktemp("install")
    source = folder / "source"  # what a clone holds (the build writes its build/ folder there, not here)
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\n")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(folder / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((folder / "dist").glob("photohead-*.whl"))
    prefix = folder / "prefix"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--prefix", str(prefix),
                           str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    site = next(prefix.glob("lib/python*/site-packages"))
    env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(site), "TQDM_DISABLE": "1",
           "TF_CPP_MIN_LOG_LEVEL": "3", "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    return wheel, prefix / "bin" / "photohead", site, env


def run(command, cwd, env, *args):
    return subprocess.run([str(command), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_the_wheel_is_named_photohead_and_carries_the_app(installed):
    wheel, command, site, env = installed
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("pipeline/templates/base.html", "pipeline/templates/report.html", "pipeline/app/templates/try.html", "pipeline/app/static/app.js",
                   "pipeline/app/static/favicon.svg",
                   "pipeline/params.yaml"):
        assert needed in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "photohead = pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert command.is_file()
    # the package's own params template is the documented params.yaml of this repository
    assert (ROOT / "pipeline" / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_the_command_runs_the_stages_and_serve_from_any_folder(installed, tmp_path):
    _, command, site, env = installed
    project = tmp_path / "my cats"
    make_dataset(project / "photos", per_class=10)
    assert run(command, project, env, "--help").stdout.startswith("usage: photohead")
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=project, env=env,
                           capture_output=True, text=True).stdout
    assert where.startswith(str(site))  # the installed package, not the clone
    done = run(command, project, env, "init", "--root", "photos")
    assert done.returncode == 0 and (project / "params.yaml").is_file()
    assert (project / "corrections.csv").read_text() == "path,action,label,note\n"  # a DVC dep must exist
    assert run(command, project, env, "init").returncode == 2  # never overwrites
    tiny = ["--set", "features.backbone=tiny"]
    done = run(command, project, env, "all", *tiny)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy" in done.stdout and (project / "reports" / "index.html").is_file()
    server = subprocess.Popen([str(command), "serve", *tiny, "--set", "serve.port=0"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "serving on" not in line:
            line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        with urllib.request.urlopen(url + "/", timeout=30) as page:
            assert "Drop photos here" in page.read().decode()
        with urllib.request.urlopen(url + "/api/health", timeout=30) as health:
            assert b'"classes":["misty","neither","tigger"]' in health.read()
    finally:
        server.terminate()
        server.wait(20)
    elsewhere = run(command, tmp_path, env, "features")
    assert elsewhere.returncode == 2 and "params file not found" in elsewhere.stderr
