"""How long the first start of ./run.sh takes on this machine: a fresh venv and an empty model cache, split into
the pip install and the rest (the embedded model's download and preparation, loading, engine tuning, warm-up, the
server's start), read off the timestamps of the lines the app prints.

    python -m experiments.first_start --venv /tmp/freshvenv --cache /tmp/empty --out assets/results/FILE.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from decoding.bench import command_line

ROOT = Path(__file__).resolve().parent.parent
# (name, a text the line holds): the stages, in the order the app prints them
MARKS = [("pip_done", "[run.sh] installed"), ("base_loaded", "loaded smollm2-135m"), ("cllm_loaded", "loaded smollm2-135m + "),
         ("warm_up_done", "warm-up done"), ("serving", "Running on local URL")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default="/tmp/freshvenv")
    ap.add_argument("--cache", default="/tmp/empty")
    ap.add_argument("--port", type=int, default=7899)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for path in (args.venv, args.cache):
        shutil.rmtree(path, ignore_errors=True)
    env = os.environ | {"VENV": args.venv, "CLLM_CACHE_DIR": args.cache, "PYTHONUNBUFFERED": "1",
                        "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(["./run.sh", "--port", str(args.port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, log = {}, []
    for line in proc.stdout:
        log.append(line)
        for name, text in MARKS:
            if text in line and name not in seen:
                seen[name] = round(time.perf_counter() - t0, 1)
        if "serving" in seen or time.perf_counter() - t0 > args.timeout:
            break
    proc.terminate()
    proc.wait(30)
    pip = seen.get("pip_done")
    result = {
        "meta": {"what": "first start of ./run.sh: fresh venv, empty model cache", "command": command_line(),
                 "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds_since_start": seen,
        "pip_s": pip,
        "after_pip_s": round(seen["serving"] - pip, 1) if pip and "serving" in seen else None,
        "log_tail": [line.rstrip() for line in log if line.startswith(("[jacobi-lens]", "[run.sh]"))][-30:],
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_since_start", "pip_s", "after_pip_s")}))


if __name__ == "__main__":
    main()
