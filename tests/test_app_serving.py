"""Serving without a browser: model loading at start-up (and its failures), flags, and the page's controls."""
import pytest

from app.host import ModelHost
from app.main import parse_args
from app.race import new_race
from app.ui import build_demo, header_html

from app_fixtures import TinyHost


def labels(demo) -> set[str]:
    return {c.get("props", {}).get("label") for c in demo.config["components"]}


def test_a_failed_load_is_shown_and_races_are_refused(tmp_path):
    host = ModelHost(str(tmp_path / "missing"), None, device="cpu")
    assert host.load() is False and host.base is None
    assert "unknown model" in host.error
    assert "No model loaded" in header_html(host) and 'class="jl-error"' in header_html(host)
    with pytest.raises(ValueError, match="no model is loaded"):
        new_race(host, "hi", 8, 8)
    build_demo(host)  # the page still builds and serves


def test_a_local_model_loads_once_with_its_cllm_and_warms_up(tiny_model_dir):
    host = ModelHost(str(tiny_model_dir), None, device="cpu", dtype="float32")
    assert host.load(cllm_model=str(tiny_model_dir)) is True and host.error is None
    assert host.base is not None and host.cllm is not None and host.base.model is not host.cllm.model
    assert "CLLM: " in host.describe() and "cpu" in host.describe()
    assert host.default_window() == 4  # narrow on a CPU, where a window of 16 costs about 3 AR steps


def test_model_errors_are_escaped_in_the_page():
    host = TinyHost()
    host.error = "could not load <img src=x onerror=alert(1)>"
    host.describe = lambda: f"No model loaded: {host.error}"
    assert "<img" not in header_html(host) and "&lt;img" in header_html(host)


def test_custom_models_only_with_the_flag():
    assert "Model" not in labels(build_demo(TinyHost()))
    assert "Model" in labels(build_demo(TinyHost(), allow_custom_models=True))


def test_race_api_is_the_only_public_endpoint():
    demo = build_demo(TinyHost())
    public = [d.api_name for d in demo.fns.values() if d.api_visibility == "public"]
    assert public == ["race"]


def test_flags():
    cfg = parse_args([])
    assert (cfg.model, cfg.host, cfg.port, cfg.share, cfg.allow_custom_models) == ("smollm2-135m", None, None, False, False)
    cfg = parse_args(["--host", "0.0.0.0", "--port", "8000", "--share", "--model", "m", "--adapter", "none",
                      "--device", "cpu", "--dtype", "float32", "--allow-custom-models"])
    assert (cfg.host, cfg.port, cfg.share, cfg.model, cfg.adapter, cfg.device, cfg.dtype) == ("0.0.0.0", 8000, True, "m", "none", "cpu", "float32")
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "int3"])


def test_no_remote_code_anywhere_in_the_app():
    from pathlib import Path

    for path in (Path(__file__).resolve().parent.parent / "app").glob("*.py"):
        assert "trust_remote_code" not in path.read_text()


def test_engines_auto_is_fast_on_cpu_and_eager_gives_the_same_race(tiny_model_dir):
    from app.race import run_race

    results = {}
    for choice in ("auto", "eager"):
        host = ModelHost(str(tiny_model_dir), None, device="cpu", dtype="float32", engine=choice)
        assert host.load() is True, host.error
        assert host.engine == {"auto": "fast", "eager": "eager"}[choice]
        assert f"{host.engine} engine" in host.describe()
        race = new_race(host, "Write a haiku about the sea.", 8, 24)
        for race in run_race(host, race, engine=host.engine):
            pass
        results[choice] = [r.trace.tokens for r in race.runs]
        host.release()
    assert results["auto"] == results["eager"] and results["auto"][0] == results["auto"][1]


def test_on_a_cpu_machine_loads_and_decodes_run_on_one_torch_thread(tiny_model_dir, monkeypatch):
    import threading

    import torch

    from app import host as hosting
    from app.race import run_race

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    thread = hosting.torch_thread()
    assert thread is not None and hosting.torch_thread() is thread  # one per process
    names = []
    host = ModelHost(str(tiny_model_dir), None, device="cpu", dtype="float32")
    real_load = host._load
    host._load = lambda *a: (names.append(threading.current_thread().name), real_load(*a))[1]
    assert host.load() is True
    race = new_race(host, "Write a haiku about the sea.", 8, 12)

    def steps():
        for r in run_race(host, race, engine=host.engine):
            names.append(threading.current_thread().name)
            yield r

    seen = list(host.stream(steps()))
    assert seen and all(r.status == "done" for r in seen[-1].runs)
    assert set(names) == {names[0]} and names[0].startswith("jacobi-lens-torch")
    assert names[0] != threading.current_thread().name
    # closing the stream early closes the decoder on that thread, and errors come back to the caller
    stream = host.stream(steps())
    next(stream)
    stream.close()
    with pytest.raises(ZeroDivisionError):
        host.call(lambda: 1 / 0)
    assert host.call(lambda: host.call(lambda: threading.current_thread().name)) == names[0]  # nested: no deadlock
    # where a GPU may hold the models (or on ZeroGPU Spaces), everything stays on the caller's thread
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert hosting.torch_thread() is None
    gen = iter([1, 2])
    assert host.stream(gen) is gen and host.call(lambda: threading.current_thread().name) == threading.current_thread().name
