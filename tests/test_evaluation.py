"""Evaluating CLLMs: the shipped adapter's lossless lane, answer agreement, training.compare and experiments.forced."""
import json
from pathlib import Path

import pytest

from decoding import DEFAULT_ADAPTER, DecodeConfig, ar_decode, encode, jacobi_decode, run
from training import evaluate



def test_agreement_counts_the_leading_tokens_two_answers_share():
    got = evaluate.agreement([[1, 2, 3], [4, 5], [7], [1, 2]], [[1, 2, 9], [4, 5], [8, 1], [1, 2, 3]])
    # shared prefixes 2, 2 (identical), 0, 2 (one answer stops early)
    assert got == {"identical": 0.25, "shared_prefix_mean": 1.5, "shared_prefix_median": 2.0, "answers": 4,
                   "shared_prefix": [2, 2, 0, 2]}


@pytest.mark.skipif(not DEFAULT_ADAPTER.exists(), reason="the shipped CLLM adapter is not in assets/ yet")
def test_shipped_adapter_gives_a_lossless_cllm_lane():
    from decoding import load_model

    lm = load_model(adapter=str(DEFAULT_ADAPTER), device="cpu", dtype="float32")
    cfg = DecodeConfig(max_new_tokens=48, n=16, eos_token_ids=lm.eos_token_ids)
    for prompt in ["Why do cats purr?", "Give me three tips for learning Python."]:
        ids = encode(lm.tokenizer, prompt)
        jac = run(jacobi_decode, lm.model, ids, cfg)
        assert jac.tokens == run(ar_decode, lm.model, ids, cfg).tokens
        assert jac.mean_accepted >= 1.0


def test_compare_ranks_runs_that_meet_the_quality_targets_first(tmp_path, capsys):
    from training import compare

    def write(name, tpf, ppl_ratio, rep):
        r = {"ppl_ratio": ppl_ratio, "base": {"repetition": {"seq_rep_4": 0.4}},
             "cllm": {"jacobi": {"tokens_per_forward": tpf, "tokens_per_forward_pooled": tpf},
                      "repetition": {"seq_rep_4": rep}, "exactness": {"teacher_forced_greedy": 1.0}}}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        return tmp_path / f"{name}.json"

    paths = [write("fast_but_worse", 3.2, 1.3, 0.5), write("good", 2.0, 1.05, 0.39), write("better", 2.5, 1.1, 0.4)]
    assert [r["name"] for r in compare.ranked(paths)] == ["better", "good", "fast_but_worse"]
    r = json.loads(paths[1].read_text())  # the 10x-filter tail, where recorded: CLLM / base, in percent
    r["cllm"]["repetition"]["filter_rate"], r["base"]["repetition"]["filter_rate"] = 0.175, 0.06
    r["cllm"]["agreement_with_base"] = {"shared_prefix_mean": 41.6}  # leading tokens shared with the base's answers
    paths[1].write_text(json.dumps(r))
    assert compare.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "fast_but_worse" in out
    assert next(x for x in out.splitlines() if x.startswith("good")).split()[-3:] == ["17.5/6.0", "42", "ok"]
    assert next(x for x in out.splitlines() if x.startswith("better")).split()[-3:-1] == ["-", "-"]
    # seq-rep -0.01, 0, 0.1 above the base's 0.4 against 2.0, 2.5, 3.2 tokens/forward: least squares
    # 9.324 x + 2.287, r = 0.94
    rows = compare.ranked(paths)
    line = compare.tradeoff(rows)
    assert "over 3 runs: r = 0.94" in line and "repetition at 2.29 tokens/forward" in line and line in out
    assert compare.tradeoff(rows[:2]) == ""
    assert rows[0]["new_ff"] is None and rows[0]["rep_ff"] is None  # evaluations without the fast-forward analysis
    # --best K: the adapter folders (from each evaluation's settings) of the first K rows, best first
    for name in ("fast_but_worse", "good", "better"):
        r = json.loads((tmp_path / f"{name}.json").read_text())
        r["settings"] = {"adapter": f"/work/run_{name}/adapter"}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    capsys.readouterr()
    assert compare.main(["--best", "2", *map(str, paths)]) == 0
    assert capsys.readouterr().out.split() == ["/work/run_better/adapter", "/work/run_good/adapter"]
    assert compare.main(["--best", "0", *map(str, paths)]) == 0 and capsys.readouterr().out.strip() == ""
    assert compare.main(["--best", "x", *map(str, paths)]) == 2
    assert compare.main([str(tmp_path / "missing.json")]) == 2 and "cannot read" in capsys.readouterr().err
    assert compare.main(["--help"]) == 0 and "--paired" in capsys.readouterr().out


def test_compare_reports_the_loop_tail_answer_by_answer(tmp_path, capsys):
    from training import compare

    # five prompts: loops in both answers (prompt 0), in the CLLM's only (1: 30 tokens past the shared text;
    # 2: 5 tokens before it ends), in the base's only (3), in neither (4)
    r = {"base": {"repetition": {"per_answer": {"loop_onset": [100, None, None, 80, None]}}},
         "cllm": {"repetition": {"per_answer": {"loop_onset": [60, 40, 15, None, None]}},
                  "agreement_with_base": {"shared_prefix": [50, 10, 20, 30, 256]}}}
    got = compare.loop_report(r)
    assert got == {"answers": 5, "both": 1, "cllm_only": 2, "base_only": 1, "cllm_onset_median": 40,
                   "base_onset_median": 90.0, "cllm_only_onset_past_shared_median": 12.5, "cllm_only_on_shared_text": 1}
    (tmp_path / "e.json").write_text(json.dumps(r))
    assert compare.main(["--loops", str(tmp_path / "e.json")]) == 0
    assert "1 loop in both, 2 in the CLLM's only, 1 in the base's only" in capsys.readouterr().out
    del r["base"]["repetition"]["per_answer"]
    (tmp_path / "old.json").write_text(json.dumps(r))
    assert compare.main(["--loops", str(tmp_path / "old.json")]) == 2
    assert "older evaluations do not record it" in capsys.readouterr().err


def test_compare_splits_the_fast_forwarded_tokens_into_new_and_repeated_text():
    from training import compare

    # 100 answer tokens, 40 of them repeating a 4-gram; 50 fast-forwarded, 30 of those repeating:
    # new text 20 of 60 fast-forwarded, repeated text 30 of 40
    jacobi = {"answer_tokens": 100, "fast_forwarded_tokens": 50, "fast_forwarded_repeating": 0.6,
              "answer_tokens_repeating": 0.4}
    new, rep = compare.fast_forward_split(jacobi)
    assert new == pytest.approx(20 / 60) and rep == pytest.approx(30 / 40)
    assert compare.fast_forward_split({"tokens_per_forward": 2.0}) == (None, None)
    # newer files carry the counts themselves (training.evaluate writes them); they win over the shares
    counts = {"fast_forwarded": 50, "fast_forwarded_repeating": 29, "tokens": 100, "repeating": 40}
    new, rep = compare.fast_forward_split(jacobi | {"fast_forward_counts": counts})
    assert new == pytest.approx(21 / 60) and rep == pytest.approx(29 / 40)


def test_compare_pairs_two_evaluations_prompt_by_prompt(tmp_path, capsys):
    from training import compare

    def write(name, per_prompt, heldout="/x/assets/heldout.jsonl"):
        r = {"settings": {"heldout": heldout}, "cllm": {"jacobi": {"per_prompt": per_prompt}}}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        return str(tmp_path / f"{name}.json")

    # rates a: 2, 3, 1.5; b: 1, 3, 2 -> differences 1, 0, -0.5: mean 1/6, sd 0.7638, se 0.441
    a = write("a", [[20, 10], [30, 10], [15, 10]])
    b = write("b", [[10, 10], [60, 20], [20, 10], [40, 10]], heldout="/other/machine/assets/heldout.jsonl")
    got = compare.paired(Path(a), Path(b))  # b measured a fourth prompt: only the first three count
    assert got["prompts"] == 3 and got["mean_diff"] == pytest.approx(1 / 6)
    assert got["se_diff"] == pytest.approx(0.440958, rel=1e-5) and (got["a_more"], got["b_more"]) == (1, 1)
    assert compare.main(["--paired", a, b]) == 0
    assert "a - b: +0.167 (standard error 0.441)" in capsys.readouterr().out
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": {"heldout": "h"}, "cllm": {"jacobi": {"tokens_per_forward": 2.0}}}))
    assert compare.main(["--paired", a, str(old)]) == 2
    assert "no per-prompt counts" in capsys.readouterr().err
    assert compare.main(["--paired", a, write("c", [[1, 1]], heldout="/x/other.jsonl")]) == 2
    forced = tmp_path / "forced.json"  # a experiments.forced result: per-prompt counts at the top
    forced.write_text(json.dumps({"settings": {"heldout": "assets/heldout.jsonl"}, "per_prompt": [[10, 10], [30, 10], [15, 10]]}))
    assert compare.paired(Path(a), forced)["mean_diff"] == pytest.approx(1 / 3)
