"""What the page tells a student, without a browser: fair comparisons in plain sentences, views that always show
the latest race, special tokens left out, hovers escaped once, the downloads, the shared link and the recorded race."""
import functools
import json
import re
from html import unescape
from types import SimpleNamespace
from urllib.parse import parse_qsl

import gradio as gr
import pytest

from app import callbacks, charts, explain, render
from app.callbacks import VIEWS, Callbacks, share_link
from app.race import LANES, LaneRun, Race, lane_numbers, new_race, run_race
from app.record import EXAMPLE, race_record, read_example, read_race
from app.text import END_MARK, Detokenizer
from app.ui import build_demo
from decoding import DecodeConfig, DecodeTrace, Iteration

from app_fixtures import XSS, TinyHost



@pytest.fixture(scope="module")
def host():
    return TinyHost()


@pytest.fixture(scope="module")
def cb(host):
    return Callbacks(host)


def raced(host, prompt: str, **kwargs) -> Race:
    race = new_race(host, prompt, 8, 24, rounds=kwargs.pop("rounds", 2), **kwargs)
    for race in run_race(host, race, stream_every=0):
        pass
    return race


def fake_lane(key: str, tokens: list[int], accepted: list[int], walls: list[float]) -> LaneRun:
    """A finished lane whose passes accept ``accepted`` tokens each (after the prefill's one)."""
    trace = DecodeTrace(LANES[key].method, 4, [1], tokens=tokens, prefill_s=0.01, wall_s=walls[0], done=True)
    start = 1
    for i, a in enumerate(accepted):
        window = tokens[start - 1:start + 3]
        outputs = (tokens[start:start + 4] + [0] * 4)[:len(window)]
        trace.iterations.append(Iteration(i + 1, start, window, outputs, a, 0.01 * (i + 2)))
        start += a
    return LaneRun(LANES[key], "done", trace, walls=walls)


def test_each_jacobi_lane_is_judged_against_the_ar_of_its_own_model():
    """The sentence under a Jacobi lane: tokens per pass first, then the clock ratio with its range against its own
    model's AR; no credit where tokens per pass say Jacobi saved nothing; plain words where the reference is
    another model's AR; never an internal lane key."""
    toks = list(range(10, 31))  # 21 tokens: the prefill's and 20 more
    ar = fake_lane("base_ar", toks, [1] * 20, [2.0, 2.2, 1.8])
    noise = fake_lane("base_jacobi", toks, [1] * 18 + [2], [1.6, 1.7, 1.5])  # 1.05 per pass, yet a faster clock
    race = Race("p", DecodeConfig(), "m", "cpu", [ar, noise])
    line = explain.lane_sentence(race, noise)
    assert "21 tokens in 20 passes (1.05 tokens per pass)" in line and "Same text as AR · base model" in line
    assert "is not a Jacobi gain" in line and "1.25× (1.20–1.29 over 3 runs)" in line
    assert "no real gain" in explain.verdict(race)
    assert charts.speed_summary(race).layout.annotations[1].text.endswith("not a Jacobi gain")
    race.runs[1] = fake_lane("base_jacobi", toks, [1] * 18 + [2], [2.4, 2.5, 2.3])  # no passes saved, and slower
    assert "It saved almost no passes, and its passes cost more than AR's, so it ran slower: 0.83×" in explain.lane_sentence(race, race.runs[1])
    assert charts.speed_summary(race).layout.annotations[1].text.endswith("0.83× AR · base model: slower")
    gain = fake_lane("base_jacobi", toks, [2] * 10, [1.0, 1.1, 0.9])  # 2 tokens per pass
    race.runs[1] = gain
    line = explain.lane_sentence(race, gain)
    assert "(2.00 tokens per pass)" in line and "2.00× (2.00–2.00 over 3 runs) its speed" in line
    assert "wrote the same 21 tokens as AR · base model in 11 passes instead of 21" in explain.verdict(race)
    assert "more than its" not in line
    lucky = fake_lane("base_jacobi", toks, [2] * 10, [0.5, 0.6, 0.4])  # 4× the clock from 1.9× fewer passes
    race.runs[1] = lucky
    assert "That is more than its 1.91× fewer passes explain" in explain.lane_sentence(race, lucky)
    assert "more than its 1.91× fewer passes explain" in explain.verdict(race)
    assert charts.speed_summary(race).layout.annotations[1].text.endswith("beyond its saved passes")
    slow = fake_lane("base_jacobi", toks, [2] * 10, [2.5, 2.4, 2.6])  # fewer passes, but each cost more
    race.runs[1] = slow
    assert "but slower on the clock: 0.80× (0.69–0.92 over 3 runs) its speed: a Jacobi pass cost 2.5 AR passes here" in explain.lane_sentence(race, slow)
    assert "but slower on the clock" in explain.verdict(race)
    cllm = fake_lane("cllm_jacobi", list(range(40, 61)), [2] * 10, [1.0])  # its own AR did not run
    other = Race("p", DecodeConfig(), "m", "cpu", [ar, cllm])
    line = explain.lane_sentence(other, cllm)
    assert "Compared with AR · base model, another model: the texts differ from token 1 on" in line
    assert "compares two models' answers, not the same work" in line
    assert "another model with another answer" in explain.verdict(other)
    alone = Race("p", DecodeConfig(), "m", "cpu", [cllm])
    assert "No AR lane ran" in explain.lane_sentence(alone, cllm)
    for r in (race, other, alone):
        visible = re.sub(r"<[^>]+>", "", render.board_html(r) + explain.verdict(r))
        assert not any(key in visible for key in LANES)


def test_special_tokens_are_not_text(host):
    """The end-of-answer token gets no box on the board or in the replay; views of single tokens name it with a
    marker."""
    tok = host.base.tokenizer
    ids = tok("The cat sat on the mat")["input_ids"] + [tok.eos_token_id]
    detok = Detokenizer(tok, [tok.eos_token_id])
    pieces, special = detok.update(ids)
    run = fake_lane("base_jacobi", ids, [1] * (len(ids) - 1), [0.1])
    run.pieces, run.special, run.text, run.vocab = pieces, special, detok.text(ids), detok.names(set(ids))
    race = Race("p", DecodeConfig(), "m", "cpu", [run])
    for html in (render.board_html(race), render.replay_html(race)):
        assert "&lt;eos&gt;" not in html and "<eos>" not in html
        assert len(re.findall(r'<span class="jl-tok [^"]*" data-it=', html)) == len(ids) - 1
    last = run.trace.iterations[-1]
    assert END_MARK in render.step_html(last, len(run.trace.iterations), charts.answer_token_text(run))
    codes, hover, _ = charts.convergence_cells(run, "window")
    assert any(END_MARK in h for row in hover for h in row)


def test_hovers_are_escaped_once_for_plotly(host):
    """Plotly shows named entities it does not know (&quot;) literally: a quote stays a quote, < and & are escaped."""
    assert charts.plot_text('say "hi" & <b>') == 'say "hi" &amp; &lt;b&gt;'
    tok = host.base.tokenizer
    ids = tok('"<b>&amp;</b>"')["input_ids"]
    run = fake_lane("base_jacobi", ids, [1] * (len(ids) - 1), [0.1])
    run.pieces, run.special = Detokenizer(tok).update(ids)
    run.vocab = Detokenizer(tok).names(set(ids))
    _, hover, _ = charts.convergence_cells(run, "window")
    text = " ".join(h for row in hover for h in row)
    assert '"' in text and "&quot;" not in text and "&#x27;" not in text and "<b>" not in text


def test_views_show_the_latest_race_or_say_they_are_empty(host, cb):
    """After every race (or a Stop, or an error) each view is drawn from that race alone."""
    empty = dict(zip(VIEWS, cb.views(None)))
    assert "Run a race" in empty["time_plot"].layout.annotations[0].text
    assert empty["lane_pick"]["choices"] == [] and empty["lane_pick"]["value"] is None
    assert "Run a race with a Jacobi lane" in empty["step_view"] and "Finish a race first" in empty["replay_view"]
    assert empty["race_file"]["value"] is None and empty["race_file"]["interactive"] is False and empty["share"] == ""
    first, second = raced(host, "1, 2, 3"), raced(host, "The cat sat", lanes=["base_ar", "base_jacobi"])
    cb.views(first)
    views = dict(zip(VIEWS, cb.views(second)))
    assert views["lane_pick"]["choices"] == [("Jacobi · base model", "base_jacobi")]
    assert views["lane_pick"]["value"] == "base_jacobi" and "The cat sat" in views["replay_view"]
    assert [t.name for t in views["time_plot"].data] == ["AR · base model", "Jacobi · base model"]
    assert views["conv_plot"].layout.title.text.endswith("Jacobi · base model")
    assert f"Pass 1 of {len(second.run('base_jacobi').trace.iterations)}" in views["step_view"]
    assert json.loads(open(views["race_file"]["value"], encoding="utf-8").read())["prompt"] == "The cat sat"
    assert "prompt=The+cat+sat" in views["share"]


def test_a_refused_race_clears_every_view(cb):
    """race_stream: a request that cannot run still answers with a frame that empties every view (and the page's
    state), then the error message."""
    stream = cb.race_stream("", 8, 16, "random", 0, 0, list(LANES), 2, 1, SimpleNamespace(session_hash="s"))
    board, status, state, *views = next(stream)
    assert state is None and "the prompt is empty" in status and "No race" in board
    assert dict(zip(VIEWS, views))["lane_pick"]["choices"] == []
    with pytest.raises(gr.Error, match="the prompt is empty"):
        next(stream)


def test_a_race_streams_with_its_views_cleared_then_drawn(cb):
    frames = list(cb.race_stream("1, 2", 8, 12, "random", 0, 0, ["base_ar", "base_jacobi"], 2, 1,
                                 SimpleNamespace(session_hash="s")))
    first = dict(zip(VIEWS, frames[0][3:]))
    assert first["lane_pick"]["choices"] == [] and "Finish a race first" in first["replay_view"]
    drawn = [f for f in frames[1:] if f[3] != gr.skip()]  # drawn once, when every lane has run (timed runs go on)
    assert len(drawn) == 1 and "timing run 2 of 2" in drawn[0][0]
    assert "Done." in frames[-1][1] and all(r.status == "done" for r in frames[-1][2].runs)



def test_timed_runs_send_a_frame_only_when_the_page_changes(cb, monkeypatch):
    """While the timed runs go on, the board and status change only when another lane's run starts: the steps in
    between send nothing (every output skipped), so rendering does not take the CPU from the run being timed."""
    monkeypatch.setattr(callbacks, "run_race", functools.partial(run_race, stream_every=0.0))  # a frame every step
    frames = list(cb.race_stream("1, 2", 8, 12, "random", 0, 0, ["base_ar", "base_jacobi"], 3, 1,
                                 SimpleNamespace(session_hash="s")))
    quiet = [f for f in frames if all(x == gr.skip() for x in f)]
    timing = [f[1] for f in frames if f[1] != gr.skip() and "timing run" in f[0]]
    assert quiet and len(timing) == 4  # one frame per timed run: rounds 2 and 3, two lanes each
    assert "Done." in frames[-1][1] and all(len(r.walls) == 3 for r in frames[-1][2].runs)

def test_the_race_file_reads_back_and_the_charts_page_needs_no_network(host, cb):
    race = raced(host, XSS)
    data = race_record(race)
    assert data["lanes"]["base_jacobi"]["reference"] == "base_ar" and data["lanes"]["base_jacobi"]["trace"]["iterations"]
    back = read_race(json.loads(json.dumps(data)))
    assert render.board_html(back) == render.board_html(race) and explain.verdict(back) == explain.verdict(race)
    _, page = cb.downloads.write(race)
    html = open(page, encoding="utf-8").read()
    assert html.count("<script") >= 2 and "<script src" not in html and "<link" not in html  # plotly.js is inside
    assert XSS not in html and unescape(XSS) in unescape(html)


def test_a_shared_link_restores_prompt_and_settings(host, cb):
    race = raced(host, 'Say "hi" & bye', lanes=["base_ar", "cllm_jacobi"], rounds=1)
    href = unescape(re.search(r'href="\?([^"]+)"', share_link(race)).group(1))
    query = dict(parse_qsl(href))
    restored = cb.restore(SimpleNamespace(query_params=query))
    assert restored == ('Say "hi" & bye', 8, 24, "random", 0, 0, ["base_ar", "cllm_jacobi"], 1)
    bad = {"prompt": " ", "n": "0", "max_new_tokens": "99999", "init": "zeros", "candidates": "x", "branches": "-1",
           "lanes": "nope", "rounds": "9"}
    assert cb.restore(SimpleNamespace(query_params=bad)) == (gr.skip(),) * 8
    assert cb.restore(SimpleNamespace(query_params={})) == (gr.skip(),) * 8


def test_the_page_opens_on_the_recorded_example_race(host):
    """The committed example race: read without any model, labelled as recorded with its device, and drawn in
    every view when the page is built."""
    race = read_example(EXAMPLE)
    assert race is not None and race.recorded["device"] == "cpu" and race.recorded["command"].startswith("python -m app.record")
    assert race.recorded["commit"] and [r.lane.key for r in race.runs] == list(LANES)
    assert all(r.status == "done" and len(r.walls) == race.rounds for r in race.runs)
    for run in race.runs:
        num = lane_numbers(race, run)
        assert num["same_text"] is (True if run.lane.method == "jacobi" else None)
    banner = render.board_html(race)
    assert "Recorded example, not run now:" in banner and race.recorded["device_name"] in unescape(banner)
    assert explain.verdict(race).startswith('<div class="jl-verdict"><b>Recorded example race.</b>')
    demo = build_demo(host)
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in demo.config["components"]}
    assert "Recorded example, not run now" in values["jl-board"] and "Recorded example race" in values["jl-status"]
    assert read_example(EXAMPLE.parent / "missing.json") is None
    assert "Type a prompt" in {c["props"].get("elem_id"): c["props"].get("value")
                               for c in build_demo(host, example=None).config["components"]}["jl-board"]
