"""The settings of one training run: one commented line a field, parsed from the command line by decoding.cli and
saved beside every checkpoint and adapter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from decoding import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parent.parent
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainSettings:
    """Settings of one training run; saved as out/train_settings.json and inside the adapter folder."""

    model: str = DEFAULT_SPEC  # base model spec (see decoding.models)
    data: str = str(ROOT / "data" / "traj")  # trajectory folder written by training.collect; several, comma-separated, are read one after the other (e.g. the base model's and the CLLM's trajectories mixed)
    out: str = str(ROOT / "runs" / "cllm")  # run folder: log, checkpoint, adapter
    lora_rank: int = 24  # LoRA rank; 0 = full fine-tuning (saves the whole model)
    lora_alpha: int = 48  # LoRA scaling numerator (scale = alpha / rank)
    lora_targets: str = ALL_LINEAR  # comma-separated module names that get LoRA
    full_scope: str = "all"  # with --lora-rank 0: "all" trains every weight; "targets" only the lora_targets matrices (the full-rank update a LoRA approximates: python -m experiments.extract turns it into an adapter)
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
    loss_rows: int = 0  # run the LM head and the losses on this many rows at a time, again in the backward pass (0 = the whole batch at once): the whole batch's logits over the vocabulary are never held, so with --recompute one GPU can take a larger batch or several runs
    pad_to: int = 1  # left-pad each batch's prompts (and the anchor terms' prompts and answers) to a multiple of this many tokens: a few shapes instead of a new one every step, for kernels planned per shape (1 = off; the losses are the same; it pays only with --cudnn-attention true)
    cudnn_attention: bool = False  # true: let PyTorch pick its cuDNN attention kernels (torch.backends.cuda.enable_cudnn_sdp) for the masked bf16 attention of training. Off by default: it plans a kernel for every new sequence length, and our batches bring new lengths every step, which made steps slower (docs/findings.md)
    recompute: bool = False  # activation checkpointing of the decoder layers (recomputed in the backward pass): less memory a row for the same terms
    profile_steps: int = 0  # profile K steps after the first 3 (torch.profiler, each phase labelled): out/profile.txt (0 = off)
    resume: bool = False  # continue from out/checkpoint
    device: str = "auto"  # auto / cuda / cpu
    seed: int = 0  # data order, curriculum, init
