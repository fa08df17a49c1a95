"""The loss of one training step: every term from one packed forward (the LM head only at block positions), the
same terms a few rows at a time under activation checkpointing (--loss-rows), the frozen base model's logits, and
the anchor terms (KL to the base on reference or own answers) in forwards and backwards of their own."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from .losses import ar_cross_entropy, hard_ce, jacobi_gain, penalize_loops, penalized, repeat_completions, soft_kl, unlikelihood
from .packing import PackedBatch, align_answers
from .settings import TrainSettings


def forward_logits(model, b: PackedBatch) -> torch.Tensor:
    """Logits at b.keep only: [B, (1 + streams) * L, V] (the LM head never runs on prompt tokens)."""
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                 logits_to_keep=b.keep, use_cache=False).logits


def repeat_weights(b: PackedBatch, s: TrainSettings) -> torch.Tensor | None:
    """[B, L] weight of each consistency output: ``s.repeat_weight`` where its target repeats a 4-gram, else 1
    (None when every weight is 1)."""
    return None if s.repeat_weight == 1.0 else torch.where(b.repeats, s.repeat_weight, 1.0)


def live_blocks(b: PackedBatch) -> torch.Tensor:
    """[B, blocks] bool: the blocks with at least one consistency output that counts (a state not yet fixed)."""
    return b.cons_mask[0].reshape(b.answer.shape[0], -1, b.n).any(-1)


def total_loss(terms: dict[str, torch.Tensor], s: TrainSettings) -> torch.Tensor:
    """The weighted sum of the main loss terms."""
    loss = s.ar_weight * terms["ar"] + s.consistency_weight * terms["consistency"]
    if s.local_weight > 0:
        loss = loss + s.local_weight * terms["local"]
    return loss + s.unlikelihood * terms["unlikelihood"] if s.unlikelihood > 0 else loss


def compute_losses(logits, base_logits, b: PackedBatch, s: TrainSettings) -> dict[str, torch.Tensor]:
    """All loss terms and the training-time Jacobi gain from one packed forward."""
    L = b.answer.shape[1]
    clean = logits[:, :L]
    loops = None  # [B, L, V]: the tokens that would repeat a 4-gram after each answer position
    if (s.loop_penalty > 0 and base_logits is not None) or s.unlikelihood > 0:
        loops = repeat_completions(b.input_ids[:, :b.prompt_end + L], b.real(), b.keep[:L], logits.shape[-1])
    base_clean = None
    if base_logits is not None:
        base_clean = penalize_loops(base_logits[:, :L], loops, s.loop_penalty)  # unchanged at penalty 0
    teacher = (base_clean if s.teacher == "base" else clean).detach()
    if s.ar_loss == "kl":
        ar = soft_kl(base_clean[b.ar_mask], clean[b.ar_mask])
    else:
        ar = ar_cross_entropy(clean[b.ar_mask], b.answer[b.ar_mask], s.label_smoothing)
    student = logits[:, L:2 * L]
    sel = b.cons_mask[0]
    rw = repeat_weights(b, s)
    weights = None if rw is None else rw[sel]
    cons = (hard_ce if s.consistency_loss == "ce" else soft_kl)(teacher[sel], student[sel], weights)
    out = {"ar": ar, "consistency": cons}
    if s.local_weight > 0:
        # Local: the state's outputs matched to the model's own (detached) outputs on the next state.
        out["local"] = soft_kl(logits[:, 2 * L:3 * L].detach()[sel], student[sel], weights)
    if s.unlikelihood > 0:
        out["unlikelihood"] = unlikelihood(clean[b.ul_mask], loops[b.ul_mask])
    out["loss"] = total_loss(out, s)
    with torch.no_grad():
        B = b.answer.shape[0]
        pred, st, fx = (x.reshape(B, -1, b.n) for x in (student.argmax(-1), b.states[0], b.answer))
        live = live_blocks(b)
        out["gain"] = jacobi_gain(pred[live], st[live], fx[live]).mean() if live.any() else torch.zeros(())
        out["student_acc"] = (student.argmax(-1) == b.answer)[sel].float().mean()
    return out


TERMS = ("ar", "consistency", "local", "unlikelihood", "gain", "student_acc")  # compute_losses' means


def active_terms(s: TrainSettings) -> tuple[str, ...]:
    """The terms compute_losses returns under these settings (the optional ones only when weighted)."""
    off = {name for name, weight in (("local", s.local_weight), ("unlikelihood", s.unlikelihood)) if weight <= 0}
    return tuple(t for t in TERMS if t not in off)


def row_counts(b: PackedBatch, s: TrainSettings) -> dict[str, torch.Tensor]:
    """What each of compute_losses' means averages over, row by row ([B] each): the terms of a few rows at a time
    then add up, weighted by these, to the whole batch's means."""
    sel = b.cons_mask[0]
    rw = repeat_weights(b, s)
    weights = sel.float() if rw is None else sel * rw
    cons = weights.sum(1)
    return {"ar": b.ar_mask.float().sum(1), "consistency": cons, "local": cons, "unlikelihood": b.ul_mask.float().sum(1),
            "gain": live_blocks(b).float().sum(1), "student_acc": sel.float().sum(1)}


@contextmanager
def heads_skipped(*models):
    """Inside, each model returns its last hidden states where it would return logits (its LM head skipped)."""
    heads = list({id(h): h for h in (m.get_output_embeddings() for m in models if m is not None)}.values())
    before = [head.__dict__.get("forward") for head in heads]  # a hook library may have set one already
    for head in heads:
        head.forward = torch.nn.Identity().forward  # an instance attribute hides the class's forward
    try:
        yield
    finally:
        for head, old in zip(heads, before):
            if old is None:
                del head.forward
            else:
                head.forward = old


def chunked_losses(accelerator, model, base, b: PackedBatch, s: TrainSettings) -> dict[str, torch.Tensor]:
    """compute_losses' terms with the LM head run on ``s.loss_rows`` rows at a time under activation checkpointing:
    only hidden states are kept for the backward pass, never the whole batch's logits. Equal to the one-shot terms
    up to rounding (the means are recombined with ``row_counts``)."""
    unwrapped = accelerator.unwrap_model(model)
    head = unwrapped.get_output_embeddings()
    base_head = (base if base is not None else unwrapped).get_output_embeddings()  # a LoRA's base shares its head
    with heads_skipped(unwrapped, base):
        hidden = forward_logits(model, b)  # through the (DDP) wrapper: gradients still synchronise
        base_hidden = base_logits_for(accelerator, model, base, b, s)
    L, B = b.answer.shape[1], b.answer.shape[0]
    counts = row_counts(b, s)
    terms = active_terms(s)
    out = {t: torch.zeros((), device=hidden.device) for t in terms}
    for r0 in range(0, B, s.loss_rows):
        rows = slice(r0, r0 + s.loss_rows)

        def part(h, hb, rows=rows):
            got = compute_losses(head(h), None if hb is None else base_head(hb), b.rows(rows), s)
            return tuple(got[t] for t in terms)

        values = checkpoint(part, hidden[rows], None if base_hidden is None else base_hidden[rows, :L],
                            use_reentrant=False)
        for t, v in zip(terms, values):
            out[t] = out[t] + v * (counts[t][rows].sum() / counts[t].sum().clamp_min(1e-12))
    out["loss"] = total_loss(out, s)
    for t in ("gain", "student_acc"):
        out[t] = out[t].detach()
    return out


def step_losses(accelerator, model, base, b: PackedBatch, s: TrainSettings) -> dict[str, torch.Tensor]:
    """The main terms of one step (call under autocast): in one go, or ``s.loss_rows`` rows at a time."""
    if s.loss_rows:
        return chunked_losses(accelerator, model, base, b, s)
    return compute_losses(forward_logits(model, b), base_logits_for(accelerator, model, base, b, s), b, s)


def uses_base(s: TrainSettings) -> bool:
    return s.ar_loss == "kl" or s.teacher == "base" or s.ref_weight > 0 or s.self_weight > 0


def on_base(accelerator, model, base, fn):
    """fn(frozen base model) without gradients: the frozen copy, or the LoRA model with its adapter disabled."""
    with torch.no_grad():
        if base is not None:
            return fn(base)
        unwrapped = accelerator.unwrap_model(model)
        with unwrapped.disable_adapter():
            return fn(unwrapped)


def base_logits_for(accelerator, model, base, b: PackedBatch, s: TrainSettings):
    return on_base(accelerator, model, base, lambda m: forward_logits(m, b)) if uses_base(s) else None


def anchor_kl(accelerator, model, base, pairs, idx: list[int], pad_id: int, penalty: float = 0.0,
              pad_to: int = 1) -> torch.Tensor:
    """KL(base || model) at every answer token of the (prompt, answer) rows idx: reference or own answers
    (one forward of each, LM head on answers only); the base's logits under the loop penalty if not 0."""
    b = align_answers([pairs[i] for i in idx], pad_id, pad_to).to(accelerator.device)

    def logits(m):
        return m(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                 logits_to_keep=b.keep, use_cache=False).logits

    target = on_base(accelerator, model, base, lambda m: penalized(logits(m), b.input_ids, b.real(), b.keep, penalty))
    return soft_kl(target[b.valid], logits(model)[b.valid])


def anchor_step(accelerator, models, pairs, idx, pad_id, weight, losses, name, penalty: float = 0.0,
                pad_to: int = 1) -> None:
    """One anchor term (KL to the frozen base on given answers) in its own forward and backward: the gradients
    add up with the main step's, the peak memory does not."""
    model, base = models
    with accelerator.autocast():
        losses[name] = anchor_kl(accelerator, model, base, pairs, idx, pad_id, penalty, pad_to)
    accelerator.backward(weight * losses[name])
    losses["loss"] = losses["loss"].detach() + weight * losses[name].detach()
