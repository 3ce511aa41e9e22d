"""Run several bench/ scripts in one Python process, as ``python bench/X.py ARGS`` would (for tests/test_smoke_everything.py).

One interpreter start-up (torch, diffusers imports: several CPU-seconds each) serves every script. Each script runs
with ``runpy`` as ``__main__`` with its own ``sys.argv``; its output is captured and its outcome recorded, so one
failing script does not hide the others.

    python tests/bench_driver.py RESULTS.json 'bench/bench_ddpm.py --smoke' 'bench/bench_degradations.py --size 64'
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import shlex
import sys
import time
import traceback


def run_one(command: str) -> dict:
    argv = shlex.split(command)
    output = io.StringIO()
    started = time.perf_counter()
    status = "ok"
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            status = f"exit {stop.code}"
    except BaseException:  # noqa: BLE001 - any failure of the script is its result
        status = "error"
        output.write(traceback.format_exc())
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return {"command": command, "status": status, "seconds": time.perf_counter() - started, "output": output.getvalue()}


def main() -> None:
    results_path, commands = sys.argv[1], sys.argv[2:]
    results = [run_one(command) for command in commands]
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
