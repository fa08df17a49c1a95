"""One training step on a tiny model: which samples and batches, the loss terms, and the switches that change
memory or shapes but not the losses."""
import random
import statistics

import pytest
import torch

from decoding.trace import repeat_flags
from training import batches, objective, packing
from training.settings import TrainSettings
from training.losses import soft_kl
from training.packing import align_answers, pack, pick_states
from training.tiny import tiny_model

from training_fixtures import PROMPTS, loop_tokens, random_lora


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
    counts = objective.row_counts(b, TrainSettings(unlikelihood=0.5))  # what the chunked means weight rows by
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
    kept, looping = batches.select_samples(data, TrainSettings(repeat_limit=10, loop_samples="cut", max_rep=0.5),
                                         log=lambda _: None)
    assert [x["answer"][0].item() for x in kept] == [10, 40] and looping == 1
    assert kept[0]["cons_end"] == kept[0]["ar_end"] == kept[0]["ul_end"] == 20
    kept, looping = batches.select_samples(data, TrainSettings(repeat_limit=10, max_rep=0.5), log=lambda _: None)
    assert [x["answer"][0].item() for x in kept] == [40] and looping == 0
    kept, _ = batches.select_samples(data, TrainSettings(), log=lambda _: None)
    assert kept == data


def test_padding_to_a_multiple_changes_the_shapes_not_the_losses(tiny, samples):
    """--pad-to: wider left padding (few batch shapes) gives the same losses, main terms and anchor terms."""
    from accelerate import Accelerator

    model, _ = tiny
    _, out, _ = samples
    s = TrainSettings(loop_penalty=2.0)
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
    s = TrainSettings(ar_loss="ce", teacher="self", batch=len(out), noise_window=4, consistency_loss=consistency)
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
        s = TrainSettings(batch=len(out), noise_window=4, loop_penalty=1.5, repeat_weight=0.5, local_weight=0.5,
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
    s = TrainSettings(batch=len(out), noise_window=4, loop_penalty=1.5, loss_rows=2)
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


def test_repeat_weight_moves_the_consistency_weight_off_repeated_text(samples):
    _, out, _ = samples
    s = TrainSettings(batch=len(out), noise_window=4)
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
    new_only = objective.compute_losses(logits, base, b, TrainSettings(repeat_weight=0.0))["consistency"]
    fresh = ~b.repeats[sel]
    assert new_only.item() == pytest.approx(soft_kl(teacher[fresh], student[fresh]).item(), rel=1e-6)


def test_loop_penalty_reaches_the_targets_of_every_answer_position(samples, tiny):
    out = looping(samples[1])
    s = TrainSettings(batch=len(out), noise_window=4, loop_penalty=1.5)
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
    got = objective.compute_losses(logits, base, b, TrainSettings(batch=len(out), noise_window=4, unlikelihood=0.5))
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


@pytest.mark.parametrize("step", ["training.collect", "training.evaluate", "training.dataset", "training.train",
                                  "experiments.ablate", "experiments.ceiling", "experiments.extract", "experiments.forced",
                                  "experiments.grow", "experiments.merge", "experiments.stepprobe"])
def test_every_training_step_prints_its_help(step, capsys):
    """--help lists every flag of a step with its comment; a % in a comment once broke argparse's help of train."""
    import importlib
    module = importlib.import_module(step)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "(default:" in out
