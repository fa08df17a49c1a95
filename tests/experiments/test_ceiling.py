"""The two-ahead ceiling (training/ceiling.py): branch rows against plain forwards, the events of a trace, a run."""
from __future__ import annotations

import json

import torch

from decoding.llama_static import StaticLlama
from decoding.trace import DecodeTrace, Iteration
from experiments.ceiling import CeilingSettings, measure, skip_events, two_ahead


def brute_mixture(model, ids: list[int], q: int, top_k: int, exclude: int | None) -> tuple[int, float]:
    """The two-ahead mixture for token q by one plain forward per candidate: (argmax, mass of the kept candidates)."""
    prior = torch.softmax(model(torch.tensor([ids[: q - 1]])).logits[0, -1], -1)
    weights, cands = prior.topk(top_k)
    mixture, mass = torch.zeros_like(prior), 0.0
    for w, z in zip(weights.tolist(), cands.tolist()):
        if z != exclude:
            mixture += w * torch.softmax(model(torch.tensor([ids[: q - 1] + [z]])).logits[0, -1], -1)
            mass += w
    return int(mixture.argmax()), mass


@torch.no_grad()
def test_branch_rows_give_the_mixture_of_plain_forwards(tiny_model):
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    targets = [2, 5, 17, 30, 39]
    # a wrong guess to leave out: the prior's second choice for token 16, so the exclusion changes the weights
    second = int(torch.softmax(tiny_model(torch.tensor([ids[:16]])).logits[0, -1], -1).topk(2).indices[1])
    exclude = [None, None, second, ids[29], None]
    static = StaticLlama(tiny_model, max_len=40 + 4)
    found = two_ahead(static, ids, targets, top_k=3, chunk=4, exclude=exclude)  # chunks split a target's rows
    assert found["greedy"] == tiny_model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
    for i, (q, g) in enumerate(zip(targets, exclude)):
        want, want_mass = brute_mixture(tiny_model, ids, q, 3, g)
        assert found["excluding"][i] == want
        assert abs(found["mass"][i] - want_mass) < 1e-5
        assert found["plain"][i] == brute_mixture(tiny_model, ids, q, 3, None)[0]
        if g is None:
            assert found["behind"][i] is None and found["rank"][i] is None
        else:  # the model's own prediction with g at q-1, and where the true token q ranks in it
            behind = tiny_model(torch.tensor([ids[: q - 1] + [g]])).logits[0, -1]
            assert found["behind"][i] == int(behind.argmax())
            assert found["rank"][i] == int((behind > behind[ids[q]]).sum())
    assert found["mass"][2] < two_ahead(static, ids, [17], top_k=3, chunk=4, exclude=[None])["mass"][0]
    none = two_ahead(static, ids[:2], [], top_k=3, chunk=4, exclude=[])  # a one-token answer has no target
    assert none["plain"] == none["rank"] == [] and len(none["greedy"]) == 2


def test_skip_events_are_the_guesses_made_behind_the_first_wrong_one():
    trace = DecodeTrace("jacobi", 4, [5, 6], tokens=[10, 11, 12, 13, 14, 15])
    trace.iterations = [
        # answer [10]; window [10, 11, 99, 98]: guess 11 right, 99 wrong -> outputs[2] = 21 is the guess for answer[3]
        Iteration(1, 1, [10, 11, 99, 98], [11, 12, 21, 22], 2, 0.0),
        Iteration(2, 3, [12, 13, 14, 15], [13, 14, 15, 16], 4, 0.0),  # all accepted: no wrong guess, no event
        Iteration(3, 5, [14, 40, 41, 42], [15, 50, 51, 52], 1, 0.0),  # its guess would be for answer[6]: past the end
        Iteration(4, 1, [10, 77], [11, 12], 1, 0.0, candidate=1),  # a kept candidate: not the window's own guesses
    ]
    assert skip_events(trace) == [(3, 99, 21)]


def test_a_run_counts_every_event_and_position(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["Count to five.", "Name a colour."]) + "\n")
    s = CeilingSettings(model=str(tiny_model_dir), heldout=str(prompts), limit=2, n=4, max_new_tokens=24, top_k=3,
                        chunk=16)
    out = measure(s)
    assert out["prompts"] == 2 and out["greedy_agreement"] == 1.0  # the Jacobi text is the static forward's greedy
    events = sum(r["events"] for r in out["per_prompt"])
    assert out["own_guess_after_wrong_token"]["all"]["total"] == events > 0
    assert out["two_ahead_ceiling_at_events"]["all"]["total"] == events
    assert out["own_guess_replayed"] == 1.0  # the branch row behind the wrong guess gives the decode's own output
    top = out["own_top_k_after_wrong_token"]
    assert top[1] == out["own_guess_after_wrong_token"]
    assert [top[k]["all"]["right"] for k in (1, 2, 4, 8)] == sorted(top[k]["all"]["right"] for k in (1, 2, 4, 8))
    positions = out["two_ahead_every_position"]
    assert positions["all"]["total"] == sum(r["tokens"] - 1 for r in out["per_prompt"])
    assert positions["new"]["total"] + positions["repeating"]["total"] == positions["all"]["total"]
    assert 0.0 < out["top_k_mass_mean"] <= 1.0
