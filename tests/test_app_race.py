"""Races on a tiny random Llama: validation, running order, exactness, timing, stopping, the API's JSON."""
import statistics
import time

import pytest

from app.race import (LANES, LaneRun, Race, StopRequests, clean_timing, first_difference, lane_numbers, new_race,
                      race_json, round_order, run_race, stop_race)
from app.text import END_MARK, Detokenizer
from decoding import DecodeConfig, DecodeTrace, Iteration

from app_fixtures import TinyHost

PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def host():
    return TinyHost()


def finish(host, race):
    states = []
    for r in run_race(host, race, stream_every=0):
        states.append([run.status for run in r.runs])
    return states


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   \n"), "prompt is empty"),
    (dict(prompt="x" * 9000), "too long"),
    (dict(n=0), "between 1 and 128"),
    (dict(n=129), "between 1 and 128"),
    (dict(n=2.5), "whole number"),
    (dict(n="16"), "whole number"),
    (dict(max_new_tokens=0), "between 1 and"),
    (dict(max_new_tokens=5000), "between 1 and"),
    (dict(init="zeros"), "initial guesses"),
    (dict(lanes=["nope"]), "unknown lane"),
    (dict(lanes=[]), "no lane to run"),
    (dict(max_new_tokens=600), "context"),  # tiny model: 512 positions
    (dict(candidates=-1), "candidate n-grams must be between 0 and 4"),
    (dict(candidates=5), "candidate n-grams must be between 0 and 4"),
    (dict(candidates=1.5), "candidate n-grams must be a whole number"),
    (dict(candidates=2), "need the fast engine"),  # this host runs the eager engine
    (dict(branches=-1), "branches must be between 0 and 3"),
    (dict(branches=4), "branches must be between 0 and 3"),
    (dict(branches=0.5), "branches must be a whole number"),
    (dict(branches=1), "need the fast engine"),
    (dict(rounds=0), "timed runs must be between 1 and 5"),
    (dict(rounds=6), "timed runs must be between 1 and 5"),
    (dict(rounds=1.5), "timed runs must be a whole number"),
])
def test_bad_requests_are_refused_before_any_work(host, kwargs, message):
    args = dict(prompt=PROMPT, n=8, max_new_tokens=16, init="random", lanes=("base_ar", "base_jacobi"))
    with pytest.raises(ValueError, match=message):
        new_race(host, **(args | kwargs))


def test_cllm_lanes_need_a_cllm():
    host = TinyHost(with_cllm=False)
    with pytest.raises(ValueError, match="CLLM"):
        new_race(host, PROMPT, 8, 16, lanes=["cllm_jacobi"])
    race = new_race(host, PROMPT, 8, 16)  # the default lanes quietly leave the CLLM out
    assert [r.lane.key for r in race.runs] == ["base_ar", "base_jacobi"]
    assert race.reference(race.run("base_jacobi")) is race.run("base_ar")


def test_a_failed_load_is_reported(host):
    broken = TinyHost()
    broken.error = "could not load foo"
    with pytest.raises(ValueError, match="no model is loaded: could not load foo"):
        new_race(broken, PROMPT, 8, 16)


def test_floats_from_sliders_are_accepted(host):
    race = new_race(host, PROMPT, 8.0, 16.0)
    assert race.settings.n == 8 and race.settings.max_new_tokens == 16


def test_lanes_run_one_at_a_time_in_order_and_jacobi_is_exact(host):
    race = new_race(host, PROMPT, 8, 40, lanes=list(LANES))
    states = finish(host, race)
    assert all(s.count("running") <= 1 for s in states)
    order = [s.index("running") for s in states if "running" in s]
    assert order == sorted(order)
    assert [r.status for r in race.runs] == ["done"] * 4
    base_ar, base_jacobi, cllm_ar, cllm_jacobi = race.runs
    assert base_jacobi.trace.tokens == base_ar.trace.tokens
    assert cllm_jacobi.trace.tokens == cllm_ar.trace.tokens
    assert cllm_ar.trace.tokens != base_ar.trace.tokens  # a different model really ran
    assert "".join(p for p, s in zip(base_ar.pieces, base_ar.special) if not s) == base_ar.text


def test_race_json_names_lanes_as_the_benchmark_and_measures_each_jacobi_lane_against_its_own_ar(host):
    race = new_race(host, PROMPT, 8, 24)
    finish(host, race)
    out = race_json(race)
    assert list(out["lanes"]) == ["base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi"]  # both pairs by default
    ar, jac, cllm_ar, cllm = (out["lanes"][k] for k in ("base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi"))
    assert jac["text"] == ar["text"] and jac["same_text"] is True and jac["reference"] == "base_ar"
    assert cllm["text"] == cllm_ar["text"] and cllm["same_text"] is True and cllm["reference"] == "cllm_ar"
    for lane in (ar, cllm_ar):  # AR lanes are the references, measured against nothing
        assert lane["reference"] is None and lane["same_text"] is None and lane["speedup"] is None
    for lane in (jac, cllm):
        assert len(lane["speedup_runs"]) == 3 and lane["speedup_min"] <= lane["speedup"] <= lane["speedup_max"]
        assert lane["first_difference"] is None
    for key, lane in out["lanes"].items():
        assert lane["tokens"] >= 1 and 1 <= lane["forwards"] <= lane["tokens"] and lane["tok_s"] > 0
        assert lane["mean_accepted"] >= 1 and lane["status"] == "done" and len(lane["walls"]) == 3
        assert lane["wall_s"] == pytest.approx(sorted(lane["walls"])[1])  # the median run
        assert lane["loop_from"] is None
    assert out["settings"] == {"max_new_tokens": 24, "n": 8, "init": "random", "seed": 0, "candidates": 0, "candidate_len": 7,
                               "branches": 0}
    assert out["rounds"] == 3


def test_timed_rounds_alternate_the_lanes_and_give_each_ratio_its_spread(host):
    race = new_race(host, PROMPT, 8, 16, rounds=4)
    seen = [r.timing for r in run_race(host, race, stream_every=0) if r.timing]  # a timed run yields as it goes
    timed = [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]]
    # rounds 2..4, each lane once a round; even rounds reversed, so AR and Jacobi take turns to go first
    keys = [r.lane.key for r in race.runs]
    assert timed == [(k, key) for k in (2, 3, 4) for key in (keys[::-1] if k % 2 == 0 else keys)]
    assert [r.lane.key for r in round_order(race, 2)] == keys[::-1] and race.timing is None
    jac, ar = race.run("base_jacobi"), race.run("base_ar")
    num = lane_numbers(race, jac)
    expected = [(len(jac.trace.tokens) / a) / (len(ar.trace.tokens) / b) for a, b in zip(jac.walls, ar.walls)]
    assert num["speedup_runs"] == pytest.approx(expected) and len(expected) == 4
    assert num["speedup"] == pytest.approx(statistics.median(expected))
    assert (num["speedup_min"], num["speedup_max"]) == (min(expected), max(expected))
    one = new_race(host, PROMPT, 8, 16, rounds=1)  # one run: the one you watch, no spread
    assert all(r.timing is None for r in run_race(host, one, stream_every=0))
    assert all(len(r.walls) == 1 for r in one.runs) and len(lane_numbers(one, one.run("cllm_jacobi"))["speedup_runs"]) == 1


def test_stop_during_the_timed_rounds_keeps_the_finished_lanes(host):
    race = new_race(host, PROMPT, 8, 16, rounds=3)
    stream = run_race(host, race, stream_every=0)
    for r in stream:
        if r.timing:
            break
    stop_race(race)
    assert list(stream) == [] and race.stopped
    assert all(r.status == "done" for r in race.runs) and any(len(r.walls) < 3 for r in race.runs)
    assert lane_numbers(race, race.run("base_jacobi"))["speedup"] is not None  # from the runs both lanes made


def test_a_jacobi_lane_without_its_own_ar_is_measured_against_the_other_models_ar(host):
    race = new_race(host, PROMPT, 8, 24, lanes=["base_ar", "cllm_jacobi"], rounds=1)
    finish(host, race)
    num = race_json(race)["lanes"]["cllm_jacobi"]
    assert num["reference"] == "base_ar" and num["same_text"] is False  # another model, another text
    assert num["first_difference"] == first_difference(race.run("base_ar").trace.tokens, race.run("cllm_jacobi").trace.tokens)
    alone = new_race(host, PROMPT, 8, 8, lanes=["cllm_jacobi"], rounds=1)
    finish(host, alone)
    assert race_json(alone)["lanes"]["cllm_jacobi"]["reference"] is None


def test_a_loop_is_flagged_with_the_tokens_per_pass_it_gave():
    """lane_numbers flags an answer that ends in a loop (a pattern of 1 to 4 tokens, 10 times in a row): where it
    starts, and how much of the lane's tokens per pass came from fast-forwarding repeated text."""
    tokens = [5, 6, 7] + [3, 4] * 10 + [2]
    trace = DecodeTrace("jacobi", 4, [1], tokens=tokens, prefill_s=0.01, wall_s=0.1, done=True)
    starts = [1, 2, 3, 5, 9, 13, 17, 21]  # passes of 1, 1, 2, 4, 4, 4, 4, 3 tokens
    trace.iterations = [Iteration(i + 1, s, tokens[s - 1:s + 3], tokens[s:s + 4], e - s, 0.01 * (i + 1))
                        for i, (s, e) in enumerate(zip(starts, starts[1:] + [len(tokens)]))]
    run = LaneRun(LANES["cllm_jacobi"], "done", trace, walls=[0.1])
    num = lane_numbers(Race("p", DecodeConfig(), "m", "cpu", [run]), run)
    assert num["loop_from"] == 3
    split = trace.fast_forward_split()
    assert split.fast_forwarded_repeating > 0
    assert num["repeated_per_forward"] == pytest.approx(split.fast_forwarded_repeating / len(trace.iterations))
    assert num["repeated_per_forward"] <= num["mean_accepted"] - 1
    plain = DecodeTrace("jacobi", 4, [1], tokens=[5, 6, 7] + [3, 4] * 9 + [2], prefill_s=0.01, wall_s=0.1, done=True)
    run.trace = plain  # nine times: not a loop
    assert lane_numbers(Race("p", DecodeConfig(), "m", "cpu", [run]), run)["loop_from"] is None


def test_stopping_mid_lane_leaves_the_host_ready(host):
    race = new_race(host, PROMPT, 8, 64)
    stream = run_race(host, race, stream_every=0)
    for _ in range(4):
        next(stream)
    stream.close()
    stop_race(race)
    assert "stopped" in [r.status for r in race.runs]
    again = new_race(host, PROMPT, 8, 16)
    finish(host, again)
    assert all(r.status == "done" for r in again.runs)


def test_stop_race_ends_a_race_whose_generator_is_never_closed(host):
    race = new_race(host, PROMPT, 8, 64)
    stream = run_race(host, race, stream_every=0)
    for _ in range(4):
        next(stream)
    running = next(r for r in race.runs if r.status == "running")
    steps = len(running.trace.iterations) if running.trace else 0
    stop_race(race)  # what the Stop button's handler does; the server may keep iterating the generator
    assert list(stream) == []  # the next step sees the mark: no more frames, no later lane starts
    # at most the one forward that was under way when the mark was set
    assert running.status == "stopped" and (len(running.trace.iterations) if running.trace else 0) <= steps + 1
    assert all(r.status == "waiting" for r in race.runs[race.runs.index(running) + 1:])


def test_stop_requests_end_the_races_they_reach(host):
    """StopRequests: Stop with race number k ends that session's races 1..k, not k + 1, not another session's, not
    a race without a number; run_race ends at its next step once its checker says so."""
    stops = StopRequests()
    stops.stop("a", 2)
    assert stops.checker("a", 1)() and stops.checker("a", 2)() and not stops.checker("a", 3)()
    assert not stops.checker("b", 1)() and not stops.checker("a", 0)() and not stops.checker("a", None)()
    stops.stop("a", 1)  # an older number never lowers the mark
    assert stops.checker("a", 2)()
    race = new_race(host, PROMPT, 8, 64)
    check = stops.checker("a", 3)
    stream = run_race(host, race, stream_every=0, stopped=check)
    for _ in range(4):
        next(stream)
    running = next(r for r in race.runs if r.status == "running")
    stops.stop("a", 3)
    assert list(stream) == [] and running.status == "stopped"
    assert all(r.status == "waiting" for r in race.runs[race.runs.index(running) + 1:])
    queued = new_race(host, PROMPT, 8, 16)  # stopped before it started: no lane runs
    assert list(run_race(host, queued, stopped=check)) == [] and all(r.status == "waiting" for r in queued.runs)
    stops.forget("a")
    assert not check()


def fake_decoder(steps: int, cost: float):
    """A decoder-shaped generator whose forwards take ``cost`` seconds each."""
    trace = DecodeTrace(method="jacobi", n=4, prompt_ids=[1])
    t0 = time.perf_counter()
    trace.tokens.append(1)
    trace.prefill_s = time.perf_counter() - t0
    yield trace
    for i in range(steps):
        time.sleep(cost)
        trace.iterations.append(Iteration(i + 1, len(trace.tokens), [1], [1], 1, time.perf_counter() - t0))
        trace.tokens.append(1)
        yield trace
    trace.wall_s = time.perf_counter() - t0
    trace.finalize()
    yield trace


def test_clean_timing_removes_the_consumers_pauses():
    for trace in clean_timing(fake_decoder(5, 0.02)):
        if not trace.done:
            time.sleep(0.1)  # the UI rendering a frame
    assert 0.1 <= trace.wall_s < 0.3  # 5 x 20 ms of decoding, not 0.6 s of pauses
    times = [it.t for it in trace.iterations]
    assert times == sorted(times) and times[-1] <= trace.wall_s
    assert all(0.015 <= b - a < 0.06 for a, b in zip(times, times[1:]))


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_detokenizer_pieces_join_to_the_text_whatever_the_chunking(host):
    tok = host.base.tokenizer
    text = "héllo wörld, ça va? 中文 🌊 <b>&amp;</b> def reverse(s)"
    ids = tok(text)["input_ids"]
    one = Detokenizer(tok)
    pieces, special = one.update(ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(pieces) and not any(special)
    chunked = Detokenizer(tok)
    for end in range(1, len(ids) + 1, 3):
        chunked.update(ids[:end])
    assert chunked.update(ids)[0] == pieces
    eos = tok.eos_token_id
    pieces, special = Detokenizer(tok).update(ids[:3] + [eos])
    assert special == [False, False, False, True] and pieces[-1] == "<eos>"
    assert Detokenizer(tok).text(ids[:3] + [eos]) == tok.decode(ids[:3])
    names = Detokenizer(tok).names([eos, ids[0]])  # for views of single tokens: the end is a marker, not text
    assert names == {eos: END_MARK, ids[0]: tok.decode([ids[0]])}


def test_detokenizer_starts_over_when_the_answer_is_trimmed(host):
    tok = host.base.tokenizer
    ids = tok("The cat sat on the mat")["input_ids"]
    d = Detokenizer(tok)
    d.update(ids)
    assert "".join(d.update(ids[:3])[0]) == tok.decode(ids[:3])


def test_candidate_ngrams_keep_every_jacobi_lane_exact():
    fast_host = TinyHost()
    fast_host.engine = "fast"
    with pytest.raises(ValueError, match="over 128 tokens a pass"):
        new_race(fast_host, PROMPT, 64, 16, candidates=2)
    race = new_race(fast_host, PROMPT, 8, 48, lanes=list(LANES), candidates=3)
    assert race.settings.candidates == 3 and race.settings.candidate_len == 7  # as long as the window's guesses
    for _ in run_race(fast_host, race, stream_every=0, engine="fast"):
        pass
    base_ar, base_jacobi, cllm_ar, cllm_jacobi = race.runs
    assert base_jacobi.trace.tokens == base_ar.trace.tokens
    assert cllm_jacobi.trace.tokens == cllm_ar.trace.tokens
    assert race_json(race)["lanes"]["base_jacobi"]["same_text"]


def test_branches_keep_every_jacobi_lane_exact_and_are_marked():
    """Branches for the first guess in the app: the same texts as AR, and a pass that kept one says so (a branch, not
    an n-gram) in the trace the charts read."""
    fast_host = TinyHost()
    fast_host.engine = "fast"
    with pytest.raises(ValueError, match="over 128 tokens a pass"):
        new_race(fast_host, PROMPT, 128, 16, branches=1)
    race = new_race(fast_host, PROMPT, 6, 48, lanes=list(LANES), candidates=1, branches=3)
    assert race.settings.branches == 3 and race_json(race)["settings"]["branches"] == 3
    for _ in run_race(fast_host, race, stream_every=0, engine="fast"):
        pass
    base_ar, base_jacobi, cllm_ar, cllm_jacobi = race.runs
    assert base_jacobi.trace.tokens == base_ar.trace.tokens and cllm_jacobi.trace.tokens == cllm_ar.trace.tokens
    kept = [it for r in (base_jacobi, cllm_jacobi) for it in r.trace.iterations if it.candidate]
    assert any(it.branch for it in kept)
    assert all(len(it.window) == 2 for it in kept if it.branch)  # one token beside the last accepted one
