"""Run one command of the pipeline as its own process, as a user does: wall seconds and peak memory.

Peak memory is the process's maximum resident set (``ru_maxrss``). Linux keeps that maximum across
``exec``, so a process forked from a large parent (a benchmark that has loaded models) would report
at least the parent's size. The command is therefore started by a small wrapper process
(``bench/_peak.py``, a fresh interpreter of a few MB), which starts it, waits for it, and reports
its own child's peak: the command's alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK = Path(__file__).resolve().parent / "_peak.py"


def measured(command: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run ``command``: seconds, peak RSS in MB (its own), stdout, stderr, return code."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak.json"
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-S", str(PEAK), str(report), *command], cwd=cwd, env=env,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak = json.loads(report.read_text()) if report.is_file() else {"peak_mb": float("nan")}
    return {"seconds": seconds, "peak_mb": peak["peak_mb"], "stdout": out.stdout, "stderr": out.stderr,
            "returncode": out.returncode}


def run_measured(project: Path, *args: str, check: bool = True, env: dict | None = None) -> dict:
    """``python -m pipeline ARGS --params project/params.yaml`` in ``project``; ``env``: variables to add."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    result = measured([sys.executable, "-m", "pipeline", *args, "--params", str(project / "params.yaml")],
                      cwd=project, env=env)
    if check and result["returncode"]:
        raise SystemExit(f"{' '.join(args)} failed:\n{result['stderr'][-3000:]}")
    return result
