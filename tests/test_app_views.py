"""HTML renderers and plotly chart builders, from traces of the real decoders on a tiny model (no Gradio)."""
import gzip
import json
import re
from html import escape, unescape

import plotly.graph_objects as go
import pytest

from app import about, charts, explain, render
from app import race as race_mod
from app.race import LaneRun, Race, LANES, new_race, run_race
from app.text import Detokenizer
from decoding import DecodeConfig, DecodeTrace, Iteration

from app_fixtures import XSS, TinyHost



@pytest.fixture(scope="module")
def host():
    return TinyHost()


@pytest.fixture(scope="module")
def race(host):
    """All four lanes; on this prompt the tiny 'CLLM' fast-forwards (a group of 4) and has stationary tokens."""
    race = new_race(host, "1, 2, 3", 8, 48, lanes=list(LANES))
    for race in run_race(host, race, stream_every=0):
        pass
    jac = race.run("cllm_jacobi").trace
    assert max(it.accepted for it in jac.iterations) >= 2 and any(it.stationary for it in jac.iterations)
    return race


def spans(html: str) -> list[str]:
    return re.findall(r'<span class="jl-tok[^"]*"[^>]*>', html)


def test_lane_tokens_are_coloured_by_how_they_arrived(race):
    for run in race.runs:
        html = render.lane_html(race, run)
        tags = spans(html)
        assert len(tags) == len(run.trace.tokens) - sum(run.special)  # special tokens (the end) are not text
        arrivals = [a for a, special in zip(run.trace.token_arrivals(), run.special) if not special]
        grouped = sum(1 for _, size in arrivals if size >= 2)
        assert sum(("jl-g2" in t) or ("jl-g4" in t) for t in tags) == grouped
        assert [int(re.search(r'data-it="(\d+)"', t).group(1)) for t in tags] == [it for it, _ in arrivals]
        assert "iteration 1 " in html or len(arrivals) == 1
    assert any("jl-g4" in t for t in spans(render.lane_html(race, race.run("cllm_jacobi"))))


def test_lane_sentence_under_each_lane(race):
    """One plain sentence a lane (tokens, passes, tokens per pass, time, same text as its own AR or not), the
    numbers behind it folded away; no internal lane key is shown."""
    html = render.lane_html(race, race.run("base_jacobi"))
    num = race_mod.lane_numbers(race, race.run("base_jacobi"))
    assert f"{num['tokens']} tokens in {num['forwards']} passes ({num['mean_accepted']:.2f} tokens per pass)" in html
    assert f"{num['wall_s']:.2f} s." in html and "Same text as AR · base model" in html
    assert '<details class="jl-details"><summary>Numbers</summary>' in html and "tokens per second" in html
    assert "Same text as AR · CLLM" in render.lane_html(race, race.run("cllm_jacobi"))
    assert "The reference for Jacobi · base model." in render.lane_html(race, race.run("base_ar"))
    board = render.board_html(race)
    assert board.count('class="jl-lane ') == 4 and 'data-status="done"' in board
    visible = re.sub(r"<[^>]+>", "", board)
    assert not any(key in visible for key in LANES)


def test_verdict_after_a_race(race):
    line = explain.verdict(race)
    jac = race.run("base_jacobi").trace
    assert line.startswith('<div class="jl-verdict"><b>Done.</b>') and "<b>Jacobi · base model</b>" in line
    assert f"{jac.mean_accepted:.2f} tokens per pass" in line
    assert "<b>Jacobi · CLLM</b>" in line and "<b>AR · base model</b>" not in line and "Replay" in line
    assert '<details class="jl-details"><summary>How to read these numbers</summary>' in line
    # the break-even: a Jacobi pass's time over an AR pass's, from the lanes' own clocks
    runs = [race.run(k).trace for k in ("base_ar", "cllm_ar", "base_jacobi", "cllm_jacobi")]
    per = [sum(t.wall_s - t.prefill_s for t in pair) / sum(len(t.iterations) for t in pair) for pair in (runs[:2], runs[2:])]
    cost = race_mod.pass_cost(race)
    assert cost == pytest.approx(per[1] / per[0])
    assert f"took {cost:.1f}× the time of an AR pass, so Jacobi outruns AR only above {cost:.1f} tokens per pass" in line
    # where the fastest Jacobi lane's extra tokens came from, by kind of text
    split = race.run("cllm_jacobi").trace.fast_forward_split()
    assert split.fast_forwarded == 3 and split.repeating_rate is not None and split.new_rate is not None
    assert (f"Jacobi · CLLM got a token for free (after the first of its pass) for {split.repeating_rate:.0%} of the "
            "tokens that repeat earlier text") in line and f"and for {split.new_rate:.0%} of the new ones" in line
    assert "each lane ran 3 times" in line
    with_candidates = Race(race.prompt, DecodeConfig(n=race.settings.n, candidates=2), race.model_name, race.device, race.runs)
    assert f"one Jacobi pass (a window of {race.settings.n} and 2 candidate n-grams of {race.settings.n - 1}) took" in explain.verdict(with_candidates)
    both = Race(race.prompt, DecodeConfig(n=race.settings.n, candidates=2, branches=1), race.model_name, race.device, race.runs)
    assert (f"(a window of {race.settings.n} and 2 candidate n-grams of {race.settings.n - 1} and 1 branch for the first "
            "guess) took") in explain.verdict(both)
    only_jacobi = Race(race.prompt, race.settings, race.model_name, race.device, [race.run("base_jacobi")])
    assert race_mod.pass_cost(only_jacobi) is None and "outruns" not in explain.verdict(only_jacobi)
    assert "got a token for free" not in explain.verdict(only_jacobi)  # it fast-forwarded nothing


def test_verdict_points_out_answers_that_fall_into_a_loop():
    def lane(key, tokens):
        trace = DecodeTrace("jacobi", 4, [1], tokens=tokens, prefill_s=0.01, wall_s=0.1, done=True)
        trace.iterations = [Iteration(1, 1, tokens[:4], tokens[1:5], 4, 0.02)]
        return LaneRun(LANES[key], "done", trace, walls=[0.1])

    plain, looping = [5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7] + [3, 4] * 10 + [2]
    race = Race("p", DecodeConfig(), "m", "cpu", [lane("base_jacobi", plain), lane("cllm_jacobi", looping)])
    line = explain.verdict(race)
    assert "Loop: a pattern of 1 to 4 tokens repeats 10 times or more in a row in Jacobi · CLLM from token 4." in line
    assert "Jacobi · base model from" not in line
    sentence = explain.lane_sentence(race, race.run("cllm_jacobi"))
    assert "⚠ From token 4 the answer goes round in a loop." in sentence and "tokens per pass came from repeated text" in sentence
    assert "loop" not in explain.lane_sentence(race, race.run("base_jacobi"))
    race.runs[1] = lane("cllm_jacobi", [5, 6, 7] + [3, 4] * 9 + [2])  # nine times: not a loop
    assert "Loop:" not in explain.verdict(race)


def test_board_before_a_race_and_while_waiting(host):
    assert "press <b>Race</b>" in render.board_html(None)
    fresh = new_race(host, "hi", 4, 8)
    html = render.board_html(fresh)
    assert html.count("waiting for its turn") == len(fresh.runs)


def test_replay_plays_tokens_at_their_true_times(race):
    html = render.replay_html(race, speed=0.5, nonce=3)
    assert 'data-nonce="3"' in html
    for run in race.runs:
        part = html.split(f'data-lane="{run.lane.key}"')[1].split('data-lane=')[0]
        delays = [float(d) for d in re.findall(r'animation-delay:([\d.]+)s', part)]
        finish, *tokens = delays
        assert tokens == pytest.approx([t / 0.5 for t in run.trace.token_times()], abs=1e-3)
        assert finish == pytest.approx(run.trace.wall_s / 0.5, abs=1e-3)
        assert tokens == sorted(tokens) and tokens[-1] <= finish + 1e-3
        duration = float(re.search(r'animation-duration:([\d.]+)s', part).group(1))
        assert duration == pytest.approx(run.trace.wall_s / 0.5, abs=1e-3)
    assert "Finish a race first" in render.replay_html(None)


def test_step_view_shows_window_outputs_and_why(race, host):
    run = race.run("cllm_jacobi")
    text = lambda tok: host.base.tokenizer.decode([tok])  # noqa: E731
    big = max(run.trace.iterations, key=lambda it: it.accepted)
    html = render.step_html(big, len(run.trace.iterations), text, "".join(run.pieces[: big.start]))
    assert html.count('<td class="jl-in">') == len(big.window)
    assert html.count('<td class="jl-c-accepted">') == 2 * big.accepted  # output cell + verdict cell
    assert f"{big.accepted} tokens gained in this forward" in html
    assert f"Pass {big.index} of {len(run.trace.iterations)}" in html
    assert "Run a race with a Jacobi lane" in render.step_html(None, 0, text)


def test_step_view_says_when_a_candidate_ngram_was_kept():
    it = Iteration(1, 5, [0, 1, 2, 3], [1, 2, 4, 5], 3, 0.0, candidate=2, output_correct=[True] * 4)
    html = render.step_html(it, 1, lambda tok: about.WORDS[tok])
    assert "Candidate n-gram 2, checked beside the window" in html and "3 tokens gained in this forward" in html
    plain = render.step_html(about.EXAMPLE_STEP, 1, lambda tok: about.WORDS[tok])
    assert "Candidate n-gram" not in plain


def test_example_step_in_the_about_tab():
    html = about.example_figure()
    assert "3 tokens gained in this forward" in html and "Guess 3" in html and "acceptance stops" in html
    assert html.count('<td class="jl-c-accepted">') == 6


def test_text_from_users_and_models_is_escaped(host):
    """A prompt or an answer that contains HTML comes out as text."""
    tok = host.base.tokenizer
    ids = tok(XSS)["input_ids"]
    trace = DecodeTrace("jacobi", 4, [1], tokens=list(ids), prefill_s=0.01, wall_s=0.1)
    trace.iterations = [Iteration(1, 1, ids[:4], ids[1:5], len(ids) - 1, 0.05)]
    trace.finalize()
    run = LaneRun(LANES["base_jacobi"], "done", trace, *Detokenizer(tok).update(ids), text=XSS)
    race = Race(XSS, DecodeConfig(), "m", "cpu", [run])
    pages = [render.board_html(race), render.replay_html(race),
             render.step_html(trace.iterations[0], 1, lambda t: tok.decode([t]), XSS)]
    for html in pages:
        assert "<img" not in html  # no element made of it, only text:
        assert XSS in unescape(re.sub(r"<[^>]+>", "", html))
    codes, hover, _ = charts.convergence_cells(run, "window", lambda t: tok.decode([t]))
    assert not any("<img" in h or "<b>" in h for row in hover for h in row)


def test_tokens_over_time_chart(race):
    fig = charts.tokens_over_time(race)
    assert [t.name for t in fig.data] == [r.lane.label for r in race.runs]
    for t, run in zip(fig.data, race.runs):
        assert t.y[-1] == len(run.trace.tokens) and list(t.x) == sorted(t.x) and t.x[-1] <= run.trace.wall_s


def test_accepted_per_iteration_chart(race):
    fig = charts.accepted_per_iteration(race)
    jacobi = [r for r in race.runs if r.lane.method == "jacobi"]
    assert [t.name for t in fig.data] == [r.lane.label for r in jacobi]
    for t, run in zip(fig.data, jacobi):
        assert list(t.y) == [it.accepted for it in run.trace.iterations]
        assert sum(t.y) + 1 == len(run.trace.tokens)  # + the prefill's token
        # plain Jacobi (no candidate n-grams): the base model's rings show around the CLLM's dots where both gain 1
        assert set(t.marker.symbol) == ({"circle-open"} if run.lane.model == "base" else {"circle"})
    band = fig.layout.shapes[0]  # AR's one token a pass is drawn under the lanes, not over them
    assert band.layer == "below" and band.y0 < 1 < band.y1


def test_accepted_chart_marks_candidate_passes():
    trace = DecodeTrace("jacobi", 4, [1], tokens=[5, 6, 7, 8, 9, 10], prefill_s=0.01, wall_s=0.1, done=True)
    trace.iterations = [Iteration(1, 1, [5, 0, 0, 0], [6, 1, 1, 1], 1, 0.02),
                        Iteration(2, 2, [6, 7, 8, 9], [7, 8, 9, 10], 4, 0.03, candidate=2)]
    race = Race("p", DecodeConfig(), "m", "cpu", [LaneRun(LANES["base_jacobi"], "done", trace)])
    line = charts.accepted_per_iteration(race).data[0]
    assert list(line.marker.symbol) == ["circle-open", "diamond-open"]
    assert list(line.customdata) == ["", " (kept candidate n-gram 2)"]


def test_convergence_map_marks_candidate_rows():
    trace = DecodeTrace("jacobi", 4, [1], tokens=[5, 6, 7, 8, 9, 10], prefill_s=0.01, wall_s=0.1, done=True)
    trace.iterations = [Iteration(1, 1, [5, 0, 0, 0], [6, 1, 1, 1], 1, 0.02),
                        Iteration(2, 2, [6, 7, 8, 9], [7, 8, 9, 10], 4, 0.03, candidate=2)]
    run = LaneRun(LANES["base_jacobi"], "done", trace)
    fig = charts.convergence_map(run, "window")
    heat, marks = fig.data
    assert "candidate n-gram" not in heat.text[0][0] and "candidate n-gram 2, kept" in heat.text[1][0]
    assert list(marks.x) == [-1] and list(marks.y) == [2] and list(marks.customdata) == ["candidate n-gram 2"]
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]  # the diamonds' column gets no tick
    trace.iterations.append(Iteration(3, 6, [10, 11], [11, 12], 2, 0.04, candidate=1, branch=True))  # a kept branch
    heat, marks = charts.convergence_map(run, "window").data
    assert "this row is a branch (another likely token" in heat.text[2][0] and marks.name == "kept a candidate"
    assert list(marks.customdata)[1].startswith("a branch")
    assert render.explain_step(trace.iterations[2], lambda t: f"[{t}]")[0].startswith("A branch, [11], one of the model")
    trace.iterations = trace.iterations[:1]  # plain passes only: the heatmap alone
    assert len(charts.convergence_map(run, "window").data) == 1


def test_speed_summary_chart(race):
    """A bar a lane: tokens per second over the median run, whiskers over the range of the timed runs, and words that
    lead with tokens per pass and name the reference (Jacobi lanes that saved no passes get no credit)."""
    fig = charts.speed_summary(race)
    bar = fig.data[0]
    assert list(bar.y) == [r.lane.key for r in race.runs] and bar.orientation == "h"
    nums = [race_mod.lane_numbers(race, r) for r in race.runs]
    assert list(bar.x) == pytest.approx([n["tok_s"] for n in nums])
    for run, num, plus, minus in zip(race.runs, nums, bar.error_x.array, bar.error_x.arrayminus):
        rates = [len(run.trace.tokens) / w for w in run.walls]
        assert num["tok_s"] + plus == pytest.approx(max(rates)) and num["tok_s"] - minus == pytest.approx(min(rates))
    words = [a.text for a in fig.layout.annotations]
    assert words[0] == "<b>AR · base model</b> · 1.00 tokens/pass<br>the reference"
    jac = nums[3]
    assert words[3].startswith(f"<b>Jacobi · CLLM</b> · {jac['mean_accepted']:.2f} tokens/pass<br>{jac['speedup']:.2f}× AR · CLLM")
    if jac["speedup"] < 1:  # (the tiny model's clock decides which)
        assert words[3].endswith(": slower")
    else:
        assert words[3].endswith(": not a Jacobi gain") == (jac["mean_accepted"] < race_mod.GAIN_MIN)


def test_convergence_map_window_axis(race):
    run = race.run("cllm_jacobi")
    codes, hover, width = charts.convergence_cells(run, "window")
    assert width == max(len(it.window) for it in run.trace.iterations)
    for row, it in zip(codes, run.trace.iterations):
        assert row.count(2) == it.accepted
        assert [j for j, c in enumerate(row) if c == 1] == it.stationary
        assert all(c is None for c in row[len(it.window):])
    fig = charts.convergence_map(run, "window")
    assert isinstance(fig.data[0], go.Heatmap) and len(fig.data[0].z) == len(run.trace.iterations)
    assert "accepted" in fig.data[0].text[0][0]


def test_convergence_map_answer_axis_accepts_every_position_once(race):
    run = race.run("base_jacobi")
    codes, _, width = charts.convergence_cells(run, "answer")
    assert width == len(run.trace.tokens)
    accepted_at = [sum(row[col] == 2 for row in codes) for col in range(width)]
    assert accepted_at == [0] + [1] * (width - 1)  # position 0 came from the prefill
    with pytest.raises(ValueError):
        charts.convergence_cells(run, "diagonal")


def test_charts_before_a_race_say_what_to_do():
    for fig in (charts.tokens_over_time(None), charts.accepted_per_iteration(None), charts.speed_summary(None),
                charts.convergence_map(None)):
        assert "Run a race" in fig.layout.annotations[0].text


def _bench(lanes: dict, *more: dict, **meta) -> dict:
    """A benchmark result as decoding.bench writes it, from (tokens, forwards, wall seconds) per lane, one prompt per
    dict (``lanes`` the first)."""
    from decoding.bench import summarise  # the benchmark's own summary, so a schema change shows up here

    rows = [{"lanes": {k: {"tokens": t, "forwards": f, "wall_s": w, "ids": [1, 2]} for k, (t, f, w) in prompt.items()}}
            for prompt in (lanes, *more)]
    base = {"env": {"device": "cuda:0", "device_name": "GPU X", "dtype": "bfloat16", "time": "2030-01-02T03:04:05Z"},
            "config": {"prompts": "assets/heldout.jsonl", "limit": 1}, "decode": {"n": 16, "max_new_tokens": 128},
            "command": "python -m decoding.bench --n 16"}
    return {"meta": base | meta, "prompts": rows, "summary": summarise(rows, list(lanes))}


def test_headline_rows_come_from_the_committed_result_files():
    """Every file the About tab's headline table lists is committed and gives a row whose numbers are the file's."""
    rows = about.headline_rows()
    assert [r["file"] for r in rows] == [h.path for h in about.HEADLINE]
    for item, row in zip(about.HEADLINE, rows):
        data = about.read_result(about.ROOT / item.path)
        assert row["command"] == data["meta"]["command"] and row["command"].startswith("python -m ")
        if "cllm" in data:  # the shipped adapter's evaluation
            assert f"{data['cllm']['jacobi']['tokens_per_forward']:.2f} tokens per forward" in row["result"]
            assert f"{data['cllm']['repetition']['filter_rate']:.0%} of answers end in a loop" in row["result"]
        else:  # the speed ratio on the prompts both lanes ran (transformers' lanes may run on the first few only)
            lanes, both = data["summary"]["lanes"], [p["lanes"] for p in data["prompts"]
                                                     if item.lane in p["lanes"] and item.reference in p["lanes"]]
            speed = {k: sum(r[k]["tokens"] for r in both) / sum(r[k]["wall_s"] for r in both)
                     for k in (item.lane, item.reference)}
            ratio = speed[item.lane] / speed[item.reference]
            assert row["result"].startswith(f"{ratio:.2f}× the speed, {lanes[item.lane]['mean_accepted']:.2f} tokens")
            assert data["meta"]["env"]["dtype"] in row["device"] and row["date"] == data["meta"]["env"]["time"][:10]
    html = about.headline_html(rows)
    assert html.count("<tr>") == len(rows) + 1 and "<details>" in html


def test_headline_table_skips_unknown_and_broken_files_and_escapes(tmp_path):
    """Missing, corrupt and foreign files give no row; a bench without the asked lane neither; text is escaped."""
    good = _bench({"base_ar": (10, 10, 1.0), "cllm_jacobi": (10, 4, 0.5)}, command=f"python -m decoding.bench {XSS}")
    with gzip.open(tmp_path / "good.json.gz", "wt") as f:
        json.dump(good, f)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text(json.dumps({"summary": {"tokens_per_forward": 3.1}}))
    (tmp_path / "eval.json").write_text(json.dumps({"cllm": {"jacobi": {}}, "base": {}}))  # an evaluation, incomplete
    items = [about.Headline(name) for name in ("missing.json", "broken.json", "broken.json.gz", "list.json",
                                               "other.json", "eval.json", "good.json.gz")]
    items += [about.Headline("good.json.gz", lane="base_jacobi")]  # not in that file
    rows = about.headline_rows(items, root=tmp_path)
    assert [r["file"] for r in rows] == ["good.json.gz"]
    row = rows[0]
    assert row["result"] == "2.00× the speed, 3.00 tokens per forward" and row["date"] == "2030-01-02"
    assert row["what"].startswith("Jacobi on the CLLM against AR on the base model, 1 held-out ShareGPT prompts, n = 16")
    assert "two models: their answers differ" in row["what"]
    html = about.headline_html(rows)
    assert XSS not in html and escape(XSS) in html
    assert "No headline results" in about.headline_html([])


def test_headline_row_of_an_evaluation_and_of_decoding_extras():
    r = {"settings": {"n": 16, "device": "cpu", "dtype": "float32"}, "ppl_ratio": 1.5,
         "base": {"repetition": {"seq_rep_4": 0.3, "filter_rate": 0.05}},
         "cllm": {"jacobi": {"tokens_per_forward": 2.5, "prompts": 2}, "repetition": {"seq_rep_4": 0.2, "filter_rate": 0.2}}}
    row = about.eval_row(r)
    assert row["result"] == "2.50 tokens per forward; perplexity 1.500× the base model's; 20% of answers end in a loop (base model 5%)"
    assert row["device"] == "cpu, float32" and "on 2 held-out ShareGPT prompts" in row["what"]
    del r["cllm"]["repetition"]["filter_rate"]
    assert "loop" not in about.eval_row(r)["result"]
    same = _bench({"base_ar": (10, 10, 1.0), "base_jacobi": (10, 8, 2.0)},
                  decode={"n": 16, "max_new_tokens": 128, "candidates": 2, "branches": 3})
    row = about.bench_row(same, about.Headline("x", lane="base_jacobi"))
    assert "n = 16, 2 candidate n-grams of 15 tokens, 3 branches for the first guess, 128 new tokens" in row["what"]
    assert "two models" not in row["what"] and row["result"].startswith("0.50× the speed, 1.29 tokens")
    peer = _bench({"hf_generate": (10, 10, 2.0), "base_ar": (10, 10, 1.0)})
    row = about.bench_row(peer, about.Headline("x", lane="base_ar", reference="hf_generate"))
    assert row["what"].startswith("AR on the base model against transformers' generate (base model)")
    assert "two models" not in row["what"] and row["result"].startswith("2.00× the speed, 1.00 tokens")
    # transformers' lane on the first prompt only: the ratio is taken on that prompt, and the row says so
    peer = _bench({"hf_generate": (10, 10, 2.0), "base_ar": (10, 10, 1.0)}, {"base_ar": (30, 30, 1.0)},
                  config={"prompts": "assets/prompts_unseen80.jsonl", "limit": None})
    row = about.bench_row(peer, about.Headline("x", lane="base_ar", reference="hf_generate"))
    assert row["result"].startswith("2.00× the speed")
    assert "the first 1 of 2 unseen MT-bench-style prompts" in row["what"]
