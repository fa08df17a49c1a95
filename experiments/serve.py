"""The app as a child process for the experiments that drive it (cancel_to_free, screenshot)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, *flags: str, echo: bool = True) -> subprocess.Popen:
    """``python app.py --port PORT FLAGS...`` (the embedded model and the shipped CLLM), returned once it serves. Its
    output goes on to this process's stderr when ``echo``; either way it is drained, so a full pipe never blocks it."""
    env = os.environ | {"PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    show = sys.stderr.write if echo else (lambda line: None)
    for line in proc.stdout:
        show(line)
        if "Running on local URL" in line:
            threading.Thread(target=lambda: [show(rest) for rest in proc.stdout], daemon=True).start()
            return proc
    raise RuntimeError("the app ended before it served")
