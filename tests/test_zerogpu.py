"""The app as a ZeroGPU Space runs it: the real ``spaces`` package with SPACES_ZERO_GPU set, driven by gradio_client.

A stand-in for the Space's GPU scheduler (the HTTP API ``spaces`` calls to get a GPU for each task) runs on
loopback; tests/zerogpu_app.py says what else differs from a Space.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gradio_client import Client

from app_fixtures import AppProcess

pytestmark = pytest.mark.slow
spaces = pytest.importorskip("spaces", reason="the spaces package (requirements.txt) is not installed")


class Scheduler(ThreadingHTTPServer):
    """Grants every task GPU 0 at once and records the calls (path and query) it got."""

    def __init__(self):
        self.calls: list[str] = []
        super().__init__(("127.0.0.1", 0), SchedulerHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class SchedulerHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        self.server.calls.append(self.path)
        body = b""
        if self.path.startswith("/schedule"):
            idle = sum(c.startswith("/schedule") for c in self.server.calls) > 1  # the worker of the last task waits
            body = json.dumps({"idle": idle, "nvidiaIndex": 0, "nvidiaUUID": "0", "allowToken": "token"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def zero_gpu_app(tiny_model_dir, tmp_path_factory):
    scheduler = Scheduler()
    home = tmp_path_factory.mktemp("zerogpu-home")
    env = {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": scheduler.url,
           "ZEROGPU_OFFLOAD_DIR": str(home / "tensors"), "HOME": str(home)}
    app = AppProcess("--model", str(tiny_model_dir), "--cllm-model", str(tiny_model_dir), "--dtype", "float32",
                     script="tests/zerogpu_app.py", env=env)
    yield app, scheduler
    app.stop()
    scheduler.shutdown()


def test_a_race_runs_in_the_gpu_worker_and_the_worker_keeps_its_engine(zero_gpu_app):
    app, scheduler = zero_gpu_app
    main_log = "".join(app.log)
    assert "ZeroGPU" in main_log or "loaded" in main_log
    assert "warm-up done" not in main_log, "the main process must not build the engine or decode"
    client = Client(app.url, verbose=False)
    first = client.predict("Write a haiku about the sea.", 4, 16, api_name="/race")
    second = client.predict("Count from 1 to 10.", 8, 12, api_name="/race")
    for out in (first, second):
        lanes = out["lanes"]
        assert list(lanes) == ["base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi"]
        assert all(lane["status"] == "done" and lane["tokens"] >= 1 for lane in lanes.values())
        assert lanes["base_jacobi"]["same_text"] is True and lanes["cllm_jacobi"]["text"] == lanes["base_ar"]["text"]
    assert sum(c.startswith("/schedule") for c in scheduler.calls) == 2
    assert sum(c.startswith("/release") for c in scheduler.calls) == 2
    assert "".join(app.log).count("warm-up done") == 1  # built in the worker at the first task, reused by the second
    with pytest.raises(Exception, match="prompt must be text"):
        client.predict(7, 4, 8, api_name="/race")
    assert client.predict("Hi", 4, 4, api_name="/race")["lanes"]["base_ar"]["tokens"] >= 1
