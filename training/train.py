"""Consistency distillation (Jacobi Forcing packing) with LoRA or full fine-tuning, through accelerate.

    python -m training.train --data data/traj --out runs/cllm                 # CPU or one GPU
    accelerate launch -m training.train --data data/traj --out runs/cllm      # several GPUs
    python -m training.train ... --resume true                                # continue from runs/cllm/checkpoint

Loss = ar_weight * AR + consistency_weight * global consistency (+ local_weight * local consistency)
(+ ref_weight * reference KL + self_weight * own-answer KL + unlikelihood * loop unlikelihood). With
--loop-penalty, the frozen base's target logits lose that much on every token that would repeat a 4-gram (a
teacher that loops less); --unlikelihood pushes down the model's own probability of those tokens. Within the
consistency terms, outputs whose target repeats a 4-gram seen before count repeat_weight times as much as the
others (1 by default).
Global consistency: KL(teacher on the clean block || student on its noisy state), only at outputs
after the state's first wrong guess. AR: cross-entropy on the fixed-point tokens (``ce``, the
papers) or KL to the frozen base model on the clean answer (``kl``: keeps the answer distribution,
hence perplexity). Reference KL (optional): KL to the frozen base on human answers of the
training prompts (ShareGPT), a second forward and backward each step. Own-answer KL (optional): the same
KL on the model's own greedy answers to training prompts, regenerated every few steps (on-policy: where the
adapted model drifts into loops the base model would not enter). Logs go to out/log.jsonl; the adapter (or full model) to out/adapter.
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from decoding import DEFAULT_SPEC, load_model
from decoding.prompts import read_jsonl
from decoding.trace import LOOP_PERIOD, loop_onset

from .cli import parse, print_table, save_settings
from .collect import read_shards, repeats, seq_rep
from .evaluate import generate_greedy
from .losses import (ar_cross_entropy, hard_ce, jacobi_gain, penalize_loops, penalized, repeat_completions, soft_kl,
                     unlikelihood)
from .packing import PackedBatch, align_answers, pack, pick_states, reference_pairs

ROOT = Path(__file__).resolve().parent.parent
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MIB = 1 << 20
BUDGET_WARMUP, BUDGET_TIMED = 3, 30  # --budget-minutes times steps 4..33 of an invocation (the first ones are slow;
# with ten timed steps and four runs starting at once on one host, the runs of session 8 used only 75 to 94% of their budget)


@dataclass
class TrainSettings:
    """Settings of one training run; saved as out/train_settings.json and inside the adapter folder."""

    model: str = DEFAULT_SPEC  # base model spec (see decoding.models)
    data: str = str(ROOT / "data" / "traj")  # trajectory folder written by training.collect; several, comma-separated, are read one after the other (e.g. the base model's and the CLLM's trajectories mixed)
    out: str = str(ROOT / "runs" / "cllm")  # run folder: log, checkpoint, adapter
    lora_rank: int = 24  # LoRA rank; 0 = full fine-tuning (saves the whole model)
    lora_alpha: int = 48  # LoRA scaling numerator (scale = alpha / rank)
    lora_targets: str = ALL_LINEAR  # comma-separated module names that get LoRA
    full_scope: str = "all"  # with --lora-rank 0: "all" trains every weight; "targets" only the lora_targets matrices (the full-rank update a LoRA approximates: python -m training.extract turns it into an adapter)
    init_adapter: str = ""  # start from this LoRA adapter folder (its rank and targets win), e.g. a second phase
    save_dtype: str = "bfloat16"  # dtype of the saved adapter (bf16: r=24 on all linear layers is 14 MB)
    loop_penalty: float = 0.0  # logit subtracted, in the frozen base's logits wherever they are a target (AR KL, consistency with --teacher base, own-answer KL), from every token that would repeat a 4-gram already in the prompt or answer: the CLLM learns from a base that loops less (0 = off)
    teacher: str = "base"  # consistency target: "base" (frozen base model on the clean block; ours) or "self" (own detached clean logits, the papers)
    ar_loss: str = "kl"  # "ce" (cross-entropy on fixed points, the papers) or "kl" (KL to the frozen base, clean answer)
    ar_weight: float = 1.0  # weight of the AR term (papers: 10 : 1; the shipped CLLM: 1; higher keeps quality, lowers speed)
    consistency_weight: float = 1.0  # weight of the global consistency term
    consistency_loss: str = "kl"  # "kl": KL to the teacher's distribution (the papers); "ce": cross-entropy on the teacher's argmax token (what Jacobi accepts on; nothing spent on the rest of the distribution)
    local_weight: float = 0.0  # weight of local consistency (state -> next state); 0 = off (saves a stream)
    unlikelihood: float = 0.0  # weight of a token-level unlikelihood term on the clean answer: -log(1 - p) of the model's own probability of every token that would repeat a 4-gram (0 = off). Where --loop-penalty only moves the teacher, this pushes the student's loops down however sure the base is of them (the loop tail of the CLLM's answers)
    repeat_weight: float = 1.0  # weight, within the consistency terms, of outputs whose target ends a 4-gram seen before (prompt or earlier answer); < 1 puts the weight on new text, where the CLLM gains least
    label_smoothing: float = 0.0  # of the "ce" AR loss (released CLLMs: 0.1)
    noise_window: int = 8  # curriculum window W: block j's noise target is ((j + shift) mod W) / (W - 1)
    use_extra: bool = True  # let the curriculum pick augmented states too (if collected with --augment)
    ref_data: str = ""  # JSON lines {prompt, reference} (data/references-train.jsonl) for the reference term
    ref_weight: float = 0.0  # weight of KL(base || model) on human reference answers (0 = off): guards perplexity on text the model did not write
    ref_batch: int = 16  # reference rows per optimiser step, over all processes
    ref_tokens: int = 192  # reference answer tokens per row at most
    self_weight: float = 0.0  # weight of KL(base || model) on the model's own greedy answers, regenerated as it trains (0 = off): an on-policy anchor where its loops form
    self_every: int = 100  # regenerate those answers every K steps
    self_prompts: int = 64  # training prompts answered at each regeneration, over all processes
    self_batch: int = 8  # own answers in the term per optimiser step, per process
    self_tokens: int = 128  # tokens per own answer at most
    max_samples: int = 0  # train on the first N collected samples only (shard order = the prompt file's order; 0 = all): data-size runs from one collection
    group_by_length: bool = False  # batches of samples of similar length (sorted within chunks of 16 batches, batch order shuffled): less padding per step (our prompts run from a few tokens to over 400)
    max_rep: float = 1.0  # drop samples whose answer has a larger share of repeated 4-grams (seq-rep-4; 1.0 keeps all); with --loop-samples other than drop, a caught answer is judged by its part before the loop
    repeat_limit: int = 0  # drop samples whose answer repeats a pattern of 1..4 tokens this many times in a row, as training.collect's filter does (10 there; 0 keeps all): one collection with --repeat-limit 1000 then serves filtered and unfiltered runs
    loop_samples: str = "drop"  # what --repeat-limit does with a sample it catches: "drop" it, or keep it with fewer terms from its loop's first token on: "anchor" (no consistency there; the AR term, a KL to the loop-penalised base, and unlikelihood work on the loop), "tail" (unlikelihood alone works on the loop) or "cut" (no term sees the loop: the answer as if it ended there). --max-rep, applied after, judges a caught answer by its part before the loop
    lr: float = 5e-4  # peak learning rate (LoRA; use ~2e-5 for full fine-tuning)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: float = 0.03  # fraction of steps of linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    batch: int = 32  # samples per optimiser step, over all processes
    epochs: float = 1.0  # passes over the data (used when max_steps is 0 and budget_minutes is 0)
    max_steps: int = 0  # total optimiser steps (0: from epochs or budget_minutes)
    budget_minutes: float = 0.0  # total training time over all resumes: sets max_steps from the speed of steps 4..33
    max_minutes: float = 0.0  # this invocation stops (after a checkpoint) before this many minutes
    save_every: int = 200  # checkpoint every K steps (and at the end / time limit)
    keep_adapters: bool = False  # also save the adapter at every checkpoint as out/adapter-step<N> (to evaluate the curve)
    log_every: int = 10  # log every K steps
    loss_rows: int = 0  # run the LM head and the losses on this many rows at a time, again in the backward pass (0 = the whole batch at once): the whole batch's logits over the vocabulary are never held. Memory, not time, caps the batch (an H100 step: 39 GiB at batch 32, 20 at 16, for 12% more time), so with --recompute one GPU can take a larger batch or several runs
    pad_to: int = 1  # left-pad each batch's prompts (and the anchor terms' prompts and answers) to a multiple of this many tokens: a few shapes instead of a new one every step, for kernels planned per shape (1 = off; the losses are the same). With --cudnn-attention true, 64 took an H200 step from 1.18 s to 0.76; with it off (the default), 64 gained nothing (0.79 against 0.73)
    cudnn_attention: bool = False  # true: let PyTorch pick its cuDNN attention kernels (torch.backends.cuda.enable_cudnn_sdp) for the masked bf16 attention of training. Off by default: it plans a kernel for every new sequence length, and our batches bring new lengths every step. H200, a random model of SmolLM2-135M's shape, batch 32: 1.18 s a step with it, 0.73 without; with --loss-rows 4 --recompute true, 1.71 against 1.00 (with --pad-to 64); the tests' tiny Llama 0.41 against 0.15 (assets/results/training/h200_stepprobe_switches_*.json)
    recompute: bool = False  # activation checkpointing of the decoder layers (recomputed in the backward pass). CPU, float32, both switches: 0.7 GiB a row instead of 2.0 (assets/results/training/cpu_stepprobe_memory_b4.json)
    profile_steps: int = 0  # profile K steps after the first 3 (torch.profiler, each phase labelled): out/profile.txt (0 = off)
    resume: bool = False  # continue from out/checkpoint
    device: str = "auto"  # auto / cuda / cpu
    seed: int = 0  # data order, curriculum, init


def batch_indices(step: int, batch: int, count: int, seed: int) -> list[int]:
    """Sample indices of a global step: consecutive slices of per-epoch seeded permutations."""
    out = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), count)
        order = list(range(count))
        random.Random(seed * 1000 + epoch).shuffle(order)
        out.extend(order[offset: offset + batch - len(out)])
    return out


def grouped_indices(step: int, batch: int, lengths: list[int], seed: int, group: int = 16) -> list[int]:
    """Sample indices of a global step, batches of similar length: each epoch's seeded permutation is cut into
    chunks of ``group`` batches, each chunk sorted by length and cut into batches, and the batches shuffled. Every
    batch holds ``batch`` distinct samples of one epoch (an epoch's remainder, under one batch, is left out)."""
    count = len(lengths)
    if count < batch:
        return batch_indices(step, batch, count, seed)
    per_epoch = count // batch
    epoch, k = divmod(step, per_epoch)
    order = list(range(count))
    rng = random.Random(seed * 1000 + epoch)
    rng.shuffle(order)
    order = order[: per_epoch * batch]
    batches = []
    for start in range(0, len(order), group * batch):
        chunk = sorted(order[start:start + group * batch], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches[k]


def sample_length(sample: dict) -> int:
    """The tokens a sample takes in a packed row before padding: its prompt, its clean answer and one noisy stream."""
    n = int(sample["states"][0].shape[1])  # block size
    return len(sample["prompt"]) + 2 * n * len(sample["states"])


LOOP_ENDS = {  # --loop-samples: the terms that stop at a caught loop's first token (pack's cons_end, ar_end, ul_end)
    "anchor": (("cons_end",), "the answer terms only"),
    "tail": (("cons_end", "ar_end"), "unlikelihood only"),
    "cut": (("cons_end", "ar_end", "ul_end"), "no term"),
}


def mark_loop(sample: dict, limit: int, mode: str = "anchor") -> dict:
    """The sample, marked where the terms of ``mode`` (LOOP_ENDS) stop, if its answer holds a loop that
    ``--repeat-limit`` catches; otherwise the sample itself."""
    onset = loop_onset(sample["answer"][: sample["valid"]].tolist(), limit, LOOP_PERIOD)
    return sample if onset is None else {**sample, **dict.fromkeys(LOOP_ENDS[mode][0], onset)}


def select_samples(samples: list[dict], s: "TrainSettings", log=print) -> tuple[list[dict], int]:
    """The samples --repeat-limit, --loop-samples and --max-rep keep (marked by mark_loop where their terms stop), and
    how many of them loop. A caught answer that is kept is judged by --max-rep on its part before the loop."""
    collected = len(samples)
    if s.loop_samples != "drop":
        samples = [mark_loop(x, s.repeat_limit, s.loop_samples) for x in samples]
        log(f"--loop-samples {s.loop_samples}: {sum('cons_end' in x for x in samples)} of {len(samples)} samples loop; "
            f"from the loop on, {LOOP_ENDS[s.loop_samples][1]}")
    filters = []  # (flag, keep(answer tokens)), applied in this order
    if s.repeat_limit and s.loop_samples == "drop":
        filters.append((f"--repeat-limit {s.repeat_limit}", lambda a: not repeats(a, s.repeat_limit, LOOP_PERIOD)))
    if s.max_rep < 1.0:  # looping answers may teach the CLLM to fast-forward loops (most of its gain is repeated text)
        filters.append((f"--max-rep {s.max_rep}", lambda a: seq_rep(a) <= s.max_rep))
    for name, keep in filters:
        samples = [x for x in samples if keep(x["answer"][: x.get("cons_end", x["valid"])].tolist())]
        log(f"{name}: kept {len(samples)} of {collected} samples")
        if not samples:
            raise SystemExit(f"{name} drops all {collected} samples: raise it")
    return samples, sum("cons_end" in x for x in samples)


def make_batch(samples: list[dict], idx: list[int], s: TrainSettings, step: int, pad_id: int) -> PackedBatch:
    rng = random.Random(hash((s.seed, step, tuple(idx))))
    picks = [pick_states(samples[i], s.noise_window, rng, s.use_extra) for i in idx]
    streams = [[c for c, _ in picks]] + ([[f for _, f in picks]] if s.local_weight > 0 else [])
    n = samples[idx[0]]["states"][0].shape[1]
    return pack([samples[i] for i in idx], streams, n, pad_id, s.pad_to)


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


def build_model(s: TrainSettings):
    """(trainable model, frozen base or None, pad id, tokenizer, EOS ids). LoRA via peft unless lora_rank == 0."""
    lm = load_model(s.model, device="cpu", dtype="float32")
    model = lm.model
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    needs_base = uses_base(s)
    if s.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, s.init_adapter, is_trainable=True)
    elif s.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=sorted(target_names(s.lora_targets)))
        model = get_peft_model(model, cfg)
    elif s.full_scope == "targets":
        model.requires_grad_(False)
        for _, module in target_modules(model, s.lora_targets):
            module.weight.requires_grad_(True)
    else:
        model.requires_grad_(True)
    if s.recompute:  # non-reentrant: gradients reach the LoRA matrices without inputs that require them
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # With LoRA the base is the same model with its adapter disabled; full fine-tuning needs a frozen copy.
    base = load_model(s.model, device="cpu", dtype="float32").model if needs_base and not is_lora(s) else None
    model.train()
    return model, base, pad_id, lm.tokenizer, set(lm.eos_token_ids)


def target_names(targets: str) -> set[str]:
    """The module names of a comma-separated --lora-targets."""
    return {t.strip() for t in targets.split(",") if t.strip()}


def target_modules(model, targets: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module of the model named in --lora-targets (full fine-tuning's "targets" scope)."""
    names = target_names(targets)
    return [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in names]


def make_schedule(s: TrainSettings, total: dict):
    """Linear warm-up then cosine to min_lr_ratio; reads total["steps"], which may be set after a few steps."""
    def factor(step: int) -> float:
        steps = max(total["steps"], 1)
        warm = max(1, int(s.warmup * steps))
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


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


def own_answers(accelerator, model, samples, s: TrainSettings, step: int, pad_id: int, eos: set[int]) -> list:
    """The model's greedy answers now, to this process's share of a few training prompts: (prompt, answer) pairs."""
    rank, world = accelerator.process_index, accelerator.num_processes
    idx = batch_indices(step // max(s.self_every, 1), max(s.self_prompts, world), len(samples), s.seed + 2)[rank::world]
    prompts = [[int(t) for t in samples[i]["prompt"]] for i in idx]
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with accelerator.autocast():
        answers = generate_greedy(unwrapped, prompts, s.self_tokens, eos, pad_id, len(prompts), accelerator.device,
                                  progress=False)
    unwrapped.train()
    return [(p, a) for p, a in zip(prompts, answers) if a]


def load_references(s: TrainSettings, tokenizer) -> list:
    if s.ref_weight <= 0:
        return []
    if not s.ref_data or not Path(s.ref_data).exists():
        raise SystemExit(f"--ref-weight {s.ref_weight} needs --ref-data, a JSON-lines file of prompt + reference "
                         "(python -m training.prompts writes data/references-train.jsonl)")
    rows = [row for _, row in read_jsonl(s.ref_data) if row.get("reference")]
    pairs = reference_pairs(tokenizer, rows, max_answer=s.ref_tokens, max_prompt=512)
    if not pairs:
        raise SystemExit(f"no usable prompt + reference rows in {s.ref_data}")
    return pairs


def save_checkpoint(accelerator, out: Path, step: int, total: dict) -> None:
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out / "checkpoint"))
    if accelerator.is_main_process:
        (out / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": step, "max_steps": total["steps"]}))


def is_lora(s: TrainSettings) -> bool:
    return bool(s.init_adapter) or s.lora_rank > 0


def save_final(accelerator, model, tokenizer, s: TrainSettings, out: Path, summary: dict, suffix: str = "") -> Path:
    """The adapter folder (LoRA, in save_dtype) or the full model folder, with the training settings."""
    unwrapped = accelerator.unwrap_model(model)
    target = out / (("adapter" if is_lora(s) else "model") + suffix)
    if accelerator.is_main_process:
        if is_lora(s):
            dtype = getattr(torch, s.save_dtype)
            state = {k: v.detach().to("cpu", dtype) for k, v in unwrapped.state_dict().items() if "lora_" in k}
            unwrapped.save_pretrained(str(target), state_dict=state)
        else:
            unwrapped.save_pretrained(str(target))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(target))
        save_settings(s, target / "training_settings.json", **summary)
        for f in target.iterdir():
            if f.stat().st_size > 16 * MIB:
                print(f"warning: {f} is {f.stat().st_size / MIB:.1f} MiB, over the 16 MiB limit of a committed file")
    return target


class StepProfiler:
    """``--profile-steps K``: torch.profiler over K steps after the first ``BUDGET_WARMUP`` (allocator and first
    launches), each phase of a step labelled ``phase:<name>``. At the end it writes out/profile.txt: the operators by
    their own device time (the GPU's hot spots) and by total CPU time (the phases, and what waits on the host)."""

    def __init__(self, steps: int, first_step: int, out: Path, enabled: bool):
        self.start, self.stop = first_step + BUDGET_WARMUP, first_step + BUDGET_WARMUP + steps
        self.out, self.enabled, self.prof, self.t0 = out, enabled and steps > 0, None, 0.0

    def phase(self, name: str):
        return torch.profiler.record_function(f"phase:{name}") if self.prof is not None else nullcontext()

    def after_step(self, step: int) -> None:
        """Call with the number of optimiser steps done so far."""
        if not self.enabled:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof, self.t0 = profile(activities=activities), time.perf_counter()
            self.prof.__enter__()
        elif step == self.stop:
            self.finish(step)

    def finish(self, step: int) -> None:
        """Stop profiling at ``step`` steps done (the run may end before the K steps) and write profile.txt."""
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        steps = step - self.start
        seconds = (time.perf_counter() - self.t0) / max(steps, 1)
        self.prof.__exit__(None, None, None)
        averages = self.prof.key_averages()
        text = (f"{steps} profiled steps, {seconds:.3f} s a step (with the profiler's overhead)\n\n"
                + averages.table(sort_by="self_device_time_total", row_limit=40) + "\n"
                + averages.table(sort_by="cpu_time_total", row_limit=40) + "\n")
        (self.out / "profile.txt").write_text(text)
        self.prof, self.enabled = None, False


def log_line(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    s = parse(TrainSettings, argv)
    for name in ("ar_weight", "consistency_weight", "local_weight", "ref_weight", "self_weight", "repeat_weight",
                 "unlikelihood"):
        if getattr(s, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(s, name)}")
    if s.loop_penalty < 0:
        raise SystemExit(f"--loop-penalty must be 0 (off) or more, got {s.loop_penalty}")
    if s.pad_to < 1:
        raise SystemExit(f"--pad-to must be 1 (off) or more, got {s.pad_to}")
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and s.device != "cpu"
    if cuda and not s.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    torch.manual_seed(s.seed)
    out = Path(s.out)
    t_start = time.perf_counter()
    folders = [f.strip() for f in s.data.split(",") if f.strip()]
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing or not folders:
        raise SystemExit(f"--data: no trajectory folder at {', '.join(missing) or repr(s.data)}: "
                         "run python -m training.collect first")
    samples = [x for folder in folders for x in read_shards(folder)]
    collected = len(samples)
    if not samples:
        raise SystemExit(f"no trajectories in {s.data}: run python -m training.collect first")
    if s.max_samples < 0:
        raise SystemExit(f"--max-samples must be 0 (all) or more, got {s.max_samples}")
    if s.max_samples:
        samples = samples[: s.max_samples]
        accelerator.print(f"--max-samples {s.max_samples}: training on {len(samples)} of {collected} samples")
    if s.repeat_limit < 0:
        raise SystemExit(f"--repeat-limit must be 0 (keep all) or more, got {s.repeat_limit}")
    if s.loop_samples not in ("drop", *LOOP_ENDS):
        raise SystemExit(f"--loop-samples must be drop, {', '.join(LOOP_ENDS)}, got {s.loop_samples!r}")
    if s.loop_samples != "drop" and not s.repeat_limit:
        raise SystemExit(f"--loop-samples {s.loop_samples} needs --repeat-limit K (the loops it keeps are those the filter catches)")
    samples, anchored = select_samples(samples, s, accelerator.print)
    if s.consistency_loss not in ("kl", "ce"):
        raise SystemExit(f"--consistency-loss must be kl or ce, got {s.consistency_loss!r}")
    if s.full_scope not in ("all", "targets"):
        raise SystemExit(f"--full-scope must be all or targets, got {s.full_scope!r}")
    if s.loss_rows < 0:
        raise SystemExit(f"--loss-rows must be 0 (the whole batch at once) or more, got {s.loss_rows}")
    if s.batch < accelerator.num_processes:
        raise SystemExit(f"--batch {s.batch} is smaller than the {accelerator.num_processes} processes: each needs a row")
    model, base, pad_id, tokenizer, eos = build_model(s)
    references = load_references(s, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr,
                                  betas=(0.9, 0.95), weight_decay=s.weight_decay)
    by_epochs = math.ceil(s.epochs * len(samples) / s.batch)
    total = {"steps": s.max_steps or by_epochs}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(s, total))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if base is not None:
        base.to(accelerator.device).eval().requires_grad_(False)
    step, auto_steps = 0, bool(s.budget_minutes and not s.max_steps)
    if auto_steps:  # at least the timed steps (the schedule runs on this provisional total until they are timed)
        total["steps"] = max(by_epochs, BUDGET_WARMUP + BUDGET_TIMED + 1)
    if s.resume and (out / "checkpoint").exists():
        state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
        step, total["steps"], auto_steps = state["step"], state["max_steps"], False
        accelerator.load_state(str(out / "checkpoint"))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_settings(s, out / "train_settings.json", samples=len(samples), collected=collected, loop_anchored=anchored,
                      references=len(references), processes=accelerator.num_processes)
    summary = train_loop(accelerator, (model, base, optimizer, scheduler), (samples, references), s, out, step, total,
                         auto_steps, (pad_id, eos), t_start)
    # Saved at a time-limit stop too (marked by step < max_steps), so an interrupted run still yields an adapter.
    summary["saved"] = str(save_final(accelerator, model, tokenizer, s, out, summary))
    if accelerator.is_main_process:
        print_table("train", list(summary.items()))
    # All processes leave together, through the process group's own teardown: a process that exits while another
    # still writes can abort in gloo's threads ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()


def agree(accelerator, value: float) -> float:
    """The largest of the processes' values, on every process: decisions that must not differ between processes
    (stop now, how many steps) are taken on it, or one process would wait forever for the others."""
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.gather(torch.tensor([float(value)], device=accelerator.device)).max())


def train_loop(accelerator, parts, data, s, out, step, total, auto_steps, tokens, t_start) -> dict:
    """Optimiser steps until max_steps or the time limit; checkpoints on the way; returns the last log row."""
    from tqdm.auto import tqdm

    model, base, optimizer, scheduler = parts
    samples, references = data
    pad_id, eos = tokens
    own, own_step, own_ok = [], -s.self_every, False  # the model's own answers (this process's share), the step they were made at, whether every process has some

    rank, world = accelerator.process_index, accelerator.num_processes
    log_path, last, t_steps = out / "log.jsonl", {}, time.perf_counter()
    lengths = [sample_length(x) for x in samples] if s.group_by_length else []
    bar = tqdm(total=total["steps"], initial=step, desc="train", disable=not accelerator.is_main_process)
    first_step = log_step = step
    t_log = t_warm = t_steps
    profiler = StepProfiler(s.profile_steps, first_step, out, accelerator.is_main_process)
    while step < total["steps"]:
        with profiler.phase("batch"):
            if lengths:
                idx = grouped_indices(step, s.batch, lengths, s.seed)[rank::world]
            else:
                idx = batch_indices(step, s.batch, len(samples), s.seed)[rank::world]
            b = make_batch(samples, idx, s, step, pad_id).to(accelerator.device)
        with profiler.phase("main"):
            with accelerator.autocast():
                losses = step_losses(accelerator, model, base, b, s)
            accelerator.backward(losses["loss"])
        if references:
            with profiler.phase("ref"):
                ridx = batch_indices(step, max(s.ref_batch, world), len(references), s.seed + 1)[rank::world]
                anchor_step(accelerator, (model, base), references, ridx, pad_id, s.ref_weight, losses, "ref",
                            pad_to=s.pad_to)
        if s.self_weight > 0:
            with profiler.phase("self"):
                if step - own_step >= s.self_every:
                    own, own_step = own_answers(accelerator, model, samples, s, step, pad_id, eos), step
                    # Every process runs the term's backward or none does (a lone backward would wait forever for the others).
                    own_ok = agree(accelerator, float(not own)) == 0
                if own_ok:
                    oidx = batch_indices(step, s.self_batch, len(own), s.seed + 2)
                    anchor_step(accelerator, (model, base), own, oidx, pad_id, s.self_weight, losses, "self",
                                s.loop_penalty, s.pad_to)
        with profiler.phase("optimizer"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        profiler.after_step(step)
        if auto_steps and step == first_step + BUDGET_WARMUP:
            t_warm = time.perf_counter()  # the first steps are slow (allocator, kernels' first launches): not timed
        if auto_steps and step == first_step + BUDGET_WARMUP + BUDGET_TIMED:
            per_step = agree(accelerator, (time.perf_counter() - t_warm) / BUDGET_TIMED)
            left = s.budget_minutes * 60 - (time.perf_counter() - t_steps)
            total["steps"] = max(step + 1, step + int(left / per_step))
            bar.total = total["steps"]
            accelerator.print(f"{per_step:.3f} s/step -> max_steps = {total['steps']} for {s.budget_minutes} min")
        if step % s.log_every == 0 or step == total["steps"]:
            # means over the processes (each saw its share of the batch); note: CPU-GPU sync point
            last = {k: float(accelerator.reduce(v.detach().float(), "mean")) for k, v in losses.items()}
            now = time.perf_counter()
            last |= {"step": step, "lr": scheduler.get_last_lr()[0], "s_per_step": (now - t_steps) / max(step - first_step, 1),
                     "s_per_step_recent": (now - t_log) / max(step - log_step, 1), "elapsed_min": (now - t_start) / 60}
            if accelerator.device.type == "cuda":  # how many runs (or how large a batch) one GPU could take
                last["gpu_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            t_log, log_step = now, step
            if accelerator.is_main_process:
                log_line(log_path, last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", gain=f"{last['gain']:.2f}")
        # Each process has its own clock: all stop when the first one runs out of time.
        out_of_time = agree(accelerator, bool(s.max_minutes) and (time.perf_counter() - t_start) / 60 > s.max_minutes) > 0
        if step % s.save_every == 0 or out_of_time or step == total["steps"]:
            save_checkpoint(accelerator, out, step, total)
            if s.keep_adapters and step < total["steps"]:
                save_final(accelerator, model, None, s, out, {"step": step, **last}, suffix=f"-step{step}")
        if out_of_time:
            accelerator.print(f"time limit of {s.max_minutes} min reached at step {step}: resume with --resume true")
            break
    profiler.finish(step)
    bar.close()
    return {"step": step, "max_steps": total["steps"], **{k: v for k, v in last.items() if k != "step"}}


if __name__ == "__main__":
    main()
