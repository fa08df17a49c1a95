"""What one request may ask of the server, and what visitors may load: bounds, request checks, custom models."""
from __future__ import annotations

import pytest
from gradio import Error as GradioError

from app.callbacks import Callbacks, check_request
from app.host import ModelHost, custom_adapter, custom_spec, hide_paths

from app_fixtures import TinyHost


@pytest.mark.parametrize("prompt, numbers, message", [
    (None, {}, "prompt is missing"),
    (12, {}, "must be text, not int"),
    (["hi"], {}, "must be text, not list"),
    ("hi \udcff", {}, "character 4 is a lone surrogate"),
    ("hi", {"n": float("inf")}, "n must be a whole number, not inf"),
    ("hi", {"max_new_tokens": float("nan")}, "max new tokens must be a whole number, not nan"),
    ("hi", {"n": "8"}, "n must be a whole number, not '8'"),
    ("hi", {"n": True}, "n must be a whole number, not True"),
    ("hi", {"max_new_tokens": 1e300}, "out of range: 1e\\+300"),
])
def test_requests_that_no_form_would_send_get_a_message(prompt, numbers, message):
    with pytest.raises(ValueError, match=message):
        check_request(prompt, **numbers)
    check_request("a fine prompt ✓ 中文", n=8, max_new_tokens=8.0)


def test_a_prompt_over_the_token_bound_is_refused_before_any_decoding():
    cb = Callbacks(TinyHost(), max_prompt_tokens=5)
    with pytest.raises(ValueError, match="too long for this server: .* at most 5 \\(--max-prompt-tokens\\)"):
        cb.start_race("The cat sat on the mat and purred.", 4, 4, "random", ["base_ar"], 0, 0)


def test_the_time_budget_ends_a_race_at_its_next_step_and_says_so():
    cb = Callbacks(TinyHost(), race_budget_s=1e-9)
    frames = list(cb.race_api("Write a haiku about the sea.", 4, 64))
    final = frames[-1]
    assert "time budget" in final["stopped"] and "--race-budget-s" in final["stopped"]
    assert all(lane["status"] in ("stopped", "waiting") for lane in final["lanes"].values())
    unbounded = list(Callbacks(TinyHost(), race_budget_s=0).race_api("Write a haiku about the sea.", 4, 8))
    assert unbounded[-1]["stopped"] is None and all(lane["status"] == "done" for lane in unbounded[-1]["lanes"].values())


def test_the_api_streams_the_race_so_far_and_refuses_bad_input_with_its_message():
    frames = list(Callbacks(TinyHost(), race_budget_s=0).race_api("Count from 1 to 10.", 4, 12))
    assert len(frames) >= 2 and frames[0]["lanes"]["base_ar"]["status"] == "running"
    with pytest.raises(GradioError, match="lone surrogate"):
        list(Callbacks(TinyHost()).race_api("\ud800", 4, 8))


def test_visitors_load_presets_and_hub_ids_and_folders_only_under_the_model_root(tmp_path):
    root = tmp_path / "models"
    (root / "mine").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    assert custom_spec("smollm2-135m", None) == "smollm2-135m"
    assert custom_spec(" org/name ", None) == "org/name"
    assert custom_spec("mine", str(root)) == str((root / "mine").resolve())
    for spec, root_arg in (("mine", None), (str(root / "mine"), None), ("../secret", str(root)), ("/etc", str(root)),
                           (str(tmp_path / "secret"), str(root)), ("tests/app_fixtures.py", None)):
        with pytest.raises(Exception, match="not a model this app loads for visitors"):
            custom_spec(spec, root_arg)
    assert custom_adapter("none", "smollm2-135m", None) is None and custom_adapter("", "x", None) is None
    assert custom_adapter("mine", "x", str(root)) == str((root / "mine").resolve())
    with pytest.raises(Exception, match="not one this app loads for visitors"):
        custom_adapter(str(root / "mine"), "x", None)
    assert hide_paths("could not load /srv/models/x (see /root/.cache/y): org/name ok, ~/z") == \
        "could not load <path> (see <path>): org/name ok, <path>"


def test_a_failed_load_keeps_the_models_that_were_serving_and_names_no_server_path(tiny_model_dir, tmp_path):
    host = ModelHost(str(tiny_model_dir), None, device="cpu", dtype="float32", engine="eager")
    assert host.load() is True
    serving = host.base
    bad = tmp_path / "models" / "bad-adapter"
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text("{}")
    cb = Callbacks(host, allow_custom_models=True, model_root=str(tmp_path / "models"))
    with pytest.raises(GradioError) as info:
        cb.load_models("smollm2-135m", "bad-adapter")
    message = str(info.value)
    assert "still loaded" in message and str(tmp_path) not in message and "<path>" in message
    assert host.base is serving and host.error is None and host.load_error
    cb.race_budget_s = 0
    assert list(cb.race_api("Hi", 4, 4))[-1]["lanes"]["base_ar"]["status"] == "done"
    with pytest.raises(GradioError, match="not a model this app loads"):
        cb.load_models(str(tiny_model_dir), "")
    with pytest.raises(GradioError, match="start the app with --allow-custom-models"):
        Callbacks(host).load_models("smollm2-135m", "")


def test_on_zero_gpu_a_race_fits_in_a_gpu_task_and_models_stay_as_started():
    host = TinyHost()
    host.zero_gpu = True
    cb = Callbacks(host, allow_custom_models=True, race_budget_s=120)
    assert cb.race_budget_s == 30 and Callbacks(host, race_budget_s=0).race_budget_s == 30
    assert Callbacks(host, race_budget_s=5).race_budget_s == 5
    with pytest.raises(GradioError, match="not available on ZeroGPU"):
        cb.load_models("smollm2-135m", "")
