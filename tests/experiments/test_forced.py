"""experiments.forced: Jacobi decoding forced along a given answer."""
import json
import random

import pytest

from decoding import DecodeConfig, ar_decode, encode, jacobi_decode, run

from training_fixtures import PROMPTS, tiny_inputs

def test_forced_jacobi_on_the_models_own_answer_is_its_jacobi_run(tiny):
    model, _ = tiny
    from decoding.decoders import make_session
    from experiments.forced import forced_jacobi

    prompt = [5, 9, 14, 3, 7]
    own = run(ar_decode, model, prompt, DecodeConfig(max_new_tokens=40, n=1, eos_token_ids=[])).tokens
    cfg = DecodeConfig(max_new_tokens=40, n=6, eos_token_ids=[], seed=4)
    real = [it.accepted for it in run(jacobi_decode, model, prompt, cfg).iterations]
    assert forced_jacobi(make_session(model), prompt, own, 6, random.Random(4)) == real
    # another text: at least one token a pass, and every pass but the last within the window
    other = [(t * 7 + 3) % 200 + 3 for t in own]
    forced = forced_jacobi(make_session(model), prompt, other, 6, random.Random(4))
    assert all(1 <= k <= 6 for k in forced) and sum(forced) >= len(other) - 1
    assert forced_jacobi(make_session(model), prompt, [], 6, random.Random(4)) == []  # an empty answer: no pass


def test_forced_command_reads_a_bench_and_writes_per_prompt_counts(tmp_path):
    from decoding import load_model
    from experiments import forced

    folder, _, _ = tiny_inputs(tmp_path)
    lm = load_model(str(folder), device="cpu", dtype="float32")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    cfg = DecodeConfig(max_new_tokens=12, n=1, eos_token_ids=[])
    rows = []
    for i, p in enumerate(PROMPTS[:3]):
        ids = encode(lm.tokenizer, p)
        rows.append({"id": f"p{i}", "prompt_tokens": len(ids), "lanes": {"base_ar": {"ids": run(ar_decode, lm.model, ids, cfg).tokens}}})
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"prompts": rows}))
    common = ["--model", str(folder), "--adapter", "none", "--bench", str(bench), "--heldout", str(held), "--n", "4",
              "--device", "cpu"]
    result = forced.main(common + ["--out", str(tmp_path / "forced.json")])
    assert result["prompts"] == 3 and json.loads((tmp_path / "forced.json").read_text())["per_prompt"] == result["per_prompt"]
    # the base model toward its own greedy answers: its Jacobi run, so never below one token a pass
    assert all(t >= f >= 1 for t, f in result["per_prompt"]) and result["tokens_per_forward"] >= 1.0
    with pytest.raises(SystemExit, match="no row in"):
        forced.main(common + ["--lane", "cllm_jacobi"])
    with pytest.raises(SystemExit, match="--bench"):
        forced.main(["--model", str(folder), "--heldout", str(held)])
