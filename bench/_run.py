"""Run one command of the pipeline as its own process, as a user does: wall seconds and peak memory."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_measured(project: Path, *args: str, check: bool = True) -> dict:
    """``python -m pipeline ARGS --params project/params.yaml``: seconds, the process's peak RSS in MB
    (from wait4: its own maximum resident set), stdout and stderr."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--params", str(project / "params.yaml")],
                                   cwd=project, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(args)} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr,
            "returncode": os.waitstatus_to_exitcode(status)}
