"""Start a command, wait for it, write its peak resident set to a JSON file; exit with its code.

    python -S bench/_peak.py REPORT.json COMMAND [ARG ...]

A fresh, small interpreter: the command it starts inherits no large maximum (see bench/harness.py).
"""
import json
import os
import sys

report, command = sys.argv[1], sys.argv[2:]
pid = os.posix_spawnp(command[0], command, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"peak_mb": usage.ru_maxrss / 1024}, f)
sys.exit(os.waitstatus_to_exitcode(status))
