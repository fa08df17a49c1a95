"""How soon the app's worker is free after a /race job is cancelled through gradio_client (``job.cancel()``).

Starts ``python app.py`` (the embedded model and the shipped CLLM, CPU), then, ``--repeats`` times: a long race
(1,024 tokens) streams for a second, a one-token race is queued behind it, the long one is cancelled, and the time
from the cancel to the queued race's first output is taken. Writes the times and their median to ``--out``.

    python -m experiments.cancel_to_free --out assets/results/FILE.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from decoding.bench import command_line, source_commit
from experiments.serve import free_port, start_app

LONG = "Write a long story about a lighthouse keeper and the sea."


def cancel_once(client) -> float:
    """Seconds from cancelling a decoding race to the next queued race's first output."""
    long = client.submit(LONG, 4, 1024, api_name="/race")
    while len(long.outputs()) < 3:
        time.sleep(0.02)
    time.sleep(1.0)
    short = client.submit("Hi", 4, 1, api_name="/race")
    t0 = time.perf_counter()
    long.cancel()
    while not short.outputs():
        time.sleep(0.005)
    free = time.perf_counter() - t0
    short.result(timeout=120)
    return free


def main(argv: list[str] | None = None) -> None:
    from gradio_client import Client

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    port = free_port()
    proc = start_app(port, "--race-budget-s", "0", echo=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        times = [round(cancel_once(client), 3) for _ in range(args.repeats)]
    finally:
        proc.terminate()
        proc.wait(30)
    result = {
        "meta": {"what": "job.cancel() of a decoding /race job to the next queued job's first output (embedded model, "
                         "shipped CLLM, CPU, n=4, 1024 new tokens asked)", "command": command_line(),
                 "commit": source_commit(),
                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "load_average_1min": os.getloadavg()[0]},
        "seconds": times, "median_s": statistics.median(times), "max_s": max(times),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "median_s", "max_s")}))


if __name__ == "__main__":
    main()
