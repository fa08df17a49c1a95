"""experiments.initcompare and experiments.paired: the bench's research companions."""
from __future__ import annotations

import json

import pytest

def test_initcompare_pairs_the_inits_on_the_same_prompts(tiny_model_dir, tmp_path, capsys):
    """experiments.initcompare: every init on every prompt, the same text under each (it checks), forwards per init."""

    from experiments import initcompare

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n{"prompt": "Count to five."}\n')
    out = tmp_path / "ic.json"
    result = initcompare.main(["--model", str(tiny_model_dir), "--adapter", "none", "--prompts", str(prompts),
                               "--inits", "random,repeat,lookup,random+2x6,random/b2,random+2x6/b2", "--n", "8", "--max-new-tokens", "24",
                               "--device", "cpu", "--engine", "fast", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    assert len(result["prompts"]) == 2 and set(result["summary"]) == {"random", "repeat", "lookup", "random+2x6",
                                                                          "random/b2", "random+2x6/b2"}
    for row in result["prompts"]:
        assert len({r["tokens"] for r in row["inits"].values()}) == 1
    assert all(s["tokens_per_forward"] >= 1.0 for s in result["summary"].values())
    assert "lookup" in capsys.readouterr().out
    for bad in ("zeros", "random+2x", "random+axb", "random+", "random/b", "random/bx", "random+2/b"):
        with pytest.raises(SystemExit, match="a variant is INIT, INIT"):
            initcompare.main(["--model", str(tiny_model_dir), "--adapter", "none", "--inits", bad])
    assert initcompare.parse_variant("lookup+3x10") == {"init": "lookup", "candidates": 3, "candidate_len": 10, "branches": 0}
    assert initcompare.parse_variant("random+2") == {"init": "random", "candidates": 2, "candidate_len": None, "branches": 0}
    assert initcompare.parse_variant("repeat") == {"init": "repeat", "candidates": 0, "candidate_len": None, "branches": 0}
    assert initcompare.parse_variant("random+2x6/b3") == {"init": "random", "candidates": 2, "candidate_len": 6,
                                                          "branches": 3}


def test_paired_compares_two_results_prompt_by_prompt(tmp_path):
    import gzip

    from experiments import paired
    from decoding.bench import summarise  # the bench's own totals, which paired reads

    def result(rates, wall):
        lanes = lambda r: {"cllm_jacobi": {"mean_accepted": r, "tokens": 10, "forwards": 10, "wall_s": wall},
                           "base_ar": {"mean_accepted": 1.0, "tokens": 20, "forwards": 20, "wall_s": 0.02}}
        prompts = [{"id": f"p{i}", "lanes": lanes(r)} for i, r in enumerate(rates)]
        return {"prompts": prompts, "summary": summarise(prompts, ["base_ar", "cllm_jacobi"])}

    a, b = result([3.0, 2.0, 4.0], 0.03), result([2.0, 2.5, 3.0], 0.02)
    (tmp_path / "a.json").write_text(json.dumps(a))
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:  # history/ keeps its files gzipped
        json.dump(b, f)
    c = paired.main([str(tmp_path / "a.json"), str(tmp_path / "b.json.gz")])
    assert c["prompts"] == 3 and c["mean_a"] == 3.0 and c["mean_b"] == 2.5
    assert abs(c["mean_diff"] - 0.5) < 1e-12 and (c["a_more"], c["b_more"]) == (2, 1)
    # differences 1.0, -0.5, 1.0: sample sd 0.866, over sqrt(3)
    assert abs(c["se_diff"] - 0.8660254 / 3 ** 0.5) < 1e-6
    assert c["ms_per_forward"]["a"] == {"lane": 3.0, "base_ar": 1.0}
    b["prompts"][0]["id"] = "other"
    with pytest.raises(ValueError, match="same prompts"):
        paired.compare(a, b)
