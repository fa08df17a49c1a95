"""End to end: the app in its own process, driven through its /race API with gradio_client."""
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app_fixtures import shared_app

pytestmark = pytest.mark.slow

PROMPT = "Count from 1 to 10, separated by commas."


@pytest.fixture(scope="module")
def client():
    return Client(shared_app().url, verbose=False)


def test_race_api_measures_each_jacobi_lane_against_its_own_ar(client):
    out = client.predict(PROMPT, 8, 32, api_name="/race")
    assert list(out["lanes"]) == ["base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi"]
    ar, jac, cllm_ar, cllm = (out["lanes"][k] for k in ("base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi"))
    assert ar["text"].strip() and jac["text"] == ar["text"] and cllm["text"] == cllm_ar["text"]
    assert (jac["reference"], jac["same_text"], cllm["reference"], cllm["same_text"]) == ("base_ar", True, "cllm_ar", True)
    assert cllm["text"] == ar["text"]  # the test adapter's LoRA update is zero
    for lane in out["lanes"].values():
        assert lane["status"] == "done" and 1 <= lane["tokens"] <= 32 and len(lane["walls"]) == 3
        assert 1 <= lane["forwards"] <= lane["tokens"] and lane["mean_accepted"] >= 1
        assert lane["tok_s"] > 0 and 0 < lane["wall_s"] < 60 and lane["loop_from"] is None
    for lane in (jac, cllm):
        assert len(lane["speedup_runs"]) == 3 and 0 < lane["speedup_min"] <= lane["speedup"] <= lane["speedup_max"]
    assert ar["forwards"] == ar["tokens"] and ar["speedup"] is None and ar["reference"] is None
    assert out["settings"]["n"] == 8 and out["device"] == "cpu" and out["rounds"] == 3


@pytest.mark.parametrize("args, message", [
    (("", 16, 32), "prompt is empty"),
    ((PROMPT, 0, 32), "between 1 and 128"),
    ((PROMPT, 16, 100000), "between 1 and 1024"),
    (("x" * 9000, 16, 32), "too long"),
    ((PROMPT, 16, 32, 0, 0, 9), "timed runs must be between 1 and 5"),
])
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/race")
    assert client.predict("Hi", 4, 4, 0, 0, 1, api_name="/race")["lanes"]["base_ar"]["tokens"] >= 1


def test_requests_queue_one_at_a_time_and_the_queue_is_bounded(client):
    jobs = [client.submit(PROMPT, 8, 24, 0, 0, 1, api_name="/race") for _ in range(6)]  # the app runs with --max-queue 3
    ranks, refused, done = set(), 0, 0
    deadline = time.time() + 240
    while time.time() < deadline and not all(j.done() for j in jobs):
        for j in jobs:
            st = j.status()
            if st.rank is not None and st.rank > 0:
                ranks.add(st.rank)
        time.sleep(0.1)
    for j in jobs:
        try:
            j.result(timeout=5)
            done += 1
        except Exception as exc:  # the queue refuses what does not fit
            assert "queue is full" in str(exc).lower(), exc
            refused += 1
    assert ranks, "a waiting request was never shown its place in the queue"
    assert done >= 1 and refused >= 1 and done + refused == 6


def raw_race(url: str, body: str) -> str:
    """POST a raw JSON body to /race (as curl would) and return the event stream's text."""
    import httpx

    posted = httpx.post(url + "gradio_api/call/race", content=body, headers={"Content-Type": "application/json"})
    event_id = posted.json()["event_id"]
    return httpx.get(url + f"gradio_api/call/race/{event_id}", timeout=120).text


@pytest.mark.parametrize("values, message", [
    ('"Hi", Infinity, 8', "n must be a whole number, not inf"),
    ('"Hi", 4, NaN', "max new tokens must be a whole number, not nan"),
    ('"Hi \\udcff", 4, 8', "lone surrogate"),
    ('123, 4, 8', "the prompt must be text, not int"),
])
def test_raw_http_with_values_json_allows_gets_a_message_not_a_traceback(values, message):
    text = raw_race(shared_app().url, '{"data": [' + values + ', 0, 0, 1]}')  # candidates, branches, rounds
    assert "event: error" in text and message in text and '"error": null' not in text


def test_a_cancelled_race_stops_decoding_and_frees_the_worker(client):
    long = client.submit("Write a long story about a lighthouse keeper and the sea.", 4, 1024, api_name="/race")
    deadline = time.time() + 120
    while len(long.outputs()) < 3 and time.time() < deadline:  # it streams while it decodes
        time.sleep(0.05)
    assert len(long.outputs()) >= 3 and not long.done()
    short = client.submit("Hi", 4, 1, api_name="/race")
    long.cancel()
    # 1,024 tokens of three lanes take minutes on a CPU; the next race only gets the worker if decoding stopped.
    assert short.result(timeout=60)["lanes"]["base_ar"]["status"] == "done"
    assert long.status().code.name == "CANCELLED"
